package admin_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/rota-proxy/rota/admin"
	"github.com/rota-proxy/rota/server"
)

// idleState is a State with no listeners: the access rules do not depend
// on what the server holds.
type idleState struct{}

func (idleState) Status() []server.ListenerStatus  { return nil }
func (idleState) Ready() bool                      { return true }
func (idleState) Drain(string, string, bool) error { return server.ErrNotFound }

func newAuthHandler(token string) (http.Handler, *int) {
	reloads := 0
	h := &admin.Handler{State: idleState{}, Reload: func(context.Context) error { reloads++; return nil }}
	h.SetToken(token)
	return h.Routes(), &reloads
}

func serve(h http.Handler, method, path string, header map[string]string) *httptest.ResponseRecorder {
	req := httptest.NewRequest(method, path, nil)
	req.Host = "127.0.0.1:9090"
	for k, v := range header {
		if k == "Host" {
			req.Host = v
			continue
		}
		req.Header.Set(k, v)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

func TestAdminWithoutTokenIsLoopbackOnlyAndRefusesBrowsersCrossOrigin(t *testing.T) {
	h, reloads := newAuthHandler("")
	for _, tc := range []struct {
		name   string
		method string
		path   string
		header map[string]string
		want   int
	}{
		{"curl GET", "GET", "/api/v1/targets", nil, 200},
		{"localhost", "GET", "/metrics", map[string]string{"Host": "localhost:9090"}, 200},
		{"ipv6 loopback", "GET", "/healthz", map[string]string{"Host": "[::1]:9090"}, 200},
		{"a rebound name (DNS rebinding)", "GET", "/api/v1/targets", map[string]string{"Host": "evil.example:9090"}, 403},
		{"curl -X POST", "POST", "/api/v1/reload", nil, 200},
		{"JSON POST", "POST", "/api/v1/reload", map[string]string{"Content-Type": "application/json"}, 200},
		{"a form's text/plain", "POST", "/api/v1/reload", map[string]string{"Content-Type": "text/plain"}, 415},
		{"a form's urlencoded", "POST", "/api/v1/reload", map[string]string{"Content-Type": "application/x-www-form-urlencoded"}, 415},
		{"multipart", "POST", "/api/v1/reload", map[string]string{"Content-Type": "multipart/form-data; boundary=x"}, 415},
		{"another site's page (Origin)", "POST", "/api/v1/reload", map[string]string{"Origin": "http://evil.example"}, 403},
		{"another site's page (Sec-Fetch-Site)", "POST", "/api/v1/reload", map[string]string{"Sec-Fetch-Site": "cross-site"}, 403},
		{"the status page itself", "POST", "/api/v1/reload", map[string]string{"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:9090"}, 200},
	} {
		rec := serve(h, tc.method, tc.path, tc.header)
		if rec.Code != tc.want {
			t.Errorf("%s: %s %s = %d, want %d (%s)", tc.name, tc.method, tc.path, rec.Code, tc.want, strings.TrimSpace(rec.Body.String()))
		}
	}
	if *reloads != 3 {
		t.Fatalf("%d reloads ran, want 3 (the accepted POSTs only)", *reloads)
	}
	// No CORS: nothing invites a browser to send more.
	rec := serve(h, "OPTIONS", "/api/v1/reload", map[string]string{"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
	if v := rec.Header().Get("Access-Control-Allow-Origin"); v != "" {
		t.Fatalf("preflight answered with Access-Control-Allow-Origin %q", v)
	}
}

func TestAdminTokenGuardsAllButProbes(t *testing.T) {
	const token = "s3cret-token"
	h, reloads := newAuthHandler(token)
	bearer := map[string]string{"Authorization": "Bearer " + token}
	for _, tc := range []struct {
		name   string
		method string
		path   string
		header map[string]string
		want   int
	}{
		{"healthz is open", "GET", "/healthz", nil, 200},
		{"readyz is open", "GET", "/readyz", nil, 200},
		{"any host with a token", "GET", "/healthz", map[string]string{"Host": "rota.internal:9090"}, 200},
		{"metrics need it", "GET", "/metrics", nil, 401},
		{"targets need it", "GET", "/api/v1/targets", nil, 401},
		{"the page needs it", "GET", "/", nil, 401},
		{"wrong token", "GET", "/api/v1/targets", map[string]string{"Authorization": "Bearer nope"}, 401},
		{"bearer", "GET", "/api/v1/targets", bearer, 200},
		{"basic, token as password", "GET", "/api/v1/targets", map[string]string{"Authorization": "Basic " + basic("any", token)}, 200},
		{"basic, wrong password", "GET", "/", map[string]string{"Authorization": "Basic " + basic(token, "x")}, 401},
		{"POST without it", "POST", "/api/v1/reload", nil, 401},
		{"POST with it", "POST", "/api/v1/reload", bearer, 200},
		{"POST with it, from another site", "POST", "/api/v1/reload", map[string]string{"Authorization": "Bearer " + token, "Sec-Fetch-Site": "cross-site"}, 403},
		{"drain with it (no such target)", "POST", "/api/v1/listeners/web/targets/1.2.3.4:5/drain", bearer, 404},
	} {
		rec := serve(h, tc.method, tc.path, tc.header)
		if rec.Code != tc.want {
			t.Errorf("%s: %s %s = %d, want %d (%s)", tc.name, tc.method, tc.path, rec.Code, tc.want, strings.TrimSpace(rec.Body.String()))
		}
		if rec.Code == 401 && !strings.Contains(strings.Join(rec.Header().Values("WWW-Authenticate"), ","), "Basic") {
			t.Errorf("%s: 401 without a Basic challenge (a browser would not ask for the token)", tc.name)
		}
	}
	if *reloads != 1 {
		t.Fatalf("%d reloads ran, want 1", *reloads)
	}
}

func basic(user, pw string) string {
	r, _ := http.NewRequest("GET", "/", nil)
	r.SetBasicAuth(user, pw)
	return strings.TrimPrefix(r.Header.Get("Authorization"), "Basic ")
}

func TestReadToken(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "token")
	os.WriteFile(good, []byte("  abc123\n"), 0o600)
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, []byte("\n"), 0o600)
	if tok, err := admin.ReadToken(good); err != nil || tok != "abc123" {
		t.Fatalf("ReadToken = %q, %v", tok, err)
	}
	if _, err := admin.ReadToken(empty); err == nil || !strings.Contains(err.Error(), "empty") {
		t.Fatalf("empty token file: %v", err)
	}
	if _, err := admin.ReadToken(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing token file: %v", err)
	}
}

// The admin server bounds what idle clients can hold: a connection cap
// (the rest wait in the kernel's queue, holding no goroutine) and an idle
// timeout for keep-alive connections.
func TestAdminBoundsIdleConnections(t *testing.T) {
	before := runtime.NumGoroutine()
	srv, err := admin.Listen("127.0.0.1:0", &admin.Handler{State: idleState{}, MaxConns: 8, IdleTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown(context.Background())
	addr := srv.Addr().String()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range 200 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	// The first few are served and kept alive; nothing more is taken on.
	served := 0
	for _, c := range conns[:8] {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err == nil && resp.StatusCode == 200 {
			served++
			io.Copy(io.Discard, resp.Body)
		}
	}
	if served != 8 {
		t.Fatalf("%d of the first 8 connections served", served)
	}
	if n := runtime.NumGoroutine() - before; n > 8+10 {
		t.Fatalf("%d goroutines for 200 open admin connections (cap 8)", n)
	}
	// Idle keep-alive connections are closed after the idle timeout.
	start := time.Now()
	for _, c := range conns[:8] {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("idle connection: %v, want EOF from the server", err)
		}
	}
	if d := time.Since(start); d < 250*time.Millisecond {
		t.Fatalf("idle connections closed after %v, before the idle timeout", d)
	}
	// Their places go to the connections that waited.
	c := conns[8]
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
	if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err != nil || resp.StatusCode != 200 {
		t.Fatalf("a waiting connection was not served once places freed: %v", err)
	}
}
