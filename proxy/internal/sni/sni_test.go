package sni

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// recordConn is a net.Conn that keeps what is written to it and fails the
// handshake after the first write: the ClientHello, as crypto/tls sends it.
type recordConn struct {
	net.Conn
	out bytes.Buffer
	in  io.Reader
}

var errStop = errors.New("stop")

func (c *recordConn) Write(b []byte) (int, error) { c.out.Write(b); return 0, errStop }
func (c *recordConn) Read(b []byte) (int, error) {
	if c.in == nil {
		return 0, errStop
	}
	return c.in.Read(b)
}
func (c *recordConn) Close() error                     { return nil }
func (c *recordConn) SetDeadline(time.Time) error      { return nil }
func (c *recordConn) SetReadDeadline(time.Time) error  { return nil }
func (c *recordConn) SetWriteDeadline(time.Time) error { return nil }
func (c *recordConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *recordConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }

// hello returns the ClientHello crypto/tls sends for cfg.
func hello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	c := &recordConn{}
	err := tls.Client(c, cfg).Handshake()
	if !errors.Is(err, errStop) || c.out.Len() == 0 {
		t.Fatalf("no ClientHello captured: %v", err)
	}
	return c.out.Bytes()
}

// resplit re-frames a single-record handshake into records of at most
// size bytes of payload each.
func resplit(t *testing.T, b []byte, size int) []byte {
	t.Helper()
	n := int(b[3])<<8 | int(b[4])
	if len(b) != 5+n {
		t.Fatalf("hello is not one record: %d bytes, record of %d", len(b), n)
	}
	payload := b[5:]
	var out []byte
	for len(payload) > 0 {
		k := min(size, len(payload))
		out = append(out, b[0], b[1], b[2], byte(k>>8), byte(k))
		out = append(out, payload[:k]...)
		payload = payload[k:]
	}
	return out
}

func TestParseRealClientHellos(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  *tls.Config
		want string
	}{
		{"tls13", &tls.Config{ServerName: "API.Example.com"}, "api.example.com"},
		{"tls12", &tls.Config{ServerName: "db.internal", MaxVersion: tls.VersionTLS12}, "db.internal"},
		{"ip: no SNI", &tls.Config{ServerName: "127.0.0.1", InsecureSkipVerify: true}, ""},
		{"alpn and a long name", &tls.Config{ServerName: strings.Repeat("a", 60) + ".example.com", NextProtos: []string{"h2", "http/1.1"}}, strings.Repeat("a", 60) + ".example.com"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := hello(t, tc.cfg)
			for _, framing := range []struct {
				name string
				b    []byte
			}{{"one record", b}, {"records of 7 bytes", resplit(t, b, 7)}, {"records of 300 bytes", resplit(t, b, 300)}} {
				got, done, err := Parse(framing.b)
				if err != nil || !done || got != tc.want {
					t.Fatalf("%s: Parse = %q, %v, %v; want %q", framing.name, got, done, err, tc.want)
				}
				// Every proper prefix (a hello arriving a byte at a time)
				// asks for more, and never errs.
				for i := range len(framing.b) {
					if got, done, err := Parse(framing.b[:i]); done || err != nil {
						t.Fatalf("%s: Parse(first %d bytes) = %q, %v, %v; want more needed", framing.name, i, got, done, err)
					}
				}
				// Bytes after the hello (the client's next flight) are
				// not its business.
				if got, done, err := Parse(append(bytes.Clone(framing.b), 23, 3, 3, 0, 1, 0)); !done || err != nil || got != tc.want {
					t.Fatalf("%s with trailing bytes: %q, %v, %v", framing.name, got, done, err)
				}
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    []byte
		want error
	}{
		{"http", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), ErrNotTLS},
		{"ssh banner", []byte("SSH-2.0-OpenSSH_9.6\r\n"), ErrNotTLS},
		{"one byte not tls", []byte{'G'}, ErrNotTLS},
		{"tls alert record", []byte{21, 3, 3, 0, 2, 2, 40}, ErrNotTLS},
		{"handshake but not a client hello", []byte{22, 3, 1, 0, 4, 2, 0, 0, 0}, ErrNotTLS},
		{"empty record", []byte{22, 3, 1, 0, 0}, ErrNotTLS},
		{"record over 16 KiB", []byte{22, 3, 1, 0x40, 0x01}, ErrNotTLS},
		{"client hello over 16 KiB", []byte{22, 3, 1, 0, 4, 1, 0, 0x50, 0}, ErrTooLarge},
		{"garbage body", []byte{22, 3, 1, 0, 6, 1, 0, 0, 2, 3, 3}, ErrNotTLS},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, done, err := Parse(tc.b); done || !errors.Is(err, tc.want) {
				t.Fatalf("Parse = %v, %v; want %v", done, err, tc.want)
			}
		})
	}
	// A stream of tiny records that never completes a hello ends at the
	// bound instead of being read for ever.
	var b []byte
	for len(b) < MaxHello {
		b = append(b, 22, 3, 1, 0, 1, 1)
	}
	if _, _, err := Parse(b); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("endless one-byte records: %v, want ErrTooLarge", err)
	}
}

