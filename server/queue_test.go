package server_test

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rota-proxy/rota/admin"
	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
)

// max_conns_per_target and queue from the configuration: over the cap
// clients wait (the admin API and /metrics show the queue), the overflow
// is closed and counted as max_conns, and the waiting are served once
// places come free. The targets' health checks take no place.
func TestQueueFromConfig(t *testing.T) {
	addr0, open, release := holdingBackend(t)
	cfg := config.Default()
	cfg.Admin.Listen = ""
	l := fastListener("q", addr0)
	l.MaxConnsPerTarget = 2
	l.Queue = config.Queue{Size: 3, Timeout: 20 * time.Second}
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	testenv.Eventually(t, "live", 5*time.Second, func() bool { return liveCount(srv, "q") == 1 })
	addr := proxyAddr(t, srv, "q")

	var served, refused atomic.Int64
	var clients sync.WaitGroup
	for range 7 {
		clients.Go(func() {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(20 * time.Second))
			io.WriteString(c, "hello\n")
			got, _ := io.ReadAll(c)
			if string(got) == "served" {
				served.Add(1)
			} else {
				refused.Add(1)
			}
		})
	}
	queueLen := func() int {
		for _, l := range targets(t, srv).Listeners {
			if l.Name == "q" && l.Queue != nil {
				return l.Queue.Length
			}
		}
		return -1
	}
	testenv.Eventually(t, "2 held, 3 queued, 2 refused", 10*time.Second, func() bool {
		return open.Load() == 2 && queueLen() == 3 && refused.Load() == 2
	})
	h := (&admin.Handler{State: srv}).Routes()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, loopbackRequest(http.MethodGet, "/metrics", nil))
	if want := `rota_queue_length{listener="q",route=""} 3`; !strings.Contains(rec.Body.String(), want) {
		t.Errorf("/metrics lacks %s", want)
	}
	if n := status(t, srv, "q").Count("ended_conns", "max_conns"); n != 2 {
		t.Errorf("ended max_conns = %d, want 2", n)
	}

	release()
	clients.Wait()
	if served.Load() != 5 || refused.Load() != 2 {
		t.Fatalf("served %d, refused %d; want 5 and 2", served.Load(), refused.Load())
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, loopbackRequest(http.MethodGet, "/metrics", nil))
	for _, want := range []string{`rota_queue_length{listener="q",route=""} 0`, `rota_queue_wait_seconds_count{listener="q",route=""} 3`} {
		if !strings.Contains(rec.Body.String(), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// holdingBackend serves each client that sends a line once release is
// called (at the latest when the test ends); open counts those it holds.
// Health checks (no line) take none.
func holdingBackend(t *testing.T) (addr string, open *atomic.Int64, release func()) {
	open = new(atomic.Int64)
	ch := make(chan struct{})
	addr = testenv.Serve(t, func(c net.Conn) {
		defer c.Close()
		if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
			return // a health check
		}
		open.Add(1)
		<-ch
		io.WriteString(c, "served")
	})
	release = sync.OnceFunc(func() { close(ch) })
	t.Cleanup(release) // before Serve's, which waits for the handlers
	return addr, open, release
}

// A reload that raises max_conns_per_target serves the clients waiting at
// once: the new picker's room wakes them.
func TestQueueReloadRaisesTheCap(t *testing.T) {
	addr0, open, release := holdingBackend(t)
	defer release() // before the server's shutdown drains its clients
	cfg := config.Default()
	cfg.Admin.Listen = ""
	l := fastListener("q", addr0)
	l.MaxConnsPerTarget = 1
	l.Queue = config.Queue{Size: 10, Timeout: 30 * time.Second}
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	testenv.Eventually(t, "live", 5*time.Second, func() bool { return liveCount(srv, "q") == 1 })
	addr := proxyAddr(t, srv, "q")
	for range 3 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "hello\n")
	}
	testenv.Eventually(t, "1 held, 2 queued", 10*time.Second, func() bool {
		return open.Load() == 1 && status(t, srv, "q").Queue.Length() == 2
	})
	next := *cfg
	l.MaxConnsPerTarget = 3
	next.Listeners = []config.Listener{l}
	if err := srv.Reload(context.Background(), &next); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "3 held, none queued", 10*time.Second, func() bool {
		return open.Load() == 3 && status(t, srv, "q").Queue.Length() == 0
	})
}
