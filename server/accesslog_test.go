package server_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/server"
)

// logRecord is an access log line as a user's pipeline reads it.
type logRecord struct {
	Time        time.Time       `json:"time"`
	Start       time.Time       `json:"start"`
	Listener    string          `json:"listener"`
	Route       string          `json:"route"`
	Client      string          `json:"client"`
	Peer        string          `json:"peer"`
	SNI         string          `json:"sni"`
	Target      string          `json:"target"`
	Tries       []accesslog.Try `json:"tries"`
	Replayed    bool            `json:"replayed"`
	ConnectMS   float64         `json:"connect_ms"`
	DurationMS  float64         `json:"duration_ms"`
	BytesIn     uint64          `json:"bytes_in"`
	BytesOut    uint64          `json:"bytes_out"`
	Termination string          `json:"termination"`
	TLSVersion  string          `json:"tls_version"`
	TLSCipher   string          `json:"tls_cipher"`
	ALPN        string          `json:"alpn"`
	ClientCert  string          `json:"client_cert"`
}

// accessLog is a JSON access log file a test reads as rota writes it.
type accessLog struct {
	t    *testing.T
	path string
}

func newAccessLog(t *testing.T, cfg *config.Config) *accessLog {
	path := filepath.Join(t.TempDir(), "access.log")
	cfg.AccessLog = &accesslog.Config{Path: path, Format: accesslog.JSON}
	return &accessLog{t: t, path: path}
}

func (a *accessLog) all() []logRecord {
	f, err := os.Open(a.path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []logRecord
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r logRecord
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			a.t.Fatalf("access log line %q: %v", sc.Text(), err)
		}
		out = append(out, r)
	}
	return out
}

// wait returns the first record of listener that ok accepts, waiting for
// it.
func (a *accessLog) wait(what, listener string, ok func(logRecord) bool) logRecord {
	a.t.Helper()
	var got logRecord
	testenv.Eventually(a.t, what, 10*time.Second, func() bool {
		for _, r := range a.all() {
			if r.Listener == listener && ok(r) {
				got = r
				return true
			}
		}
		return false
	})
	return got
}

// one is the single record of listener, once there is one; a second one
// fails the test.
func (a *accessLog) one(listener string) logRecord {
	a.t.Helper()
	r := a.wait("a record of "+listener, listener, func(logRecord) bool { return true })
	n := 0
	for _, x := range a.all() {
		if x.Listener == listener {
			n++
		}
	}
	if n != 1 {
		a.t.Fatalf("%s: %d records, want one per connection", listener, n)
	}
	return r
}

func (a *accessLog) check(name string, r logRecord, termination, target string, in, out uint64) {
	a.t.Helper()
	if r.Termination != termination || r.Target != target || r.BytesIn != in || r.BytesOut != out {
		a.t.Errorf("%s: termination %q target %q bytes %d/%d; want %q %q %d/%d (%+v)",
			name, r.Termination, r.Target, r.BytesIn, r.BytesOut, termination, target, in, out, r)
	}
	if r.Time.Before(r.Start) || r.DurationMS < 0 || r.Client == "" {
		a.t.Errorf("%s: times %v..%v, duration %v ms, client %q", name, r.Start, r.Time, r.DurationMS, r.Client)
	}
}

// startEcho is a backend that echoes what it reads until EOF.
func startEcho(t *testing.T) string {
	t.Helper()
	return testenv.Serve(t, func(c net.Conn) {
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		io.Copy(c, c)
	})
}

// startResetter answers hi and resets: a target reset after its first
// byte.
func startResetter(t *testing.T) string {
	t.Helper()
	return testenv.Serve(t, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err != nil {
			c.Close() // a health check
			return
		}
		io.WriteString(c, "hi")
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	})
}

// startSlammer accepts and resets at once: a dying process's accept queue
// (health checks, which only connect, still pass).
func startSlammer(t *testing.T) string {
	t.Helper()
	return testenv.Serve(t, func(c net.Conn) {
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	})
}

func dialT(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c.(*net.TCPConn)
}

