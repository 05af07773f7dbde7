package admin

import (
	_ "embed"
	"net/http"
	"strings"
)

// statusPage is self-contained: styles and script inline, nothing fetched
// from outside the admin server, so it works air-gapped and behind strict
// CSPs. It polls /api/v1/targets and redraws itself.
//
//go:embed static/status.html
var statusPage string

func (h *Handler) page(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'")
	version := h.Version
	if version == "" {
		version = "dev"
	}
	w.Write([]byte(strings.Replace(statusPage, "{{VERSION}}", htmlEscape(version), 1)))
}

func htmlEscape(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;", "'", "&#39;").Replace(s)
}
