package server_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rota-proxy/rota/admin"
	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/discovery/etcd"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/proxy"
	"github.com/rota-proxy/rota/server"
)

// splitOf makes n sequential requests through the listener and counts the
// answers.
func splitOf(t *testing.T, srv *server.Server, n int) map[string]int {
	t.Helper()
	addr := proxyAddr(t, srv, "web")
	got := map[string]int{}
	for range n {
		ans, err := request(addr)
		if err != nil {
			t.Fatalf("request: %v", err)
		}
		got[ans]++
	}
	return got
}

// waitSplit waits until n sequential requests split exactly as want.
func waitSplit(t *testing.T, srv *server.Server, what string, n int, want map[string]int) {
	t.Helper()
	var last map[string]int
	addr := proxyAddr(t, srv, "web")
	testenv.Eventually(t, what, 10*time.Second, func() bool {
		last = map[string]int{}
		for range n {
			ans, err := request(addr)
			if err != nil {
				return false
			}
			last[ans]++
		}
		for k, v := range want {
			if last[k] != v {
				return false
			}
		}
		return len(last) == len(want)
	})
}

// Consul's Weights.Passing sets the split, and a weight changed at run time
// applies without a reload.
func TestConsulWeights(t *testing.T) {
	agent := testenv.StartConsul(t)
	c := agent.Client(t)
	b1, b2 := startBackend(t, "b1"), startBackend(t, "b2")
	register := func(b *backend, w int) {
		host, port, _ := net.SplitHostPort(b.Addr)
		p, _ := strconv.Atoi(port)
		err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: b.Name, Name: "web", Address: host, Port: p,
			Weights: &api.AgentWeights{Passing: w, Warning: 1},
			Check:   &api.AgentServiceCheck{CheckID: "check-" + b.Name, TTL: "1h", Status: api.HealthPassing},
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	register(b1, 1)
	register(b2, 3)
	srv := startServer(t, consulConfig(agent.Addr()))
	waitSplit(t, srv, "a 1:3 split", 40, map[string]int{"b1": 10, "b2": 30})
	if w := weightOf(t, srv, b2.Addr); w != 3 {
		t.Fatalf("/api/v1/targets weight of b2 = %d, want 3", w)
	}
	register(b2, 1)
	waitSplit(t, srv, "a 1:1 split after the weight changed", 40, map[string]int{"b1": 20, "b2": 20})
}

// etcd's Metadata.weight sets the split, and a weight changed at run time
// applies without a reload.
func TestEtcdWeights(t *testing.T) {
	e := testenv.StartEtcd(t)
	c := e.Client(t)
	b1, b2 := startBackend(t, "b1"), startBackend(t, "b2")
	putWeight := func(b *backend, w int) {
		key, err := etcd.InstanceKey("", "web", b.Addr)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		val := fmt.Sprintf(`{"Op":0,"Addr":%q,"Metadata":{"weight":%d}}`, b.Addr, w)
		if _, err := c.Put(ctx, key, val); err != nil {
			t.Fatal(err)
		}
	}
	putWeight(b1, 2)
	putWeight(b2, 1)
	srv := startServer(t, etcdConfig(e))
	waitSplit(t, srv, "a 2:1 split", 30, map[string]int{"b1": 20, "b2": 10})
	putWeight(b1, 1)
	putWeight(b2, 4)
	waitSplit(t, srv, "a 1:4 split after the weights changed", 50, map[string]int{"b1": 10, "b2": 40})
}

func weightOf(t *testing.T, srv *server.Server, addr string) int {
	t.Helper()
	for _, l := range targets(t, srv).Listeners {
		for _, tj := range l.Targets {
			if tj.Addr == addr {
				return tj.Weight
			}
		}
	}
	t.Fatalf("no target %s", addr)
	return 0
}

// post sends an admin POST and returns the status code and body.
func post(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, loopbackRequest(http.MethodPost, path, nil))
	return rec.Code, rec.Body.String()
}