// One record per connection, for every way a connection ends that
// loopback can produce, with the bytes each way, the target, the targets
// tried before it, and the client a PROXY header named.
func TestAccessLogRecordsEveryEnding(t *testing.T) {
	echo, namer, resetter := startEcho(t), startBackend(t, "b1"), startResetter(t)
	dead := testenv.FreeAddr(t)
	cfg := config.Default()
	cfg.Admin.Listen = ""
	log := newAccessLog(t, cfg)
	lst := func(name string, addrs ...string) config.Listener { return fastListener(name, addrs...) }
	idle := lst("idle", echo)
	idle.IdleTimeout = 200 * time.Millisecond
	down := lst("down", dead) // checked: never live
	failed := lst("failed", dead)
	failed.Health.Check = "none" // routed to, then the dial fails
	failed.Retries = 0
	guarded := lst("guarded", echo)
	guarded.Allow = prefixes(t, "127.0.0.0/30")
	guarded.Deny = prefixes(t, "127.0.0.3")
	guarded.MaxConnsPerClient = 1
	behind := lst("behind", echo)
	behind.AcceptProxyProtocol = prefixes(t, "127.0.0.1")
	edge := routedListener("edge", staticRoute("api", []string{"api.example.com"}, echo))
	drained := lst("drained", echo)
	drained.RemovedConnGrace = 0
	aged := lst("aged", echo)
	aged.MaxConnAge = 300 * time.Millisecond
	capped := lst("capped", echo)
	capped.MaxConns = 1
	quiet := lst("quiet", echo)
	quiet.AccessLog = false
	retry := lst("retry", startSlammer(t), echo) // a dying instance first, sometimes
	retry.ReplayOnReset, retry.Retries = true, 1
	retry.Health.Rise = 1
	cfg.Listeners = []config.Listener{lst("clean", echo), lst("answered", namer.Addr), lst("resetting", resetter),
		idle, down, failed, guarded, behind, edge, drained, aged, capped, quiet, retry}
	srv := startServer(t, cfg)
	for _, l := range []string{"clean", "answered", "resetting", "idle", "guarded", "behind", "drained", "aged", "capped", "quiet"} {
		testenv.Eventually(t, l+" live", 5*time.Second, func() bool { return liveCount(srv, l) == 1 })
	}
	addr := func(l string) string { return proxyAddr(t, srv, l) }

	// The client closes after its answer.
	c := dialT(t, addr("clean"))
	io.WriteString(c, "ping")
	io.ReadFull(c, make([]byte, 4))
	c.Close()
	log.check("client closes", log.one("clean"), "client_closed", echo, 4, 4)

	// The target answers and closes.
	c = dialT(t, addr("answered"))
	io.WriteString(c, "hello\n")
	if b, _ := io.ReadAll(c); string(b) != "b1" {
		t.Fatalf("answer %q", b)
	}
	c.Close()
	log.check("target closes", log.one("answered"), "target_closed", namer.Addr, 6, 2)

	// The client resets.
	c = dialT(t, addr("clean"))
	io.WriteString(c, "x")
	io.ReadFull(c, make([]byte, 1))
	c.SetLinger(0)
	c.Close()
	r := log.wait("the client's reset", "clean", func(r logRecord) bool { return r.Termination == "client_reset" })
	log.check("client resets", r, "client_reset", echo, 1, 1)

	// The target resets after its first bytes.
	c = dialT(t, addr("resetting"))
	io.WriteString(c, "?")
	b, err := io.ReadAll(c)
	c.Close()
	if !errors.Is(err, errReset) && string(b) != "hi" {
		t.Fatalf("through a resetting target: %q, %v", b, err)
	}
	log.check("target resets", log.one("resetting"), "target_reset", resetter, 1, 2)

	// Nothing moves for idle_timeout.
	c = dialT(t, addr("idle"))
	io.ReadAll(c)
	c.Close()
	log.check("idle", log.one("idle"), "idle_timeout", echo, 0, 0)

	// No live target; then a dial that fails.
	c = dialT(t, addr("down"))
	io.ReadAll(c)
	c.Close()
	log.check("no live target", log.one("down"), "no_live_target", "", 0, 0)
	c = dialT(t, addr("failed"))
	io.ReadAll(c)
	c.Close()
	r = log.one("failed")
	log.check("dial failed", r, "dial_failed", "", 0, 0)
	if len(r.Tries) != 1 || r.Tries[0].Target != dead || r.Tries[0].Why != "refused" {
		t.Errorf("dial failed: tries %+v, want %s refused", r.Tries, dead)
	}

	// A dying instance tried first, then the next one served: the record
	// names the one tried before. (The rotation starts anywhere: try
	// until the dying one comes first, each time once it is live again.)
	var served logRecord
	for i := 0; served.Target == "" && i < 40; i++ {
		testenv.Eventually(t, "both retry targets live", 5*time.Second, func() bool { return liveCount(srv, "retry") == 2 })
		c := dialT(t, addr("retry"))
		io.WriteString(c, "r")
		io.ReadFull(c, make([]byte, 1))
		c.Close()
		for _, r := range log.all() {
			if r.Listener == "retry" && len(r.Tries) == 1 {
				served = r
			}
		}
	}
	if served.Target != echo || served.Termination != "client_closed" || served.BytesIn != 1 || served.BytesOut != 1 {
		t.Errorf("retried then served: %+v", served)
	}

	// Denials.
	for _, d := range []struct{ src, want string }{{"127.0.0.3", "denied_deny"}, {"127.0.0.4", "denied_not_allowed"}} {
		c, err := dialFrom(d.src, addr("guarded"))
		if err != nil {
			t.Fatal(err)
		}
		io.ReadAll(c)
		c.Close()
		r := log.wait(d.want, "guarded", func(r logRecord) bool { return r.Termination == d.want })
		if !strings.HasPrefix(r.Client, d.src+":") || r.Target != "" {
			t.Errorf("%s: client %q target %q", d.want, r.Client, r.Target)
		}
	}
	held, err := dialFrom("127.0.0.2", addr("guarded"))
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(held, "a")
	io.ReadFull(held, make([]byte, 1))
	c2, err := dialFrom("127.0.0.2", addr("guarded"))
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(c2)
	c2.Close()
	log.wait("denied_per_client", "guarded", func(r logRecord) bool { return r.Termination == "denied_per_client" })
	held.Close()

	// A PROXY header: the client is the one it names, the peer the
	// balancer; a bad header is refused.
	c = dialT(t, addr("behind"))
	hdr, _ := proxyproto.HeaderProxyFromAddrs(1, &net.TCPAddr{IP: net.ParseIP("203.0.113.9"), Port: 4242}, c.RemoteAddr()).Format()
	c.Write(append(hdr, "abc"...))
	io.ReadFull(c, make([]byte, 3))
	c.Close()
	r = log.wait("the client behind a balancer", "behind", func(r logRecord) bool { return r.Termination == "client_closed" })
	if r.Client != "203.0.113.9:4242" || !strings.HasPrefix(r.Peer, "127.0.0.1:") || r.BytesIn != uint64(len(hdr))+3 || r.BytesOut != 3 {
		t.Errorf("behind a balancer: client %q peer %q bytes %d/%d", r.Client, r.Peer, r.BytesIn, r.BytesOut)
	}
	c = dialT(t, addr("behind"))
	io.WriteString(c, "GET / HTTP/1.0\r\n\r\n")
	io.ReadAll(c)
	c.Close()
	log.wait("proxy_header_error", "behind", func(r logRecord) bool { return r.Termination == "proxy_header_error" })

	// A server name no route serves.
	c = dialT(t, addr("edge"))
	c.Write(testenv.ClientHello(t, "other.example.com"))
	io.ReadAll(c)
	c.Close()
	r = log.one("edge")
	if r.Termination != "no_route" || r.SNI != "other.example.com" || r.Route != "" {
		t.Errorf("no route: %+v", r)
	}

	// A drained target, with removed_conn_grace 0; max_conn_age.
	c = dialT(t, addr("drained"))
	io.WriteString(c, "d")
	io.ReadFull(c, make([]byte, 1))
	if err := srv.Drain("drained", echo, true); err != nil {
		t.Fatal(err)
	}
	io.ReadAll(c)
	c.Close()
	log.check("drained", log.one("drained"), "drained", echo, 1, 1)
	c = dialT(t, addr("aged"))
	io.ReadAll(c)
	c.Close()
	log.check("max age", log.one("aged"), "max_age", echo, 0, 0)

	// Over max_conns.
	held2 := dialT(t, addr("capped"))
	io.WriteString(held2, "m")
	io.ReadFull(held2, make([]byte, 1))
	c = dialT(t, addr("capped"))
	io.ReadAll(c)
	c.Close()
	log.wait("max_conns", "capped", func(r logRecord) bool { return r.Termination == "max_conns" })
	held2.Close()

	// access_log: false leaves a listener out; the counter counts it.
	c = dialT(t, addr("quiet"))
	io.WriteString(c, "q")
	io.ReadFull(c, make([]byte, 1))
	c.Close()
	testenv.Eventually(t, "the quiet listener's end counted", 5*time.Second, func() bool {
		for _, l := range srv.Status() {
			if l.Name == "quiet" {
				return l.Count("ended_conns", "client_closed") == 1
			}
		}
		return false
	})
	for _, r := range log.all() {
		if r.Listener == "quiet" {
			t.Fatalf("a listener with access_log: false was logged: %+v", r)
		}
	}
	// Every record was counted by its termination.
	for _, l := range srv.Status() {
		if l.Name == "clean" && (l.Count("ended_conns", "client_closed") != 1 || l.Count("ended_conns", "client_reset") != 1) {
			t.Errorf("clean: ended counts %v", l.Counters)
		}
	}
}

