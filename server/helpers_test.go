package server_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/rota-proxy/rota/admin"
	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/server"

	"github.com/rota-proxy/rota/internal/testenv"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// etcd's client keeps a resolver goroutine for a moment after Close.
		goleak.IgnoreTopFunction("google.golang.org/grpc/internal/grpcsync.(*CallbackSerializer).run"),
		goleak.IgnoreTopFunction("go.opencensus.io/stats/view.(*worker).start"),
	)
}

// backend is testenv's killable backend: it answers each request line with
// its name.
type backend = testenv.Backend

func startBackend(t *testing.T, name string) *backend { return testenv.StartBackend(t, name) }

// request makes one client connection through addr and returns the answer.
func request(addr string) (string, error) { return testenv.Request(addr) }

// startLoad runs workers making back-to-back requests through addr until
// the test ends (or Stop), at most 20,000 each.
func startLoad(t *testing.T, addr string, workers int) *testenv.Load {
	t.Helper()
	l := testenv.StartLoad(workers, 20000, func(int) (string, error) { return request(addr) })
	t.Cleanup(l.Stop)
	return l
}

// fastListener is a static listener on an ephemeral port with quick checks.
func fastListener(name string, addrs ...string) config.Listener {
	l := config.DefaultListener()
	l.Name, l.Listen, l.Discovery, l.Static = name, "127.0.0.1:0", "static", config.Statics(addrs...)
	l.Health.Interval = 50 * time.Millisecond
	l.Health.Timeout = 500 * time.Millisecond
	l.Health.BackoffMax = 200 * time.Millisecond
	l.Health.Rise, l.Health.Fall = 2, 2
	l.DrainTimeout = 2 * time.Second
	l.Retries = 2
	return l
}

func startServer(t *testing.T, cfg *config.Config) *server.Server {
	t.Helper()
	srv, err := server.Start(context.Background(), cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return srv
}

func proxyAddr(t *testing.T, srv *server.Server, name string) string {
	t.Helper()
	a := srv.Addr(name)
	if a == nil {
		t.Fatalf("no listener %q", name)
	}
	return a.String()
}

// targets fetches /api/v1/targets through the admin handler, as a user would.
func targets(t *testing.T, srv *server.Server) admin.TargetsResponse {
	t.Helper()
	h := (&admin.Handler{State: srv}).Routes()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, loopbackRequest(http.MethodGet, "/api/v1/targets", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("/api/v1/targets: %d %s", rec.Code, rec.Body)
	}
	var resp admin.TargetsResponse
	if err := json.Unmarshal(rec.Body.Bytes(), &resp); err != nil {
		t.Fatalf("/api/v1/targets: %v", err)
	}
	return resp
}

// findTarget is listener's target addr in /api/v1/targets.
func findTarget(t *testing.T, srv *server.Server, listener, addr string) (admin.TargetJSON, bool) {
	t.Helper()
	for _, l := range targets(t, srv).Listeners {
		if l.Name != listener {
			continue
		}
		for _, tg := range l.Targets {
			if tg.Addr == addr {
				return tg, true
			}
		}
	}
	return admin.TargetJSON{}, false
}

// targetState is a target's state, "absent" when it is not listed.
func targetState(t *testing.T, srv *server.Server, listener, addr string) string {
	t.Helper()
	if tg, ok := findTarget(t, srv, listener, addr); ok {
		return tg.State
	}
	return "absent"
}

// targetStatus is a target's last_error ("" when it has none or is
// absent).
func targetStatus(t *testing.T, srv *server.Server, listener, addr string) string {
	t.Helper()
	tg, _ := findTarget(t, srv, listener, addr)
	return tg.LastError
}

// liveCount is how many of listener's targets pass their checks once the
// published pickers agree (-1 while they do not yet: a target turns up in
// the checker a moment before the pool publishes it, and a connection
// made in between finds no live target), -1 too for no such listener.
func liveCount(srv *server.Server, listener string) int {
	n := healthUp(srv, listener)
	if n != srv.Routed(listener) {
		return -1
	}
	return n
}

// healthUp is how many of listener's targets pass their checks.
func healthUp(srv *server.Server, listener string) int {
	for _, l := range srv.Status() {
		if l.Name == listener {
			n := 0
			pools := []server.PoolStatus{l.PoolStatus}
			for _, r := range l.Routes {
				pools = append(pools, r.PoolStatus)
			}
			for _, p := range pools {
				for _, t := range p.Targets {
					if t.Health.State.String() == "up" {
						n++
					}
				}
			}
			return n
		}
	}
	return -1
}

func names(bs ...*backend) []string {
	out := make([]string, len(bs))
	for i, b := range bs {
		out[i] = b.Addr
	}
	return out
}

func startServerErr(cfg *config.Config) (*server.Server, error) {
	srv, err := server.Start(context.Background(), cfg, nil)
	if err == nil {
		srv.Shutdown(context.Background())
	}
	return srv, err
}

// loopbackRequest is an admin request as a local client sends it: for a
// loopback host, which the admin API requires when it has no token.
func loopbackRequest(method, path string, body io.Reader) *http.Request {
	r := httptest.NewRequest(method, path, body)
	r.Host = "127.0.0.1:9090"
	return r
}

// prefixes reads client CIDRs as the configuration file does.
func prefixes(t *testing.T, s ...string) []netip.Prefix {
	t.Helper()
	out := make([]netip.Prefix, len(s))
	for i, x := range s {
		p, err := config.ParsePrefix(x)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = p
	}
	return out
}