func TestTableMostSpecificWins(t *testing.T) {
	tb := NewTable([][]string{
		{"*"},
		{"*.example.com"},
		{"api.example.com", "API2.example.com."},
		{"*.api.example.com"},
	})
	for name, want := range map[string]int{
		"api.example.com":      2,
		"api2.example.com":     2,
		"x.api.example.com":    3,
		"a.b.api.example.com":  3,
		"www.example.com":      1,
		"example.com":          0, // "*.example.com" needs a label before it
		"other.org":            0,
		"":                     0,
		"xapi.example.com":     1,
		"notexample.com":       0,
		"deep.www.example.com": 1,
	} {
		if got := tb.Match(name); got != want {
			t.Errorf("Match(%q) = %d, want %d", name, got, want)
		}
	}
	noStar := NewTable([][]string{{"a.example.com"}})
	if got := noStar.Match("b.example.com"); got != -1 {
		t.Errorf("no route: Match = %d, want -1", got)
	}
	if got := noStar.Match(""); got != -1 {
		t.Errorf("no SNI, no *: Match = %d, want -1", got)
	}
	if n := testing.AllocsPerRun(100, func() { tb.Match("x.api.example.com") }); n != 0 {
		t.Errorf("Match allocates %v times", n)
	}
}

// tlsServerName is what crypto/tls's own server reads as the server name
// of b, and whether it got that far.
func tlsServerName(b []byte) (string, bool) {
	var name string
	got := false
	c := &recordConn{in: bytes.NewReader(b)}
	tls.Server(c, &tls.Config{GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		name, got = h.ServerName, true
		return nil, errStop
	}}).Handshake()
	return name, got
}

func FuzzClientHello(f *testing.F) {
	f.Add(hello(f, &tls.Config{ServerName: "api.example.com"}))
	f.Add(hello(f, &tls.Config{ServerName: "x.y", MaxVersion: tls.VersionTLS12}))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add([]byte{22, 3, 1, 0, 4, 1, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		name, done, err := Parse(b)
		if done && err != nil {
			t.Fatalf("done with an error: %v", err)
		}
		if done && (name != strings.ToLower(name) || strings.HasSuffix(name, ".")) {
			t.Fatalf("name %q is not normalized", name)
		}
		// Whatever crypto/tls accepts as a ClientHello, Parse reads the
		// same server name from.
		if want, ok := tlsServerName(b); ok {
			if !done || name != strings.ToLower(want) {
				t.Fatalf("crypto/tls reads server name %q; Parse = %q, %v, %v", want, name, done, err)
			}
		}
	})
}

// oneByteRecords is a real ClientHello cut into records of one byte each
// (legal TLS framing, and the most work per byte a client can ask for).
func oneByteRecords(t testing.TB) []byte {
	b := hello(t, &tls.Config{ServerName: "api.example.com"})
	payload := b[5:]
	var out []byte
	for _, c := range payload {
		out = append(out, b[0], b[1], b[2], 0, 1, c)
	}
	return out
}

// A Reader fed a ClientHello as it arrives, one byte at a time and one
// byte a record, does no work twice: no call copies anything until the
// hello is whole (the old Parse reassembled every fragment on every call,
// quadratic in the bytes), and the name comes out right.
func TestReaderIsLinearInTheBytes(t *testing.T) {
	b := oneByteRecords(t)
	var r Reader
	calls := 0
	allocs := testing.AllocsPerRun(1, func() {
		r = Reader{}
		for i := 1; i < len(b); i++ {
			calls++
			if _, done, err := r.Parse(b[:i]); done || err != nil {
				t.Fatalf("after %d bytes: done %v, %v", i, done, err)
			}
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations over %d calls before the hello was whole; want none", allocs, calls/2)
	}
	if name, done, err := r.Parse(b); !done || err != nil || name != "api.example.com" {
		t.Fatalf("whole: %q, %v, %v", name, done, err)
	}
}

// BenchmarkOneByteRecords reads a ClientHello of one-byte records as it
// arrives, a byte at a time.
func BenchmarkOneByteRecords(b *testing.B) {
	h := oneByteRecords(b)
	b.SetBytes(int64(len(h)))
	for b.Loop() {
		var r Reader
		for i := 1; i <= len(h); i++ {
			r.Parse(h[:i])
		}
	}
}
