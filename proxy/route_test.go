package proxy_test

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/proxy"

	"github.com/rota-proxy/rota/internal/testenv"
)

// digestHandler answers with its name and the length and first bytes of
// what the client sent, once the client half-closes.
func digestHandler(name string) func(net.Conn) {
	return func(c net.Conn) {
		b, _ := io.ReadAll(c)
		fmt.Fprintf(c, "%s %d %x", name, len(b), b[:min(len(b), 8)])
	}
}

func TestRouterBothRelays(t *testing.T) {
	bothRelays(t, func(t *testing.T) {
		api := startBackend(t, digestHandler("api"))
		rest := startBackend(t, digestHandler("rest"))
		restTarget := balancer.NewTarget(rest.addr())
		pick := func(t *balancer.Target) proxy.Picker {
			rr := &balancer.RoundRobinBalancer{}
			rr.Update([]*balancer.Target{t})
			return rr
		}
		router := proxy.NewRouter([]proxy.Route{
			{SNI: []string{"api.example.com", "*.api.example.com"}, Picker: pick(balancer.NewTarget(api.addr())), Name: "api"},
			{SNI: []string{"*"}, Picker: pick(restTarget), Name: "rest"}})
		s := startRoutedProxy(t, proxy.Settings{SNITimeout: 200 * time.Millisecond}, router)
		for _, tc := range []struct {
			send []byte
			want string
		}{
			{testenv.ClientHello(t, "api.example.com"), "api"},
			{testenv.ClientHello(t, "v2.api.example.com"), "api"},
			{testenv.ClientHello(t, "www.example.com"), "rest"},
			{[]byte("SSH-2.0-client\r\n"), "rest"},
		} {
			got, err := roundTrip(s.addr, tc.send)
			want := fmt.Sprintf("%s %d %x", tc.want, len(tc.send), tc.send[:8])
			if err != nil || string(got) != want {
				t.Fatalf("sent %d bytes: got %q, %v; want %q", len(tc.send), got, err, want)
			}
		}
		// A client that sends nothing (the server speaks first) is routed
		// as no server name after sni_timeout.
		before := restTarget.Total.Load()
		c := dial(t, s.addr)
		start := time.Now()
		testenv.Eventually(t, "the silent client routed", 10*time.Second, func() bool { return restTarget.Total.Load() == before+1 })
		if d := time.Since(start); d < 200*time.Millisecond {
			t.Fatalf("routed after %v, before sni_timeout", d)
		}
		c.CloseWrite()
		if got, err := io.ReadAll(c); err != nil || string(got) != "rest 0 " {
			t.Fatalf("silent client: %q %v", got, err)
		}
		c.Close()
	})
}

func TestAccessBothRelays(t *testing.T) {
	bothRelays(t, func(t *testing.T) {
		b := startBackend(t, nameHandler("b"))
		denied := startProxy(t, proxy.Settings{Deny: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}, b.addr())
		// Refused before anything is read: a FIN, or a reset for the
		// bytes it sent unread; never an answer.
		if got, _ := roundTrip(denied.addr, []byte("x")); len(got) != 0 {
			t.Fatalf("denied client got %q", got)
		}
		if n := uint64(proxy.Count(denied.p.Stats.Read(), "denied_conns", "deny")); n != 1 {
			t.Fatalf("deny counted %d", n)
		}
		limited := startProxy(t, proxy.Settings{MaxConnsPerClient: 1, Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}}, b.addr())
		first := dial(t, limited.addr)
		testenv.Eventually(t, "first connection counted", 10*time.Second, func() bool { return limited.p.ClientConns(netip.MustParseAddr("127.0.0.1")) == 1 })
		if got, _ := roundTrip(limited.addr, []byte("x")); len(got) != 0 {
			t.Fatalf("second connection from the same client got %q", got)
		}
		first.CloseWrite()
		if got, _ := io.ReadAll(first); !bytes.Equal(got, []byte("b")) {
			t.Fatalf("first connection got %q", got)
		}
		first.Close()
		testenv.Eventually(t, "place given back", 10*time.Second, func() bool { return limited.p.ClientConns(netip.MustParseAddr("127.0.0.1")) == 0 })
		// (The backend answers without reading: its close may reset
		// after the answer.)
		if got, err := roundTrip(limited.addr, []byte("x")); string(got) != "b" {
			t.Fatalf("after the first closed: %q, %v", got, err)
		}
		if n := uint64(proxy.Count(limited.p.Stats.Read(), "denied_conns", "per_client")); n != 1 {
			t.Fatalf("per_client counted %d", n)
		}
	})
}
