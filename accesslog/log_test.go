package accesslog_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/internal/testenv"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func sample() accesslog.Record {
	start := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	r := accesslog.Record{
		Start: start, Time: start.Add(1500 * time.Millisecond), Listener: "web", Route: "api",
		Client: netip.MustParseAddrPort("203.0.113.7:5555"), Peer: netip.MustParseAddrPort("10.0.0.2:40000"),
		SNI: "api.example.com", Target: "10.1.0.3:443", NTries: 2, Replayed: true,
		Connect: 2500 * time.Microsecond, Duration: 1500 * time.Millisecond,
		BytesIn: 512, BytesOut: 4096, Termination: accesslog.TargetClosed,
	}
	r.Tries[0] = accesslog.Try{Target: "10.1.0.1:443", Why: "refused"}
	r.Tries[1] = accesslog.Try{Target: "10.1.0.2:443", Why: "timeout"}
	return r
}

// A JSON record has the contract's fields, in its order, with their
// values.
func TestJSONRecord(t *testing.T) {
	r := sample()
	line := accesslog.AppendJSON(nil, &r)
	if !strings.HasSuffix(string(line), "}\n") || strings.Count(string(line), "\n") != 1 {
		t.Fatalf("not one line: %q", line)
	}
	order := []string{"time", "start", "listener", "route", "client", "peer", "sni", "target", "tries", "replayed",
		"connect_ms", "duration_ms", "bytes_in", "bytes_out", "termination"}
	keys := regexp.MustCompile(`"([a-z_]+)":`).FindAllStringSubmatch(string(line), -1)
	var top []string
	for _, k := range keys {
		if k[1] != "why" && !(k[1] == "target" && len(top) > 7) {
			top = append(top, k[1])
		}
	}
	if strings.Join(top, " ") != strings.Join(order, " ") {
		t.Fatalf("fields %v, want %v", top, order)
	}
	var got map[string]any
	if err := json.Unmarshal(line, &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"time": "2026-12-05T10:00:01.5Z", "start": "2026-12-05T10:00:00Z", "listener": "web", "route": "api",
		"client": "203.0.113.7:5555", "peer": "10.0.0.2:40000", "sni": "api.example.com", "target": "10.1.0.3:443",
		"replayed": true, "connect_ms": 2.5, "duration_ms": 1500.0, "bytes_in": 512.0, "bytes_out": 4096.0, "termination": "target_closed"}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
	if fmt.Sprint(got["tries"]) != "[map[target:10.1.0.1:443 why:refused] map[target:10.1.0.2:443 why:timeout]]" {
		t.Errorf("tries = %v", got["tries"])
	}
}

// A text record is the same fields on one line, in the same order, "-"
// for an empty one.
func TestTextRecord(t *testing.T) {
	r := sample()
	got := string(accesslog.AppendText(nil, &r))
	want := "2026-12-05T10:00:01.5Z 2026-12-05T10:00:00Z web api 203.0.113.7:5555 10.0.0.2:40000 api.example.com 10.1.0.3:443 " +
		"10.1.0.1:443/refused,10.1.0.2:443/timeout true 2.500 1500.000 512 4096 target_closed\n"
	if got != want {
		t.Fatalf("got  %q\nwant %q", got, want)
	}
	r = accesslog.Record{Start: r.Start, Time: r.Start, Listener: "db", Termination: accesslog.NoLiveTarget}
	if got := string(accesslog.AppendText(nil, &r)); got != "2026-12-05T10:00:00Z 2026-12-05T10:00:00Z db - - - - - - false 0.000 0.000 0 0 no_live_target\n" {
		t.Fatalf("empty fields: %q", got)
	}
}

// A connection whose TLS rota terminated carries what the handshake
// negotiated, after the contract's fields, in JSON and text alike.
func TestTLSFields(t *testing.T) {
	r := sample()
	r.TLS = accesslog.TLSInfo{Version: "1.3", Cipher: "TLS_AES_128_GCM_SHA256", ALPN: "h2", ClientCert: "CN=partner,O=Example Corp"}
	line := accesslog.AppendJSON(nil, &r)
	if !strings.HasSuffix(string(line), `"termination":"target_closed","tls_version":"1.3","tls_cipher":"TLS_AES_128_GCM_SHA256","alpn":"h2","client_cert":"CN=partner,O=Example Corp"}`+"\n") {
		t.Fatalf("JSON: %s", line)
	}
	text := string(accesslog.AppendText(nil, &r))
	if !strings.HasSuffix(text, " target_closed 1.3 TLS_AES_128_GCM_SHA256 h2 CN=partner,O=Example_Corp\n") {
		t.Fatalf("text: %q", text)
	}
	r.TLS.ALPN, r.TLS.ClientCert = "", ""
	if text := string(accesslog.AppendText(nil, &r)); !strings.HasSuffix(text, " target_closed 1.3 TLS_AES_128_GCM_SHA256 - -\n") {
		t.Fatalf("text without ALPN or client certificate: %q", text)
	}
}

