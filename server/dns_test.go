package server_test

import (
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rota-proxy/rota/admin"
	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/server"
)

// loopbackBackends starts one backend per name on 127.0.0.<2+i>, all on
// one port, as the replicas behind a DNS name listen: the port.
func loopbackBackends(t *testing.T, names ...string) (int, []*backend) {
	t.Helper()
	for try := 0; ; try++ {
		ln, err := net.Listen("tcp", "127.0.0.2:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		var bs []*backend
		ok := true
		for i, n := range names {
			addr := net.JoinHostPort("127.0.0."+strconv.Itoa(2+i), strconv.Itoa(port))
			if c, err := net.Listen("tcp", addr); err != nil {
				ok = false // taken on that address: pick another port
				break
			} else {
				c.Close()
			}
			bs = append(bs, testenv.StartBackendAt(t, n, addr))
		}
		if ok {
			return port, bs
		}
		for _, b := range bs {
			b.Kill()
		}
		if try == 10 {
			t.Fatal("no port free on 127.0.0.2-" + strconv.Itoa(1+len(names)))
		}
	}
}

// discovery: dns routes every address of a name, follows a change of its
// records within the TTL (the old address is not dialled after), and keeps
// routing through a resolver failure, which /api/v1/targets shows.
func TestDNSDiscoveryRoutesEveryAddress(t *testing.T) {
	port, bs := loopbackBackends(t, "a", "b", "c")
	z := testenv.StartZone(t)
	z.Set("app.test", "app.test. 1 IN A 127.0.0.2", "app.test. 1 IN A 127.0.0.3")

	cfg := config.Default()
	cfg.Admin.Listen = ""
	cfg.Registries.DNS.Resolvers = []string{z.Addr()}
	cfg.Registries.DNS.MinRefresh = 100 * time.Millisecond
	cfg.Registries.DNS.Timeout = 200 * time.Millisecond
	l := fastListener("app")
	l.Discovery, l.Static, l.Service, l.Port = "dns", nil, "app.test", config.Port{Number: port}
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	addr := proxyAddr(t, srv, "app")

	seen := func(want ...string) {
		t.Helper()
		got := map[string]bool{}
		testenv.Eventually(t, "answers from "+strings.Join(want, ", "), 10*time.Second, func() bool {
			if s, err := request(addr); err == nil {
				got[s] = true
			}
			return len(got) >= len(want)
		})
		for _, w := range want {
			if !got[w] {
				t.Fatalf("answers %v, want %v", got, want)
			}
		}
	}
	seen("a", "b")
	if lj := listenerJSON(t, srv, "app"); lj.Discovery != "dns" || !lj.DiscoveryOK || len(lj.Targets) != 2 {
		t.Fatalf("targets: discovery %q ok %v, %d targets", lj.Discovery, lj.DiscoveryOK, len(lj.Targets))
	}

	// The records change: a leaves, c comes. Within one TTL (1 s) and a
	// health rise, c answers; a is never dialled once it is out.
	changed := time.Now()
	z.Set("app.test", "app.test. 1 IN A 127.0.0.3", "app.test. 1 IN A 127.0.0.4")
	testenv.Eventually(t, "a out of the targets", 5*time.Second, func() bool {
		return targetState(t, srv, "app", bs[0].Addr) == "absent"
	})
	hitsA := bs[0].Hits.Load()
	seen("b", "c")
	t.Logf("DNS change to routed: %v", time.Since(changed))
	for range 20 {
		if _, err := request(addr); err != nil {
			t.Fatal(err)
		}
	}
	if n := bs[0].Hits.Load(); n != hitsA {
		t.Fatalf("a answered %d requests after it left DNS", n-hitsA)
	}

	// The resolver fails: the set stays, routing goes on, the API says so.
	z.SetMode("servfail")
	testenv.Eventually(t, "the failure reported", 5*time.Second, func() bool {
		lj := listenerJSON(t, srv, "app")
		return !lj.DiscoveryOK && strings.Contains(lj.DiscoveryError, "SERVFAIL")
	})
	for range 20 {
		if s, err := request(addr); err != nil || (s != "b" && s != "c") {
			t.Fatalf("through a failing resolver: %q, %v", s, err)
		}
	}
	z.SetMode("")
	testenv.Eventually(t, "discovery ok again", 5*time.Second, func() bool { return listenerJSON(t, srv, "app").DiscoveryOK })
}

// listenerJSON is the listener's entry of /api/v1/targets.
func listenerJSON(t *testing.T, srv *server.Server, name string) admin.ListenerJSON {
	t.Helper()
	for _, l := range targets(t, srv).Listeners {
		if l.Name == name {
			return l
		}
	}
	t.Fatalf("no listener %s in /api/v1/targets", name)
	return admin.ListenerJSON{}
}

// A static entry that is a host name is every address the system's
// resolver gives it (here the hosts file's localhost), each a target of
// its own with its own health, not one target resolved per dial.
func TestStaticNameIsEveryAddress(t *testing.T) {
	b := startBackend(t, "a")
	_, port, _ := net.SplitHostPort(b.Addr)
	cfg := config.Default()
	cfg.Admin.Listen = ""
	l := fastListener("app", "localhost:"+port)
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	testenv.Eventually(t, "127.0.0.1 up", 5*time.Second, func() bool {
		return targetState(t, srv, "app", b.Addr) == "up"
	})
	for _, tg := range listenerJSON(t, srv, "app").Targets {
		if ip, _, _ := net.SplitHostPort(tg.Addr); net.ParseIP(ip) == nil {
			t.Errorf("target %q: a name, not one of its addresses", tg.Addr)
		}
	}
	if s, err := request(proxyAddr(t, srv, "app")); err != nil || s != "a" {
		t.Fatalf("request: %q, %v", s, err)
	}
}