// Draining through the admin API takes a target out of the rotation while
// its open connections stay; the mark survives a reload; undraining puts it
// back. Unknown listeners and targets are 404s.
func TestDrainThroughAdminSurvivesReload(t *testing.T) {
	b1, b2 := startBackend(t, "b1"), startBackend(t, "b2")
	cfg := config.Default()
	cfg.Listeners = []config.Listener{fastListener("web", b1.Addr, b2.Addr)}
	srv := startServer(t, cfg)
	h := (&admin.Handler{State: srv}).Routes()
	exactly(t, srv, "b1 and b2 routed", "b1", "b2")

	// An open connection to b2, which the drain must leave alone.
	open := openTo(t, srv, b2.Addr)
	defer open.Close()

	if code, body := post(t, h, "/api/v1/listeners/web/targets/"+b2.Addr+"/drain"); code != http.StatusOK || !strings.Contains(body, `"draining": true`) {
		t.Fatalf("drain: %d %s", code, body)
	}
	if got := splitOf(t, srv, 10); got["b1"] != 10 {
		t.Fatalf("after the drain: %v, want every connection on b1", got)
	}
	if !draining(t, srv, b2.Addr) {
		t.Fatal("/api/v1/targets does not show b2 draining")
	}

	// A reload (a changed setting) keeps the mark.
	cfg2 := config.Default()
	l := fastListener("web", b1.Addr, b2.Addr)
	l.Retries = 1
	cfg2.Listeners = []config.Listener{l}
	if err := srv.Reload(context.Background(), cfg2); err != nil {
		t.Fatal(err)
	}
	if got := splitOf(t, srv, 10); got["b1"] != 10 {
		t.Fatalf("after a reload: %v, want every connection on b1 still", got)
	}

	if code, _ := post(t, h, "/api/v1/listeners/web/targets/"+b2.Addr+"/undrain"); code != http.StatusOK {
		t.Fatalf("undrain: %d", code)
	}
	if got := splitOf(t, srv, 10); got["b1"] != 5 || got["b2"] != 5 {
		t.Fatalf("after undrain: %v, want 5 and 5", got)
	}
	if draining(t, srv, b2.Addr) {
		t.Fatal("still shown draining after undrain")
	}
	// The connection opened before the drain was served throughout.
	open.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(open, "x")
	if ans, err := io.ReadAll(open); err != nil || string(ans) != "b2" {
		t.Fatalf("the connection open through drain and reload: %q, %v", ans, err)
	}

	for _, path := range []string{
		"/api/v1/listeners/nope/targets/" + b2.Addr + "/drain",
		"/api/v1/listeners/web/targets/127.0.0.1:1/drain",
	} {
		if code, body := post(t, h, path); code != http.StatusNotFound || !strings.Contains(body, "error") {
			t.Fatalf("POST %s: %d %s, want 404 with an error", path, code, body)
		}
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, loopbackRequest(http.MethodGet, "/api/v1/listeners/web/targets/"+b2.Addr+"/drain", nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Fatalf("GET drain: %d, want 405", rec.Code)
	}
}

// openTo opens a connection through the listener that reached the target
// at addr (nothing is sent, so it stays open).
func openTo(t *testing.T, srv *server.Server, addr string) net.Conn {
	t.Helper()
	active := func() map[string]int64 {
		m := map[string]int64{}
		for _, tj := range targets(t, srv).Listeners[0].Targets {
			m[tj.Addr] = tj.ActiveConns
		}
		return m
	}
	for range 10 {
		before := active()
		c, err := net.Dial("tcp", proxyAddr(t, srv, "web"))
		if err != nil {
			t.Fatal(err)
		}
		var got string
		testenv.Eventually(t, "the connection to reach a target", 5*time.Second, func() bool {
			for a, n := range active() {
				if n > before[a] {
					got = a
				}
			}
			return got != ""
		})
		if got == addr {
			return c
		}
		c.Close()
		testenv.Eventually(t, "the connection to close", 5*time.Second, func() bool { return active()[got] == before[got] })
	}
	t.Fatalf("no connection reached %s", addr)
	return nil
}

func draining(t *testing.T, srv *server.Server, addr string) bool {
	t.Helper()
	for _, l := range targets(t, srv).Listeners {
		for _, tj := range l.Targets {
			if tj.Addr == addr {
				return tj.Draining
			}
		}
	}
	t.Fatalf("no target %s", addr)
	return false
}

// With removed_conn_grace, a reload that removes a target closes its open
// connections after the grace (counted by reason), and leaves the others.
func TestRemovedConnGrace(t *testing.T) {
	b1, b2 := startBackend(t, "b1"), startBackend(t, "b2")
	cfg := config.Default()
	l := fastListener("web", b1.Addr, b2.Addr)
	l.RemovedConnGrace = proxy.Grace(200 * time.Millisecond)
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	exactly(t, srv, "b1 and b2 routed", "b1", "b2")
	gone := openTo(t, srv, b2.Addr)
	defer gone.Close()
	stays := openTo(t, srv, b1.Addr)
	defer stays.Close()

	cfg2 := config.Default()
	l2 := l
	l2.Static = config.Statics(b1.Addr)
	cfg2.Listeners = []config.Listener{l2}
	start := time.Now()
	if err := srv.Reload(context.Background(), cfg2); err != nil {
		t.Fatal(err)
	}
	gone.SetDeadline(time.Now().Add(10 * time.Second))
	if rest, err := io.ReadAll(gone); err != nil || len(rest) != 0 {
		t.Fatalf("the removed target's connection: %q, %v; want a clean EOF", rest, err)
	}
	if d := time.Since(start); d < 190*time.Millisecond {
		t.Fatalf("closed %v after the reload, before the grace", d)
	}
	gone.Close()
	if n := srv.Status()[0].Count("closed_conns", "removed"); n != 1 {
		t.Fatalf("closed for removed: %d, want 1", n)
	}
	stays.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(stays, "x")
	if ans, err := io.ReadAll(stays); err != nil || string(ans) != "b1" {
		t.Fatalf("the other connection: %q, %v", ans, err)
	}
}

// least_conn through the whole server: new connections go to the target
// with the fewest open ones, counted from connections really held open.
func TestLeastConnFollowsHeldConnections(t *testing.T) {
	bs := []*backend{startBackend(t, "a"), startBackend(t, "b"), startBackend(t, "c")}
	cfg := config.Default()
	cfg.Admin.Listen = ""
	l := fastListener("web", names(bs...)...)
	l.Balance = config.BalanceLeastConn
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	addr := proxyAddr(t, srv, "web")
	testenv.Eventually(t, "targets live", 5*time.Second, func() bool { return liveCount(srv, "web") == 3 })
	active := func() map[string]int64 {
		out := map[string]int64{}
		for _, tg := range status(t, srv, "web").Targets {
			out[tg.Addr] = tg.Active.Load()
		}
		return out
	}
	// hold opens a silent connection and returns the target it went to.
	hold := func() (net.Conn, string) {
		before := active()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		var to string
		testenv.Eventually(t, "the held connection counted", 5*time.Second, func() bool {
			for a, n := range active() {
				if n == before[a]+1 {
					to = a
					return true
				}
			}
			return false
		})
		return c, to
	}
	byTarget := map[string][]net.Conn{}
	for range 6 {
		c, to := hold()
		byTarget[to] = append(byTarget[to], c)
	}
	for _, b := range bs {
		if n := len(byTarget[b.Addr]); n != 2 {
			t.Fatalf("6 held connections over 3 targets: %s has %d, want 2 each (%v)", b.Name, n, active())
		}
	}
	// Free target a: the next two connections both go to it.
	for _, c := range byTarget[bs[0].Addr] {
		c.Close()
	}
	testenv.Eventually(t, "a's connections closed", 5*time.Second, func() bool { return active()[bs[0].Addr] == 0 })
	for i := range 2 {
		if _, to := hold(); to != bs[0].Addr {
			t.Fatalf("new connection %d went to %s; want %s, the one with the fewest open (%v)", i, to, bs[0].Addr, active())
		}
	}
}
