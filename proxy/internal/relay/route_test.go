package relay

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/rota-proxy/rota/proxy/internal/sni"

	"github.com/rota-proxy/rota/internal/testenv"
)

// routed is a harness whose connection routes "api.example.com" to route
// 0 (target a) and, with star, anything else to route 1 (target b).
func routed(t *testing.T, star bool, cfg Config) (*harness, *[]string) {
	asked := &[]string{}
	h := newHarness(t, cfg, 2)
	api, rest := fixed(h.targets[:1]), fixed(h.targets[1:])
	h.cfg.SNITimeout = time.Second
	h.cfg.Route = func(name string) (Picker, int) {
		*asked = append(*asked, name)
		switch {
		case name == "api.example.com":
			return api, 0
		case star:
			return rest, 1
		}
		return nil, -1
	}
	return h, asked
}

func TestRouteBySNI(t *testing.T) {
	hello := testenv.ClientHello(t, "API.example.com")
	h, asked := routed(t, true, Config{})
	h.want(h.c.Start(0), ReadPrelude)
	// The hello arrives in three pieces; rota asks for more until it has
	// all of it, then routes, and forwards every byte it read.
	h.want(h.c.Prelude(hello[:3], 1), ReadPrelude)
	h.want(h.c.Prelude(hello[3:100], 2), ReadPrelude)
	h.want(h.c.Prelude(hello[100:], 3), Dial)
	if h.c.Target() != h.targets[0] || h.c.Hello() != "api.example.com" || len(*asked) != 1 {
		t.Fatalf("routed to %v for %q (asked %q)", h.c.Target(), h.c.Hello(), *asked)
	}
	h.want(h.c.Dialed(4), Flush)
	if got := h.flush(-1); !bytes.Equal(got, hello) {
		t.Fatalf("target was sent %d bytes, want the %d-byte hello unchanged", len(got), len(hello))
	}
	if !h.c.Committed() {
		t.Fatal("with replay off, the forwarded hello commits")
	}
}

// A route that terminates TLS takes the ClientHello the routing read
// (TakeHeld): the target, dialled after the handshake, gets none of it.
func TestTakeHeldForTermination(t *testing.T) {
	hello := testenv.ClientHello(t, "api.example.com")
	h, _ := routed(t, true, Config{})
	h.want(h.c.Start(0), ReadPrelude)
	h.want(h.c.Prelude(hello, 1), Dial)
	if got := h.c.TakeHeld(); !bytes.Equal(got, hello) {
		t.Fatalf("TakeHeld gave %d bytes, want the %d-byte hello", len(got), len(hello))
	}
	if got := h.c.TakeHeld(); got != nil {
		t.Fatalf("a second TakeHeld gave %d bytes", len(got))
	}
	h.want(h.c.Dialed(2), Flush)
	if got := h.flush(-1); len(got) != 0 {
		t.Fatalf("the target was sent %d bytes of the hello", len(got))
	}
}

func TestRouteFallbacks(t *testing.T) {
	// Not TLS: routed at once as no server name.
	h, asked := routed(t, true, Config{})
	h.want(h.c.Start(0), ReadPrelude)
	h.want(h.c.Prelude([]byte("GET / HTTP/1.1\r\n"), 1), Dial)
	if h.c.Target() != h.targets[1] || (*asked)[0] != "" || !errors.Is(h.c.HelloErr(), errNotTLS()) {
		t.Fatalf("non-TLS: target %v, asked %q, err %v", h.c.Target(), *asked, h.c.HelloErr())
	}

	// Nothing within sni_timeout (a server-speaks-first protocol): routed
	// as no server name at the deadline, not before.
	h, asked = routed(t, true, Config{})
	h.want(h.c.Start(0), ReadPrelude)
	if d := h.c.Deadline(); d != int64(time.Second) {
		t.Fatalf("deadline %v, want sni_timeout", time.Duration(d))
	}
	h.want(h.c.Expired(int64(time.Second)-1), Continue)
	h.want(h.c.Expired(int64(time.Second)), Dial)
	if h.c.Target() != h.targets[1] || len(*asked) != 1 {
		t.Fatalf("late: target %v, asked %q", h.c.Target(), *asked)
	}

	// Part of a hello, then the client's FIN: closed, nothing dialled.
	hello := testenv.ClientHello(t, "api.example.com")
	h, asked = routed(t, true, Config{})
	h.want(h.c.Start(0), ReadPrelude)
	h.want(h.c.Prelude(hello[:10], 1), ReadPrelude)
	h.want(h.c.PreludeEOF(), Close)
	if len(*asked) != 0 || h.c.Target() != nil {
		t.Fatal("a client that left mid-hello was routed")
	}

	// No route matches: closed and counted.
	h, _ = routed(t, false, Config{})
	h.want(h.c.Start(0), ReadPrelude)
	h.want(h.c.Prelude(testenv.ClientHello(t, "other.org"), 1), Close)
	if h.stats.NoRoute.Load() != 1 || !errors.Is(h.c.Err, ErrNoRoute) {
		t.Fatalf("no route: counted %d, err %v", h.stats.NoRoute.Load(), h.c.Err)
	}
}

