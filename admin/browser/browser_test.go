package browser_test

import (
	"context"
	"flag"
	"io"
	"net"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"go.uber.org/goleak"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/admin"
	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/server"

	"github.com/rota-proxy/rota/internal/testenv"
)

var updateScreenshot = flag.Bool("update-screenshot", false, "rewrite docs/status-page.png")

// chromium finds (installing on first use) the browser through
// scripts/chromium-bin. ROTA_SKIP_BROWSER=1 skips instead.
func chromium(t *testing.T) string {
	t.Helper()
	if os.Getenv("ROTA_SKIP_BROWSER") == "1" {
		t.Skip("ROTA_SKIP_BROWSER=1")
	}
	out, err := exec.Command("../../scripts/chromium-bin").Output()
	if err != nil {
		t.Fatalf("no browser for the status page test (scripts/chromium-bin: %v); set ROTA_SKIP_BROWSER=1 to skip", err)
	}
	return strings.TrimSpace(string(out))
}

// TestStatusPageInBrowser renders the status page in headless Chromium: it
// lists every target, and a target whose backend dies turns "down" on the
// page by itself, without a reload.
func TestStatusPageInBrowser(t *testing.T) {
	bin := chromium(t)
	live := testenv.Greeter(t, "x")
	dying, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dyingAddr := dying.Addr().String()
	go func() {
		for {
			c, err := dying.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	cfg := config.Default()
	l := config.DefaultListener()
	l.Name, l.Listen, l.Service, l.Discovery, l.Static = "web", "127.0.0.1:0", "web", "static", config.Statics(live, dyingAddr)
	l.Health.Interval, l.Health.Fall = 100*time.Millisecond, 1
	db := config.DefaultListener()
	db.Name, db.Listen, db.Discovery, db.Static = "db", "127.0.0.1:0", "static", config.Statics(testenv.Greeter(t, "x"))
	cfg.Listeners = []config.Listener{l, db}
	_, pageURL := statusPage(t, cfg)

	ctx := browser(t, bin, 1100, 560)

	row := func(addr, state string) string {
		return `section[data-listener="web"] tr[data-target="` + addr + `"] .state.` + state
	}
	err = chromedp.Do(ctx,
		chromedp.Navigate(pageURL),
		chromedp.WaitVisible(chromedp.CSS(row(live, "up"))),
		chromedp.WaitVisible(chromedp.CSS(row(dyingAddr, "up"))),
		chromedp.WaitVisible(chromedp.CSS(`section[data-listener="db"]`)),
	)
	if err != nil {
		t.Fatalf("page never showed both targets up: %v", err)
	}
	dying.Close()
	if err := chromedp.Do(ctx, chromedp.WaitVisible(chromedp.CSS(row(dyingAddr, "down")))); err != nil {
		t.Fatalf("the dead target never showed down on the page: %v", err)
	}
	text, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(`section[data-listener="web"] tr[data-target="`+dyingAddr+`"]`)))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text, "refused") {
		t.Errorf("the down target's row does not show its last error: %q", text)
	}
	saveScreenshot(t, ctx, "status-page.png")
}

