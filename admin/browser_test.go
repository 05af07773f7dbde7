package admin_test

import (
	"context"
	"flag"
	"net"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/rota-proxy/rota/admin"
	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/server"
)

var updateScreenshot = flag.Bool("update-screenshot", false, "rewrite docs/status-page.png")

// chromium finds (installing on first use) the browser through
// scripts/chromium-bin. ROTA_SKIP_BROWSER=1 skips instead.
func chromium(t *testing.T) string {
	t.Helper()
	if os.Getenv("ROTA_SKIP_BROWSER") == "1" {
		t.Skip("ROTA_SKIP_BROWSER=1")
	}
	out, err := exec.Command("../scripts/chromium-bin").Output()
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
	live := backend(t)
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
	db.Name, db.Listen, db.Discovery, db.Static = "db", "127.0.0.1:0", "static", config.Statics(backend(t))
	cfg.Listeners = []config.Listener{l, db}
	srv, err := server.Start(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown(context.Background())
	hs := httptest.NewServer((&admin.Handler{State: srv, Version: "test"}).Routes())
	defer hs.Close()

	actx, acancel := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(bin), chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.NoFirstRun, chromedp.NoDefaultBrowserCheck, chromedp.WindowSize(1100, 560))
	defer acancel()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	ctx, tcancel := context.WithTimeout(ctx, 60*time.Second)
	defer tcancel()

	row := func(addr, state string) string {
		return `section[data-listener="web"] tr[data-target="` + addr + `"] .state.` + state
	}
	err = chromedp.Do(ctx,
		chromedp.Navigate(hs.URL+"/"),
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
	if *updateScreenshot {
		png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join("..", "docs", "status-page.png"), png, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
