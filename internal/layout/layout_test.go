package layout

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/rota-proxy/rota/"

// allowed says which of rota's packages each may import (beyond
// internal/ helpers, which any package may use); a package not listed may
// import anything (the command, tests' helpers, programs).
var allowed = map[string][]string{
	"accesslog":            {},
	"balancer":             {},
	"discovery":            {},
	"embedetcd":            {},
	"fleet":                {},
	"health":               {},
	"discovery/static":     {"discovery"},
	"discovery/etcd":       {"discovery"},
	"discovery/consul":     {"discovery"},
	"discovery/dns":        {"discovery"},
	"discovery/docker":     {"discovery"},
	"discovery/kubernetes": {"discovery"},
	"pool":                 {"balancer", "discovery", "fleet", "health"},
	"proxy/internal/sni":   {},
	"proxy/internal/relay": {"accesslog", "balancer", "proxy/internal/sni"},
	"proxy":                {"accesslog", "balancer", "proxy/internal/relay", "proxy/internal/sni"},
	// config declares the file; the settings types it embeds are their
	// packages' (one declaration each).
	"config":     {"accesslog", "balancer", "discovery/dns", "discovery/kubernetes", "health", "proxy"},
	"server":     {"accesslog", "balancer", "config", "discovery", "discovery/consul", "discovery/dns", "discovery/docker", "discovery/etcd", "discovery/kubernetes", "discovery/static", "embedetcd", "fleet", "health", "pool", "proxy"},
	"admin":      {"accesslog", "discovery", "health", "proxy", "server"},
	"supervisor": {"admin", "config", "health", "server"},
	"demo":       {"discovery/consul", "discovery/etcd"},
}

func TestImportsPointOneWay(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}}{{range .Imports}} {{.}}{{end}}`, module+"...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	seen := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		pkg := strings.TrimPrefix(f[0], module)
		seen[pkg] = true
		ok, ruled := allowed[pkg]
		if !ruled {
			continue
		}
		for _, imp := range f[1:] {
			dep, ours := strings.CutPrefix(imp, module)
			if !ours || strings.HasPrefix(dep, "internal/") && !strings.HasPrefix(dep, "internal/testenv") {
				continue
			}
			if !slices.Contains(ok, dep) {
				t.Errorf("%s imports %s: against the layout (it may import %v)", pkg, dep, ok)
			}
		}
	}
	for pkg := range allowed {
		if !seen[pkg] {
			t.Errorf("the layout names %s, which no longer exists", pkg)
		}
	}
}