// TestStatusPageBalance renders a weighted listener in Chromium: each row
// shows the weight, its share of the last minute's new connections beside
// its share of the weights, a rate line, and a drain button that drains
// (and then undrains) the target through the API.
func TestStatusPageBalance(t *testing.T) {
	bin := chromium(t)
	light, heavy := testenv.Greeter(t, "x"), testenv.Greeter(t, "x")
	cfg := config.Default()
	l := config.DefaultListener()
	l.Name, l.Listen, l.Discovery = "web", "127.0.0.1:0", "static"
	l.Static = []config.StaticTarget{{Addr: light, Weight: 1}, {Addr: heavy, Weight: 3}}
	l.Health.Interval = 100 * time.Millisecond
	cfg.Listeners = []config.Listener{l}
	srv, pageURL := statusPage(t, cfg)

	// 40 connections: 10 and 30, sampled into the history within a second.
	proxyAddr := srv.Status()[0].Addr
	testenv.Eventually(t, "both targets up", 15*time.Second, func() bool {
		st := srv.Status()[0]
		return len(st.Targets) == 2 && st.Targets[0].Health.State.String() == "up" && st.Targets[1].Health.State.String() == "up"
	})
	for range 40 {
		c, err := net.Dial("tcp", proxyAddr)
		if err != nil {
			t.Fatal(err)
		}
		io.ReadAll(c)
		c.Close()
	}
	testenv.Eventually(t, "the minute's history to hold the 40 connections", 15*time.Second, func() bool {
		var n uint64
		for _, tg := range srv.Status()[0].Targets {
			for _, k := range tg.History.Samples() {
				n += uint64(k)
			}
		}
		return n == 40
	})

	ctx := browser(t, bin, 1300, 400)

	row := func(addr string) string { return `section[data-listener="web"] tr[data-target="` + addr + `"]` }
	if err := chromedp.Do(ctx, chromedp.Navigate(pageURL), chromedp.WaitVisible(chromedp.CSS(row(heavy)+` svg.spark polyline`))); err != nil {
		t.Fatalf("page never showed the heavy target with its rate line: %v", err)
	}
	share := func(addr, which string) string {
		t.Helper()
		s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(row(addr)+` .p.`+which)))
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	if got, want := share(heavy, "got"), share(heavy, "want"); got != "75%" || want != "75%" {
		t.Errorf("the heavy target's shares: %s of new connections, %s of the weights; want 75%% and 75%%", got, want)
	}
	if got, want := share(light, "got"), share(light, "want"); got != "25%" || want != "25%" {
		t.Errorf("the light target's shares: %s and %s; want 25%% and 25%%", got, want)
	}

	if err := chromedp.Do(ctx,
		chromedp.Click(chromedp.CSS(row(heavy)+` button.act`)),
		chromedp.WaitVisible(chromedp.CSS(row(heavy)+` .badge`)),
	); err != nil {
		t.Fatalf("drain button: %v", err)
	}
	if tg := srv.Status()[0].Targets; !tg[0].Draining && !tg[1].Draining {
		t.Fatal("the page's drain button did not drain the target")
	}
	if want := share(light, "want"); want != "100%" {
		t.Errorf("with the heavy target drained, the light one's share of the weights: %s, want 100%%", want)
	}
	if err := chromedp.Do(ctx,
		chromedp.Click(chromedp.CSS(row(heavy)+` button.act`)),
		chromedp.WaitNotPresent(chromedp.CSS(row(heavy)+` .badge`)),
	); err != nil {
		t.Fatalf("undrain button: %v", err)
	}
	for _, tg := range srv.Status()[0].Targets {
		if tg.Draining {
			t.Fatalf("%s still draining after the undrain button", tg.Addr)
		}
	}
	saveScreenshot(t, ctx, "status-page-balance.png")
}

// statusPage starts a server for cfg and the admin handler over it, both
// stopped when the test ends, and returns the page's URL.
func statusPage(t *testing.T, cfg *config.Config) (*server.Server, string) {
	t.Helper()
	srv, err := server.Start(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Shutdown(context.Background()) })
	hs := httptest.NewServer((&admin.Handler{State: srv, Version: "test"}).Routes())
	t.Cleanup(hs.Close)
	return srv, hs.URL + "/"
}

// browser opens headless Chromium with a w x h window, closed when the
// test ends; what runs in it must finish within a minute.
func browser(t *testing.T, bin string, w, h int) context.Context {
	t.Helper()
	actx, acancel := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(bin), chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.NoFirstRun, chromedp.NoDefaultBrowserCheck, chromedp.WindowSize(w, h))
	t.Cleanup(acancel)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(cancel)
	ctx, tcancel := context.WithTimeout(ctx, 60*time.Second)
	t.Cleanup(tcancel)
	return ctx
}

