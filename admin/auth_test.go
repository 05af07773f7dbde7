package admin_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rota-proxy/rota/admin"
	"github.com/rota-proxy/rota/server"
)

// idleState is a State with no listeners: the access rules do not depend
// on what the server holds.
type idleState struct{}

func (idleState) Status() []server.ListenerStatus     { return nil }
func (idleState) Ready() bool                         { return true }
func (idleState) Drain(string, string, bool) error    { return server.ErrNotFound }
func (idleState) SetWeight(string, string, int) error { return server.ErrNotFound }

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