// errReset is what a client reading a reset connection gets.
var errReset = errors.New("connection reset by peer")

// Shutdown cuts an open connection: its record says so.
func TestAccessLogShutdown(t *testing.T) {
	echo := startEcho(t)
	cfg := config.Default()
	cfg.Admin.Listen = ""
	log := newAccessLog(t, cfg)
	l := fastListener("web", echo)
	l.DrainTimeout = 100 * time.Millisecond
	cfg.Listeners = []config.Listener{l}
	srv, err := server.Start(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "live", 5*time.Second, func() bool { return liveCount(srv, "web") == 1 })
	c := dialT(t, proxyAddr(t, srv, "web"))
	io.WriteString(c, "s")
	io.ReadFull(c, make([]byte, 1))
	srv.Shutdown(context.Background())
	c.Close()
	log.check("shutdown", log.one("web"), "shutdown", echo, 1, 1)
}

// The access log's writer stuck on a full pipe (stdout nobody reads) does
// not slow the proxy: clients are served at the rate of a listener with no
// log, the records the buffers cannot hold are dropped and counted, and
// shutdown ends.
func TestAccessLogBlockedWriter(t *testing.T) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	echo := startEcho(t)
	cfg := config.Default()
	cfg.Admin.Listen = ""
	cfg.AccessLog = &accesslog.Config{Path: fmt.Sprintf("/dev/fd/%d", pw.Fd()), Format: accesslog.JSON, Buffer: 512}
	logged, quiet := fastListener("logged", echo), fastListener("quiet", echo)
	quiet.AccessLog = false
	// (No health checks: under this load a probe's timeout must not take
	// the target out; the test is about the log.)
	logged.Health.Check, quiet.Health.Check = "none", "none"
	cfg.Listeners = []config.Listener{logged, quiet}
	srv, err := server.Start(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "live", 5*time.Second, func() bool { return liveCount(srv, "logged") == 1 && liveCount(srv, "quiet") == 1 })

	took := func(listener string, n int) time.Duration {
		addr := proxyAddr(t, srv, listener)
		begin := time.Now()
		var wg sync.WaitGroup
		for w := range 4 {
			wg.Go(func() {
				for range n / 4 {
					c, err := net.DialTimeout("tcp", addr, 5*time.Second)
					if err != nil {
						t.Errorf("worker %d: %v", w, err)
						return
					}
					c.SetDeadline(time.Now().Add(5 * time.Second))
					io.WriteString(c, "x")
					if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
						t.Errorf("worker %d: %v", w, err)
					}
					c.Close()
				}
			})
		}
		wg.Wait()
		return time.Since(begin)
	}
	// Interleaved rounds, so that whatever else the machine runs weighs
	// on both alike (one run measured each at a different moment and
	// compared a busy second with a quiet one).
	const n, rounds = 2_000, 4 // more records than the pipe and the buffer (512) hold
	var tLog, tQuiet time.Duration
	for range rounds {
		tLog += took("logged", n/rounds)
		tQuiet += took("quiet", n/rounds)
	}
	withLog, without := n/tLog.Seconds(), n/tQuiet.Seconds()
	dropped := srv.AccessLog().Dropped()
	t.Logf("%.0f connections/s with the log's writer stuck, %.0f with no log; %d records dropped", withLog, without, dropped)
	if dropped == 0 {
		t.Fatal("no record dropped though the writer could not write")
	}
	if withLog < without/2 {
		t.Fatalf("%.0f connections/s with the writer stuck against %.0f with no log", withLog, without)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go io.Copy(io.Discard, pr) // lets the stuck writer finish (the process would exit instead)
	began := time.Now()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(began); d > 5*time.Second {
		t.Fatalf("shutdown took %v", d)
	}
}