// saveScreenshot writes the page to docs/name with -update-screenshot.
func saveScreenshot(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	if !*updateScreenshot {
		return
	}
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join("..", "..", "docs", name), png, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestStatusPageRoutes renders a listener that routes by TLS server name:
// listener -> route -> targets, each route with its names and its own
// table.
func TestStatusPageRoutes(t *testing.T) {
	bin := chromium(t)
	api, rest := testenv.Greeter(t, "x"), testenv.Greeter(t, "x")
	cfg := config.Default()
	l := config.DefaultListener()
	l.Name, l.Listen = "edge", "127.0.0.1:0"
	l.Discovery = ""
	l.Routes = []config.Route{
		{Name: "api", SNI: []string{"api.example.com", "*.api.example.com"}, Pool: config.DefaultPool()},
		{Name: "rest", SNI: []string{"*"}, Pool: config.DefaultPool()},
	}
	l.Routes[0].Discovery, l.Routes[0].Static = "static", config.Statics(api)
	l.Routes[1].Discovery, l.Routes[1].Static = "static", config.Statics(rest)
	for i := range l.Routes {
		l.Routes[i].Health.Interval = 100 * time.Millisecond
	}
	cfg.Listeners = []config.Listener{l}
	_, pageURL := statusPage(t, cfg)

	ctx := browser(t, bin, 1100, 420)
	route := func(name string) string { return `section[data-listener="edge"] .route[data-route="` + name + `"]` }
	err := chromedp.Do(ctx,
		chromedp.Navigate(pageURL),
		chromedp.WaitVisible(chromedp.CSS(route("api")+` tr[data-target="`+api+`"] .state.up`)),
		chromedp.WaitVisible(chromedp.CSS(route("rest")+` tr[data-target="`+rest+`"] .state.up`)),
	)
	if err != nil {
		t.Fatalf("the page never showed each route with its target up: %v", err)
	}
	head, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(route("api")+` .rhead`)))
	if err != nil || !strings.Contains(head, "api.example.com, *.api.example.com") {
		t.Fatalf("route header %q (%v) does not list its server names", head, err)
	}
	saveScreenshot(t, ctx, "status-page-routes.png")
}

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestStatusPageLastConnections: with an access log, each listener lists
// its last connections on the page (client, target, bytes, how it ended),
// so a user sees what happened without a log pipeline.
func TestStatusPageLastConnections(t *testing.T) {
	bin := chromium(t)
	cfg := config.Default()
	cfg.AccessLog = &accesslog.Config{Path: filepath.Join(t.TempDir(), "access.log"), Format: accesslog.JSON}
	l := config.DefaultListener()
	l.Name, l.Listen, l.Discovery, l.Static = "db", "127.0.0.1:0", "static", config.Statics(testenv.Greeter(t, "hello"))
	l.Health.Interval = 100 * time.Millisecond
	cfg.Listeners = []config.Listener{l}
	srv, pageURL := statusPage(t, cfg)
	testenv.Eventually(t, "db up", 15*time.Second, func() bool { return srv.Routed("db") == 1 })
	c, err := net.Dial("tcp", srv.Status()[0].Addr)
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(c) // the target greets and closes
	client := c.LocalAddr().String()
	c.Close()

	ctx := browser(t, bin, 1100, 560)
	row := `section[data-listener="db"] table.last tr[data-termination="target_closed"]`
	if err := chromedp.Do(ctx, chromedp.Navigate(pageURL), chromedp.WaitVisible(chromedp.CSS(row))); err != nil {
		t.Fatalf("the page never listed the connection: %v", err)
	}
	text, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(row)))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text, client) || !strings.Contains(text, "target_closed") || !strings.Contains(text, "5") {
		t.Errorf("the connection's row: %q; want its client %s, 5 bytes out, target_closed", text, client)
	}
}

// TestStatusPageQueue shows a pool's queue: with every place taken
// (max_conns_per_target), the connections waiting are a banner over the
// targets, gone once they are served.
func TestStatusPageQueue(t *testing.T) {
	bin := chromium(t)
	release := make(chan struct{})
	backend := testenv.Serve(t, func(c net.Conn) {
		defer c.Close()
		buf := make([]byte, 16)
		if _, err := c.Read(buf); err != nil {
			return // a health check
		}
		<-release
		io.WriteString(c, "served")
	})
	releaseOnce := sync.OnceFunc(func() { close(release) })
	t.Cleanup(releaseOnce) // before Serve's, which waits for the handlers
	cfg := config.Default()
	l := config.DefaultListener()
	l.Name, l.Listen, l.Discovery, l.Static = "capped", "127.0.0.1:0", "static", config.Statics(backend)
	l.Health.Interval = 100 * time.Millisecond
	l.MaxConnsPerTarget, l.Queue = 1, config.Queue{Size: 10, Timeout: time.Minute}
	cfg.Listeners = []config.Listener{l}
	srv, pageURL := statusPage(t, cfg)
	ctx := browser(t, bin, 1100, 420)
	if err := chromedp.Do(ctx, chromedp.Navigate(pageURL),
		chromedp.WaitVisible(chromedp.CSS(`section[data-listener="capped"] .state.up`))); err != nil {
		t.Fatalf("the target never showed up: %v", err)
	}
	var clients []net.Conn
	for range 3 {
		c, err := net.Dial("tcp", srv.Addr("capped").String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "hello\n")
		clients = append(clients, c)
	}
	banner := `section[data-listener="capped"] .banner.warn`
	if err := chromedp.Do(ctx, chromedp.WaitVisible(chromedp.CSS(banner))); err != nil {
		t.Fatalf("no queue banner: %v", err)
	}
	text, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(banner)))
	if err != nil || !strings.Contains(text, "2 connections wait for a place") || !strings.Contains(text, "(1)") {
		t.Fatalf("queue banner %q (%v)", text, err)
	}
	// Each client reads its answer and closes: a place is held until the
	// connection ends, both sides.
	releaseOnce()
	got := make(chan string, len(clients))
	for _, c := range clients {
		go func() {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			b, _ := io.ReadAll(c)
			c.Close()
			got <- string(b)
		}()
	}
	for range clients {
		if g := <-got; g != "served" {
			t.Fatalf("a client got %q", g)
		}
	}
	if err := chromedp.Do(ctx, chromedp.WaitNotPresent(chromedp.CSS(banner))); err != nil {
		t.Fatalf("the banner stayed after the queue emptied: %v", err)
	}
}
