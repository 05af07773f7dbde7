package server_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/rota-proxy/rota/internal/testenv"

	"github.com/rota-proxy/rota/admin"
	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/server"
)

func TestSequentialSpreadThroughServer(t *testing.T) {
	b1, b2, b3 := startBackend(t, "b1"), startBackend(t, "b2"), startBackend(t, "b3")
	cfg := config.Default()
	cfg.Listeners = []config.Listener{fastListener("web", names(b1, b2, b3)...)}
	srv := startServer(t, cfg)
	testenv.Eventually(t, "three live targets", 5*time.Second, func() bool { return liveCount(srv, "web") == 3 })
	addr := proxyAddr(t, srv, "web")
	count := map[string]int{}
	for range 99 {
		ans, err := request(addr)
		if err != nil {
			t.Fatal(err)
		}
		count[ans]++
	}
	if count["b1"] != 33 || count["b2"] != 33 || count["b3"] != 33 {
		t.Fatalf("spread %v, want 33 each", count)
	}
}

func TestBackendKilledUnderLoad(t *testing.T) {
	b1, b2, b3 := startBackend(t, "b1"), startBackend(t, "b2"), startBackend(t, "b3")
	cfg := config.Default()
	l := fastListener("web", names(b1, b2, b3)...)
	// The requests are idempotent: one the killed backend had taken (its
	// socket reset before answering) goes to the next backend.
	l.ReplayOnReset = true
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	testenv.Eventually(t, "three live targets", 5*time.Second, func() bool { return liveCount(srv, "web") == 3 })
	addr := proxyAddr(t, srv, "web")

	ld := startLoad(t, addr, 8)
	testenv.Eventually(t, "traffic on b2", 10*time.Second, func() bool { return ld.Count("b2") > 50 })
	b2.Kill()
	took := testenv.Eventually(t, "b2 down in /api/v1/targets", 5*time.Second, func() bool {
		return targetState(t, srv, "web", b2.Addr) == "down"
	})
	t.Logf("killed backend shown down after %v", took)
	// Traffic keeps flowing over the survivors.
	before := ld.OK.Load()
	testenv.Eventually(t, "more traffic after the kill", 10*time.Second, func() bool { return ld.OK.Load() > before+200 })

	hitsWhileDown := b2.Hits.Load()
	b2.Revive(t)
	took = testenv.Eventually(t, "b2 back up", 10*time.Second, func() bool { return targetState(t, srv, "web", b2.Addr) == "up" })
	t.Logf("revived backend up again after %v", took)
	for _, tg := range targets(t, srv).Listeners[0].Targets {
		if tg.Addr == b2.Addr && tg.ConsecutiveSuccesses < cfg.Listeners[0].Health.Rise {
			t.Fatalf("b2 up after %d successes, want rise=%d", tg.ConsecutiveSuccesses, cfg.Listeners[0].Health.Rise)
		}
	}
	testenv.Eventually(t, "traffic on the revived b2", 10*time.Second, func() bool { return b2.Hits.Load() > hitsWhileDown+20 })
	ld.Stop()
	ld.AssertNoFailures(t)
	t.Logf("%d client connections, none failed", ld.OK.Load())
}

func TestPanicModeRoutesWhenEveryCheckFails(t *testing.T) {
	// The targets answer clients but fail their HTTP checks (they are not
	// HTTP servers): without panic mode nobody is served, with it everyone is.
	b1, b2 := startBackend(t, "b1"), startBackend(t, "b2")
	l := fastListener("web", names(b1, b2)...)
	l.Health.Check = "http"
	cfg := config.Default()
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	addr := proxyAddr(t, srv, "web")
	testenv.Eventually(t, "both targets down", 5*time.Second, func() bool {
		return targetState(t, srv, "web", b1.Addr) == "down" && targetState(t, srv, "web", b2.Addr) == "down"
	})
	if _, err := request(addr); err == nil {
		t.Fatal("a client was served with every target down and panic off")
	}

	next := *cfg
	pl := l
	pl.Panic = true
	next.Listeners = []config.Listener{pl}
	if err := srv.Reload(context.Background(), &next); err != nil {
		t.Fatal(err)
	}
	if !srv.Status()[0].Panic {
		t.Fatal("panic mode not reported in status")
	}
	if !targets(t, srv).Listeners[0].Panic {
		t.Fatal("panic mode not reported in /api/v1/targets")
	}
	for range 4 {
		if _, err := request(addr); err != nil {
			t.Fatalf("panic mode: %v", err)
		}
	}
}

func TestReadyAfterFirstSync(t *testing.T) {
	b1 := startBackend(t, "b1")
	cfg := config.Default()
	cfg.Listeners = []config.Listener{fastListener("web", b1.Addr)}
	srv := startServer(t, cfg)
	h := (&admin.Handler{State: srv}).Routes()
	testenv.Eventually(t, "/readyz 200", 5*time.Second, func() bool {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, loopbackRequest(http.MethodGet, "/readyz", nil))
		return rec.Code == http.StatusOK
	})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, loopbackRequest(http.MethodGet, "/healthz", nil))
	if rec.Code != http.StatusOK || rec.Body.String() != "ok\n" {
		t.Fatalf("/healthz: %d %q", rec.Code, rec.Body)
	}
}

