package admin_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/rota-proxy/rota/admin"
	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/server"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodGet, path, nil)
	req.Host = "127.0.0.1:9090" // the admin API answers a loopback host only, without a token
	h.ServeHTTP(rec, req)
	return rec.Code, rec.Body.String()
}

func TestMetricsFollowTargets(t *testing.T) {
	a, b := testenv.Greeter(t, "x"), testenv.Greeter(t, "x")
	cfg := config.Default()
	l := config.DefaultListener()
	l.Name, l.Listen, l.Discovery, l.Static = "web", "127.0.0.1:0", "static", config.Statics(a, b)
	l.Health.Interval = 50 * time.Millisecond
	cfg.Listeners = []config.Listener{l}
	srv, err := server.Start(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown(context.Background())
	h := (&admin.Handler{State: srv, Version: "test"}).Routes()

	deadline := time.Now().Add(10 * time.Second)
	for {
		_, body := get(t, h, "/metrics")
		if strings.Contains(body, `rota_target_up{listener="web",route="",target="`+a+`"} 1`) &&
			strings.Contains(body, `rota_target_up{listener="web",route="",target="`+b+`"} 1`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("targets never reported up:\n%s", body)
		}
		time.Sleep(10 * time.Millisecond)
	}
	c, err := net.Dial("tcp", srv.Addr("web").String())
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(c)
	c.Close()

	code, body := get(t, h, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	for _, want := range []string{
		`rota_connections_total{listener="web"} 1`,
		`rota_connections_active{listener="web"}`,
		`rota_dial_errors_total{listener="web",route="",target="` + a + `"} 0`,
		`rota_bytes_total{direction="in",listener="web"} 1`,
		`rota_bytes_total{direction="out",listener="web"} 0`,
		`rota_health_checks_total{listener="web",result="success",route="",target="` + a + `"}`,
		`rota_health_checks_total{listener="web",result="failure",route="",target="` + a + `"} 0`,
		`rota_discovery_updates_total{listener="web",route=""} 1`,
		`rota_discovery_errors_total{listener="web",route=""} 0`,
		`rota_discovery_last_sync_timestamp_seconds{listener="web",route=""}`,
		`rota_panic_mode{listener="web",route=""} 0`,
		`rota_proxy_protocol_errors_total{listener="web"} 0`,
		`rota_relay_panics_total{listener="web"} 0`,
		`rota_build_info{version="test"} 1`,
		`go_goroutines`,
		`process_resident_memory_bytes`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	// A target no longer discovered loses its series.
	next := *cfg
	nl := l
	nl.Static = config.Statics(a)
	next.Listeners = []config.Listener{nl}
	if err := srv.Reload(context.Background(), &next); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		_, body = get(t, h, "/metrics")
		if !strings.Contains(body, `target="`+b+`"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("series of removed target %s still exported", b)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(body, `target="`+a+`"`) {
		t.Fatalf("series of kept target %s missing", a)
	}
}

func TestStatusPageIsSelfContained(t *testing.T) {
	cfg := config.Default()
	l := config.DefaultListener()
	l.Name, l.Listen, l.Discovery, l.Static = "web", "127.0.0.1:0", "static", config.Statics(testenv.Greeter(t, "x"))
	cfg.Listeners = []config.Listener{l}
	srv, err := server.Start(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown(context.Background())
	h := (&admin.Handler{State: srv, Version: "<v1>"}).Routes()
	code, body := get(t, h, "/")
	if code != http.StatusOK || !strings.Contains(body, "/api/v1/targets") {
		t.Fatalf("/: %d", code)
	}
	// The SVG namespace is a name, never fetched.
	page := strings.ReplaceAll(body, `"http://www.w3.org/2000/svg"`, "")
	for _, bad := range []string{"http://", "https://", "<v1>"} {
		if strings.Contains(page, bad) {
			t.Errorf("status page contains %q: it must fetch nothing from outside and escape the version", bad)
		}
	}
	if code, _ := get(t, h, "/nope"); code != http.StatusNotFound {
		t.Errorf("/nope: %d, want 404", code)
	}
}
