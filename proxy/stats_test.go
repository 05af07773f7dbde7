package proxy_test

import (
	"strings"
	"testing"

	"github.com/rota-proxy/rota/proxy"
)

// The counters table is the one declaration of each listener counter: its
// names are unique and well-formed, and each reads at least one sample,
// keyed exactly when it has a label.
func TestCountersTable(t *testing.T) {
	var s proxy.Stats
	s.Accepted.Add(7)
	seen := map[string]bool{}
	for _, r := range s.Read() {
		for _, name := range []string{r.Metric, r.JSON} {
			if name == "" {
				continue
			}
			if seen[name] {
				t.Errorf("%q declared twice", name)
			}
			seen[name] = true
		}
		if r.Metric == "" && r.JSON == "" {
			t.Errorf("a counter shown nowhere: %+v", r.Counter)
		}
		if r.Metric != "" && (!strings.HasPrefix(r.Metric, "rota_") || r.Help == "") {
			t.Errorf("%s: want a rota_ name and help", r.Metric)
		}
		if len(r.Samples) == 0 && !r.ByRoute { // (by route: the routes seen so far)
			t.Errorf("%s%s: no samples", r.Metric, r.JSON)
		}
		for _, smp := range r.Samples {
			if (smp.Key == "") != (r.Label == "") {
				t.Errorf("%s: sample key %q with label %q", r.Metric, smp.Key, r.Label)
			}
		}
	}
	if got := proxy.Count(s.Read(), "rota_connections_total", ""); got != 7 {
		t.Fatalf("rota_connections_total reads %v, want 7", got)
	}
	if got := proxy.Count(s.Read(), "total_conns", ""); got != 7 {
		t.Fatalf("total_conns reads %v, want 7", got)
	}
}
