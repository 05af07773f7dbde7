package server_test

import (
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/rota-proxy/rota/admin"
	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
)

// discovery: kubernetes against a real API server, the backends real
// servers in a network namespace of the test's (Kubernetes refuses
// loopback endpoints), under client load: a Service of two slices (3 + 2
// endpoints) is five targets; an endpoint turning not ready leaves; a
// terminating one is drained (its open connection kept and served, no new
// ones) and then removed; a deleted slice's endpoints leave; a new
// endpoint is routed; the port is chosen by its name; the API server
// stopped for 10 s leaves the last set serving, and changes flow once it
// is back. No client fails.
func TestKubernetesDiscoveryUnderLoad(t *testing.T) {
	ns := testenv.StartNetNS(t, 6)
	var bs []*testenv.Backend
	for i, a := range ns.Addrs {
		ln := ns.Listen(t, net.JoinHostPort(a, "8080"))
		bs = append(bs, testenv.StartBackendOn(t, fmt.Sprintf("b%d", i), ln))
	}
	addr := func(i int) string { return net.JoinHostPort(ns.Addrs[i], "8080") }
	ep := func(i int, state string) testenv.Endpoint { return testenv.Endpoint{Addr: ns.Addrs[i], State: state} }

	etcd := testenv.StartEtcd(t)
	api := testenv.StartKubeAPI(t, etcd.Endpoints()[0], nil)
	cs := api.Client(t)
	v4 := discoveryv1.AddressTypeIPv4
	testenv.PutEndpointSlice(t, cs, "default", "web", "web-a", v4, ep(0, "ready"), ep(1, "ready"), ep(2, "ready"))
	testenv.PutEndpointSlice(t, cs, "default", "web", "web-b", v4, ep(3, "ready"), ep(4, "ready"))

	cfg := config.Default()
	cfg.Admin.Listen = ""
	cfg.Registries.Kubernetes.Kubeconfig = api.Kubeconfig(t, "", "default")
	l := fastListener("web")
	l.Discovery, l.Static, l.Service, l.Port = "kubernetes", nil, "web", config.Port{Name: "http"}
	l.Retries = 3
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	proxy := proxyAddr(t, srv, "web")

	testenv.Eventually(t, "five targets up", 30*time.Second, func() bool { return liveCount(srv, "web") == 5 })
	load := testenv.StartLoad(4, 1_000_000, func(int) (string, error) { return testenv.Request(proxy) })
	defer load.Stop()
	served := func(i int) int64 { return load.Count(bs[i].Name) }
	testenv.Eventually(t, "all five serve", 20*time.Second, func() bool {
		for i := range 5 {
			if served(i) == 0 {
				return false
			}
		}
		return true
	})

	// Not ready: out.
	testenv.PutEndpointSlice(t, cs, "default", "web", "web-a", v4, ep(0, "ready"), ep(1, "not-ready"), ep(2, "ready"))
	testenv.Eventually(t, "the not-ready endpoint out", 10*time.Second, func() bool { return targetState(t, srv, "web", addr(1)) == "absent" })

	// Terminating: drained. Connections opened first (not yet sent on)
	// and held: one in four of them, give or take the load's, reach b2.
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for range 40 {
		c, err := net.Dial("tcp", proxy)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	testenv.PutEndpointSlice(t, cs, "default", "web", "web-a", v4, ep(0, "ready"), ep(1, "not-ready"), ep(2, "terminating"))
	testenv.Eventually(t, "the terminating endpoint drained", 10*time.Second, func() bool {
		tg, ok := findTarget(t, srv, "web", addr(2))
		return ok && tg.Draining && tg.DrainSource == "registry"
	})
	before, total := bs[2].Hits.Load(), load.OK.Load()
	testenv.Eventually(t, "200 requests more", 20*time.Second, func() bool { return load.OK.Load() >= total+200 })
	if n := bs[2].Hits.Load() - before; n != 0 {
		t.Fatalf("%d new connections reached the drained endpoint", n)
	}
	answers := map[string]int{}
	for _, c := range held {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
			t.Fatalf("held connection: %v", err)
		}
		b, err := io.ReadAll(c)
		if err != nil || len(b) == 0 {
			t.Fatalf("held connection: %q, %v", b, err)
		}
		answers[string(b)]++
	}
	if answers["b2"] == 0 {
		t.Fatalf("the drained endpoint's open connections were not served: %v", answers)
	}
	testenv.PutEndpointSlice(t, cs, "default", "web", "web-a", v4, ep(0, "ready"), ep(1, "not-ready"))
	testenv.Eventually(t, "the terminated endpoint removed", 10*time.Second, func() bool { return targetState(t, srv, "web", addr(2)) == "absent" })

	// A slice deleted: its endpoints out.
	testenv.DeleteEndpointSlice(t, cs, "default", "web-b")
	testenv.Eventually(t, "the deleted slice's endpoints out", 10*time.Second, func() bool {
		return targetState(t, srv, "web", addr(3)) == "absent" && targetState(t, srv, "web", addr(4)) == "absent"
	})
	// A new endpoint: routed.
	testenv.PutEndpointSlice(t, cs, "default", "web", "web-c", v4, ep(5, "ready"))
	testenv.Eventually(t, "the new endpoint serves", 10*time.Second, func() bool { return served(5) > 0 })

	// The API server gone for 10 s: the last set serves, and discovery
	// says it fails; back, changes flow again.
	pool := func() admin.ListenerJSON {
		for _, l := range targets(t, srv).Listeners {
			if l.Name == "web" {
				return l
			}
		}
		t.Fatal("no listener web")
		return admin.ListenerJSON{}
	}
	api.Stop()
	down, okBefore := time.Now(), load.OK.Load()
	testenv.Eventually(t, "discovery failing", 10*time.Second, func() bool {
		p := pool()
		return !p.DiscoveryOK && strings.Contains(p.DiscoveryError, "kubernetes: ")
	})
	time.Sleep(time.Until(down.Add(10 * time.Second))) // the outage's length is what is tested
	if n := load.OK.Load() - okBefore; n < 50 {
		t.Fatalf("%d requests served in a 10 s API server outage", n)
	}
	if got := liveCount(srv, "web"); got != 2 {
		t.Fatalf("%d live targets after the outage, want the last set's 2", got)
	}
	api.Start()
	testenv.PutEndpointSlice(t, cs, "default", "web", "web-c", v4, ep(5, "ready"), ep(3, "ready"))
	testenv.Eventually(t, "a change after the outage serves", 30*time.Second, func() bool { return served(3) > 0 })
	testenv.PutEndpointSlice(t, cs, "default", "web", "web-c", v4, ep(5, "ready"))
	testenv.Eventually(t, "discovery recovered", 10*time.Second, func() bool {
		return pool().DiscoveryOK && targetState(t, srv, "web", addr(3)) == "absent"
	})

	load.Stop()
	load.AssertNoFailures(t)
	var got []string
	for _, l := range targets(t, srv).Listeners {
		for _, tg := range l.Targets {
			got = append(got, tg.Addr)
		}
	}
	slices.Sort(got)
	if want := []string{addr(0), addr(5)}; strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("targets %v, want %v", got, want)
	}
	t.Logf("%d requests through the changes, none failed", load.OK.Load())
}
