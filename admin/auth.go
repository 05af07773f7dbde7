package admin

import (
	"crypto/subtle"
	"fmt"
	"mime"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
)

// SetToken sets the bearer token ("" for none). With a token, every POST
// and every path but /healthz and /readyz must carry it: "Authorization:
// Bearer TOKEN", or Basic auth with any user name and the token as the
// password, which is how a browser shows the status page. Without one
// (the config allows that only on a loopback address), requests must name
// a loopback host, so that a web page cannot reach the API by rebinding
// its own name to 127.0.0.1.
func (h *Handler) SetToken(token string) {
	if token == "" {
		h.token.Store(nil)
		return
	}
	h.token.Store(&token)
}

// ReadToken reads a token file: its content less surrounding white space,
// which must not be empty.
func ReadToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("admin.token_file: %w", err)
	}
	t := strings.TrimSpace(string(b))
	if t == "" {
		return "", fmt.Errorf("admin.token_file %s is empty", path)
	}
	return t, nil
}

// guard applies the access rules before next sees a request:
//   - state-changing requests (anything but GET, HEAD, OPTIONS) must not
//     be ones a browser sends cross-origin without asking: a form's
//     content types are refused, and so is a request whose Origin or
//     Sec-Fetch-Site says it comes from another site (net/http's
//     CrossOriginProtection). No CORS header is ever sent, so a browser
//     never lets another site send anything else;
//   - with a token, the token (see SetToken); without, a loopback Host.
//     /healthz and /readyz are always open: they tell nothing and
//     orchestrators probe them by the pod's address.
func (h *Handler) guard(next http.Handler) http.Handler {
	cop := http.NewCrossOriginProtection()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		probe := r.URL.Path == "/healthz" || r.URL.Path == "/readyz"
		changes := r.Method != http.MethodGet && r.Method != http.MethodHead && r.Method != http.MethodOptions
		tok := h.token.Load()
		switch {
		case tok == nil && !probe && !loopbackHost(r.Host):
			deny(w, http.StatusForbidden, "the admin API answers requests for a loopback host only (127.0.0.1, [::1], localhost) unless admin.token_file is set")
			return
		case tok != nil && (changes || !probe) && !authorized(r, *tok):
			w.Header().Add("WWW-Authenticate", `Bearer realm="rota"`)
			w.Header().Add("WWW-Authenticate", `Basic realm="rota admin (any user name, the token as password)"`)
			deny(w, http.StatusUnauthorized, "this needs the admin token: Authorization: Bearer <the content of admin.token_file>")
			return
		}
		if changes {
			if formContent(r) {
				deny(w, http.StatusUnsupportedMediaType, "send no body or Content-Type: application/json (a form's content type is what another web site could send)")
				return
			}
			if err := cop.Check(r); err != nil {
				deny(w, http.StatusForbidden, "cross-origin request refused: "+err.Error())
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

func deny(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, map[string]string{"error": msg})
}

// authorized reports whether r carries token, as a bearer token or as the
// password of Basic auth.
func authorized(r *http.Request, token string) bool {
	got := ""
	if a := r.Header.Get("Authorization"); len(a) > 7 && strings.EqualFold(a[:7], "bearer ") {
		got = strings.TrimSpace(a[7:])
	} else if _, pw, ok := r.BasicAuth(); ok {
		got = pw
	}
	return got != "" && subtle.ConstantTimeCompare([]byte(got), []byte(token)) == 1
}

// formContent reports whether r has a content type that an HTML form (or a
// "simple" cross-origin fetch) can send.
func formContent(r *http.Request) bool {
	ct := r.Header.Get("Content-Type")
	if ct == "" {
		return false
	}
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil {
		return true
	}
	switch mt {
	case "application/x-www-form-urlencoded", "multipart/form-data", "text/plain":
		return true
	}
	return false
}

// loopbackHost reports whether a Host header names this machine by a
// loopback address or "localhost" (an empty Host is an HTTP/1.0 client's).
func loopbackHost(host string) bool {
	if host == "" {
		return true
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.Trim(host, "[]"), ".")
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}
