package admin_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/rota-proxy/rota/admin"
	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/proxy"
	"github.com/rota-proxy/rota/server"
)

type listenerState struct{ ls []server.ListenerStatus }

func (s listenerState) Status() []server.ListenerStatus   { return s.ls }
func (listenerState) Ready() bool                         { return true }
func (listenerState) Drain(string, string, bool) error    { return server.ErrNotFound }
func (listenerState) SetWeight(string, string, int) error { return server.ErrNotFound }

// /metrics and /api/v1/targets show every listener counter of the table,
// under its declared names, with its value.
func TestEveryCounterShown(t *testing.T) {
	var st proxy.Stats
	st.Accepted.Add(5)
	st.Closed[balancer.Drained].Add(2)
	h := (&admin.Handler{State: listenerState{[]server.ListenerStatus{{Name: "web", Counters: st.Read()}}}}).Routes()

	code, body := get(t, h, "/api/v1/targets")
	var doc struct{ Listeners []map[string]any }
	if err := json.Unmarshal([]byte(body), &doc); err != nil || code != http.StatusOK || len(doc.Listeners) != 1 {
		t.Fatalf("/api/v1/targets: %d %v\n%s", code, err, body)
	}
	l := doc.Listeners[0]
	if l["name"] != "web" || l["total_conns"] != 5.0 || l["closed_conns"].(map[string]any)["drained"] != 2.0 {
		t.Fatalf("listener JSON %v", l)
	}
	_, metrics := get(t, h, "/metrics")
	for _, c := range proxy.Counters() {
		if c.JSON != "" {
			if _, ok := l[c.JSON]; !ok {
				t.Errorf("JSON field %q missing", c.JSON)
			}
		}
		if c.Metric != "" && !c.Routed && !c.ByRoute && !strings.Contains(metrics, "\n"+c.Metric+"{") {
			t.Errorf("metric %s missing", c.Metric)
		}
	}
	if !strings.Contains(metrics, `rota_connections_closed_total{listener="web",reason="drained"} 2`) {
		t.Fatalf("closed by reason not in /metrics:\n%s", metrics)
	}
}
