package proxy_test

import (
	"bufio"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/rota-proxy/rota/internal/testenv"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/rota-proxy/rota/proxy"
)

// headerEcho is a backend that wants a PROXY header: it answers with the
// source address the header names, then echoes the rest of the stream.
func headerEcho(c net.Conn) {
	br := bufio.NewReader(c)
	h, err := proxyproto.Read(br)
	if err != nil {
		io.WriteString(c, "no header: "+err.Error())
		return
	}
	io.WriteString(c, h.SourceAddr.String()+"|")
	io.Copy(c, br)
}

func TestSendProxyHeader(t *testing.T) {
	for _, v := range []proxy.ProxyVersion{1, 2} {
		be := startBackend(t, headerEcho)
		s := startProxy(t, proxy.Settings{ProxyProtocol: v}, be.addr())
		c := dial(t, s.addr)
		c.Write([]byte("payload"))
		c.CloseWrite()
		got, err := io.ReadAll(c)
		c.Close()
		want := c.LocalAddr().String() + "|payload"
		if err != nil || string(got) != want {
			t.Fatalf("v%d: backend saw %q (%v), want %q", v, got, err, want)
		}
	}
}

func TestAcceptProxyHeaderAndForwardIt(t *testing.T) {
	for _, v := range []proxy.ProxyVersion{1, 2} {
		be := startBackend(t, headerEcho)
		s := startProxy(t, proxy.Settings{
			ProxyProtocol:       2,
			AcceptProxyProtocol: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		}, be.addr())
		c := dial(t, s.addr)
		client := &net.TCPAddr{IP: net.ParseIP("203.0.113.7"), Port: 5555}
		hdr, err := proxyproto.HeaderProxyFromAddrs(byte(v), client, c.RemoteAddr()).Format()
		if err != nil {
			t.Fatal(err)
		}
		// The header and the first bytes of the stream arrive together.
		c.Write(append(hdr, "hello"...))
		c.CloseWrite()
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || string(got) != "203.0.113.7:5555|hello" {
			t.Fatalf("v%d: backend saw %q (%v), want the balancer's client and the bytes", v, got, err)
		}
		if n := s.p.Stats.HeaderErrors.Load(); n != 0 {
			t.Fatalf("%d header errors on good headers", n)
		}
	}
}

func TestProxyHeaderRejections(t *testing.T) {
	cases := []struct {
		name    string
		trusted string
		send    []byte
	}{
		{"untrusted source", "10.0.0.0/8", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhi")},
		{"malformed header", "127.0.0.0/8", []byte("PROXY TCP9 nonsense\r\nhi")},
		{"no header", "127.0.0.0/8", []byte("GET / HTTP/1.1\r\n\r\n")},
		{"silent client", "127.0.0.0/8", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			be := startBackend(t, echoHandler)
			s := startProxy(t, proxy.Settings{
				AcceptProxyProtocol: []netip.Prefix{netip.MustParsePrefix(tc.trusted)},
				ProxyHeaderTimeout:  100 * time.Millisecond,
			}, be.addr())
			c := dial(t, s.addr)
			defer c.Close()
			if tc.send != nil {
				c.Write(tc.send)
			}
			got, _ := io.ReadAll(c) // EOF or reset: either way closed
			if len(got) != 0 {
				t.Fatalf("got %q through a rejected connection", got)
			}
			testenv.Eventually(t, "the rejection counted", 10*time.Second, func() bool { return s.p.Stats.HeaderErrors.Load() == 1 })
			if be.accepts.Load() != 0 {
				t.Fatal("a rejected client reached a backend")
			}
		})
	}
}