func readLines(t *testing.T, path string, n int) []string {
	t.Helper()
	var lines []string
	testenv.Eventually(t, fmt.Sprintf("%d lines in %s", n, path), 5*time.Second, func() bool {
		b, _ := os.ReadFile(path)
		lines = strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
		return len(b) > 0 && len(lines) >= n
	})
	return lines
}

// logrotate renames the file, then SIGUSR1 (Reopen): the next records go
// to a new file at the path, the earlier ones stay in the renamed one.
func TestReopenAfterRename(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "access.log")
	l, err := accesslog.Open(accesslog.Config{Path: path, Format: accesslog.Text})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close(context.Background())
	r := sample()
	l.Add(&r)
	readLines(t, path, 1)
	rotated := path + ".1"
	if err := os.Rename(path, rotated); err != nil {
		t.Fatal(err)
	}
	if err := l.Reopen(context.Background()); err != nil {
		t.Fatal(err)
	}
	r.Listener = "after"
	l.Add(&r)
	if lines := readLines(t, path, 1); len(lines) != 1 || !strings.Contains(lines[0], " after ") {
		t.Fatalf("new file: %q", lines)
	}
	if b, _ := os.ReadFile(rotated); strings.Count(string(b), "\n") != 1 || strings.Contains(string(b), " after ") {
		t.Fatalf("rotated file: %q", b)
	}
}

// A writer that cannot write (stdout a full pipe nobody reads) never holds
// up Add: records past the buffers are dropped and counted, and once the
// pipe is read again the writer catches up and Close ends.
func TestBlockedWriterDropsAndNeverBlocks(t *testing.T) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	l, err := accesslog.Open(accesslog.Config{Path: fmt.Sprintf("/dev/fd/%d", pw.Fd()), Format: accesslog.JSON})
	if err != nil {
		t.Fatal(err)
	}
	r := sample()
	const n = 200_000
	begin := time.Now()
	for range n {
		l.Add(&r)
	}
	took := time.Since(begin)
	if l.Dropped() == 0 {
		t.Fatalf("%d records into a pipe nobody reads, none dropped", n)
	}
	if took > 5*time.Second {
		t.Fatalf("%d Adds took %v with the writer blocked", n, took)
	}
	t.Logf("%d Adds in %v (%v each) with the writer blocked; %d dropped", n, took, took/n, l.Dropped())
	go io.Copy(io.Discard, bufio.NewReader(pr)) // the reader comes back
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}
	pw.Close()
}

// Recent keeps each listener's last records, oldest first.
func TestRecent(t *testing.T) {
	l, err := accesslog.Open(accesslog.Config{Path: filepath.Join(t.TempDir(), "a.log"), Format: accesslog.JSON})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close(context.Background())
	r := sample()
	for i := range accesslog.RecentPerListener + 5 {
		r.BytesIn, r.Time = uint64(i), r.Start.Add(time.Duration(i)*time.Millisecond)
		l.Add(&r)
	}
	testenv.Eventually(t, "the records taken", 5*time.Second, func() bool {
		rs := l.Recent("web")
		return len(rs) == accesslog.RecentPerListener && rs[len(rs)-1].BytesIn == accesslog.RecentPerListener+4
	})
	if rs := l.Recent("web"); rs[0].BytesIn != 5 {
		t.Fatalf("oldest kept: %d, want 5", rs[0].BytesIn)
	}
	if l.Recent("other") != nil {
		t.Fatal("records for a listener that had none")
	}
}

// BenchmarkAdd is what a relay loop pays per record: a copy into a shard.
func BenchmarkAdd(b *testing.B) {
	l, err := accesslog.Open(accesslog.Config{Path: os.DevNull, Format: accesslog.JSON})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close(context.Background())
	r := sample()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			l.Add(&r)
		}
	})
}

// BenchmarkAppendJSON is what the writer pays per record to format it.
func BenchmarkAppendJSON(b *testing.B) {
	r := sample()
	var line []byte
	for b.Loop() {
		line = accesslog.AppendJSON(line[:0], &r)
	}
}

// BenchmarkWriteFile is the writer's whole cost per record, to a file:
// records added as fast as the writer takes them.
func BenchmarkWriteFile(b *testing.B) {
	l, err := accesslog.Open(accesslog.Config{Path: filepath.Join(b.TempDir(), "a.log"), Format: accesslog.JSON})
	if err != nil {
		b.Fatal(err)
	}
	r := sample()
	for b.Loop() {
		l.Add(&r)
	}
	l.Close(context.Background())
	if d := l.Dropped(); d > 0 {
		b.ReportMetric(float64(d)/float64(b.N), "dropped/op")
	}
}

// Names with quotes, backslashes, control characters, other scripts or
// bytes that are not UTF-8 still make valid JSON, read back as written
// (invalid bytes as U+FFFD, as encoding/json writes them).
func TestJSONEscapes(t *testing.T) {
	r := sample()
	r.Listener, r.SNI = "a\"b\\c\x01d\n", "żółw.example\xff"
	var got map[string]any
	if err := json.Unmarshal(accesslog.AppendJSON(nil, &r), &got); err != nil {
		t.Fatal(err)
	}
	if got["listener"] != r.Listener || got["sni"] != "żółw.example\ufffd" {
		t.Fatalf("listener %q sni %q", got["listener"], got["sni"])
	}
}