func errNotTLS() error { return sni.ErrNotTLS }

func TestRouteAfterPROXYHeader(t *testing.T) {
	hello := testenv.ClientHello(t, "api.example.com")
	h, _ := routed(t, true, Config{AcceptProxy: func(netip.Addr) bool { return true }})
	h.want(h.c.Start(0), ReadPrelude)
	// The header and the hello in one read.
	in := append([]byte("PROXY TCP4 192.0.2.7 10.2.2.2 4000 443\r\n"), hello...)
	h.want(h.c.Prelude(in, 1), Dial)
	if h.c.Src != netip.MustParseAddrPort("192.0.2.7:4000") || h.c.Target() != h.targets[0] {
		t.Fatalf("src %v target %v", h.c.Src, h.c.Target())
	}
	h.want(h.c.Dialed(2), Flush)
	if got := h.flush(-1); !bytes.Equal(got, hello) {
		t.Fatal("the header was forwarded, or the hello changed")
	}
}

func TestAccess(t *testing.T) {
	deny := netip.MustParsePrefix("10.1.1.0/24")
	access := func(a netip.Addr) Denial {
		if deny.Contains(a) {
			return Denied
		}
		if !netip.MustParsePrefix("10.0.0.0/8").Contains(a) {
			return NotAllowed
		}
		return Admitted
	}
	// The harness's client is 10.1.1.1: denied, before anything is read
	// or dialled.
	h := newHarness(t, Config{Access: access}, 1)
	h.want(h.c.Start(0), Close)
	if h.stats.Denied[Denied].Load() != 1 || h.c.Target() != nil || !errors.Is(h.c.Err, ErrDenied) {
		t.Fatalf("denied: %v, target %v", h.c.Err, h.c.Target())
	}
	// Through a PROXY header the named client is the one checked.
	for _, tc := range []struct {
		src  string
		want Action
		why  Denial
	}{{"10.9.9.9", Dial, Admitted}, {"10.1.1.9", Close, Denied}, {"192.0.2.1", Close, NotAllowed}} {
		h := newHarness(t, Config{Access: access, AcceptProxy: func(netip.Addr) bool { return true }}, 1)
		h.want(h.c.Start(0), ReadPrelude)
		h.want(h.c.Prelude([]byte("PROXY TCP4 "+tc.src+" 10.2.2.2 4000 80\r\n"), 1), tc.want)
		if tc.why != Admitted && h.stats.Denied[tc.why].Load() != 1 {
			t.Fatalf("%s: not counted as %v", tc.src, tc.why)
		}
	}
}

func TestPerClientLimit(t *testing.T) {
	limit := NewClientLimit()
	cfg := Config{Clients: limit, Settings: Settings{MaxConnsPerClient: 2}}
	var conns []*harness
	for range 2 {
		h := newHarness(t, cfg, 1)
		h.want(h.c.Start(0), Dial)
		conns = append(conns, h)
	}
	if n := limit.Open(client.Addr()); n != 2 {
		t.Fatalf("open = %d", n)
	}
	third := newHarness(t, cfg, 1)
	third.want(third.c.Start(0), Close)
	if third.stats.Denied[PerClient].Load() != 1 {
		t.Fatal("third connection not counted per_client")
	}
	// Every way a connection ends gives its place back, once.
	conns[0].want(conns[0].c.DialFailed(errors.New("refused"), 1), Refused)
	conns[1].want(conns[1].c.Dialed(1), Flush)
	conns[1].c.Close(nil)
	conns[1].c.Close(nil)
	if n := limit.Open(client.Addr()); n != 0 {
		t.Fatalf("open = %d after both ended", n)
	}
	h := newHarness(t, cfg, 1)
	h.want(h.c.Start(0), Dial)
}