func TestStartFailsCleanlyOnBusyAddress(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	cfg := config.Default()
	a := fastListener("a", "127.0.0.1:1")
	b := fastListener("b", "127.0.0.1:1")
	b.Listen = busy.Addr().String()
	cfg.Listeners = []config.Listener{a, b}
	if _, err := startServerErr(cfg); err == nil {
		t.Fatal("Start succeeded on a busy address")
	}
	// goleak in TestMain proves listener a and its goroutines were undone.
}

func TestReloadUnderLoadLosesNothing(t *testing.T) {
	b1, b2, b3 := startBackend(t, "b1"), startBackend(t, "b2"), startBackend(t, "b3")
	cfg := config.Default()
	web := fastListener("web", names(b1, b2)...)
	cfg.Listeners = []config.Listener{web}
	srv := startServer(t, cfg)
	addr := proxyAddr(t, srv, "web")
	testenv.Eventually(t, "two live targets", 5*time.Second, func() bool { return liveCount(srv, "web") == 2 })
	since := targetSince(srv, b1.Addr)

	ld := startLoad(t, addr, 6)
	for i := range 10 {
		next := *cfg
		w := web
		// Alternate settings and the target list, and add/remove a second
		// listener, as an operator editing the file would.
		w.Retries = 2 + i%2
		w.Health.Interval = time.Duration(40+10*(i%3)) * time.Millisecond
		if i%2 == 1 {
			w.Static = config.Statics(names(b1, b2, b3)...)
		}
		next.Listeners = []config.Listener{w}
		if i%3 == 0 && i < 9 {
			next.Listeners = append(next.Listeners, fastListener(fmt.Sprintf("extra-%d", i), b3.Addr))
		}
		before := ld.OK.Load()
		if err := srv.Reload(context.Background(), &next); err != nil {
			t.Fatalf("reload %d: %v", i, err)
		}
		testenv.Eventually(t, "traffic after reload", 10*time.Second, func() bool { return ld.OK.Load() > before+20 })
	}
	ld.Stop()
	ld.AssertNoFailures(t)
	st := srv.Status()
	if len(st) != 1 || st[0].Name != "web" {
		t.Fatalf("listeners after reloads: %+v", st)
	}
	if got := targetSince(srv, b1.Addr); !got.Equal(since) {
		t.Fatalf("health state of an unchanged target was reset (up since %v, was %v)", got, since)
	}
	t.Logf("%d client connections across 10 reloads, none failed", ld.OK.Load())
}

func targetSince(srv *server.Server, addr string) time.Time {
	for _, tg := range srv.Status()[0].Targets {
		if tg.Addr == addr {
			return tg.Health.Since
		}
	}
	return time.Time{}
}

func TestReloadRejectsUnbindableAndKeepsRunning(t *testing.T) {
	b1 := startBackend(t, "b1")
	cfg := config.Default()
	cfg.Listeners = []config.Listener{fastListener("web", b1.Addr)}
	srv := startServer(t, cfg)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	next := *cfg
	extra := fastListener("extra", b1.Addr)
	extra.Listen = busy.Addr().String()
	next.Listeners = []config.Listener{cfg.Listeners[0], extra}
	if err := srv.Reload(context.Background(), &next); err == nil {
		t.Fatal("reload onto a busy address succeeded")
	}
	if st := srv.Status(); len(st) != 1 || srv.Config() != cfg {
		t.Fatalf("running config changed after a rejected reload: %d listeners", len(st))
	}
	testenv.Eventually(t, "target up", 5*time.Second, func() bool { return liveCount(srv, "web") == 1 })
	if _, err := request(proxyAddr(t, srv, "web")); err != nil {
		t.Fatalf("listener broken after a rejected reload: %v", err)
	}
}

func TestReloadMovesListenerKeepingOpenConnections(t *testing.T) {
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	cfg := config.Default()
	cfg.Listeners = []config.Listener{fastListener("web", echo.Addr().String())}
	srv := startServer(t, cfg)
	testenv.Eventually(t, "target up", 5*time.Second, func() bool { return liveCount(srv, "web") == 1 })
	oldAddr := proxyAddr(t, srv, "web")
	open, err := net.Dial("tcp", oldAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	ping := func(c net.Conn) error {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		b := make([]byte, 4)
		_, err := io.ReadFull(c, b)
		return err
	}
	if err := ping(open); err != nil {
		t.Fatal(err)
	}

	busy, _ := net.Listen("tcp", "127.0.0.1:0")
	newAddr := busy.Addr().String()
	busy.Close()
	next := *cfg
	moved := cfg.Listeners[0]
	moved.Listen = newAddr
	next.Listeners = []config.Listener{moved}
	if err := srv.Reload(context.Background(), &next); err != nil {
		t.Fatal(err)
	}
	if got := proxyAddr(t, srv, "web"); got != newAddr {
		t.Fatalf("listener at %s after the move, want %s", got, newAddr)
	}
	c, err := net.Dial("tcp", newAddr)
	if err != nil {
		t.Fatalf("new address: %v", err)
	}
	defer c.Close()
	if err := ping(c); err != nil {
		t.Fatalf("through the new address: %v", err)
	}
	if err := ping(open); err != nil {
		t.Fatalf("a connection opened before the move was cut: %v", err)
	}
	if c, err := net.DialTimeout("tcp", oldAddr, time.Second); err == nil {
		c.Close()
		t.Fatal("the old address still accepts")
	}
}
