package admin

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rota-proxy/rota/server"
)

// collector turns server state into metrics at scrape time. The data path
// only bumps atomics it already holds (per listener and per target); labels
// are formatted here, once per scrape, never per connection. Targets that
// are no longer discovered simply stop being reported, so their series go
// away with them.
type collector struct {
	state State

	connections, active, rejected, noTarget, dialErrors, bytes *prometheus.Desc
	up, checks, targetConns, targetActive                      *prometheus.Desc
	targetBytes                                                *prometheus.Desc
	updates, errors, lastSync, synced, panicMode, targets      *prometheus.Desc
	headerErrors, relayPanics, malformed, stale                *prometheus.Desc
	weight, effectiveWeight, draining, closed                  *prometheus.Desc
	denied, noRoute                                            *prometheus.Desc
}

func newCollector(state State) *collector {
	// Per pool (discovery) and per target, a route label: "" for a
	// listener's own pool, the route's name on a routed listener.
	l := []string{"listener"}
	lr := []string{"listener", "route"}
	lt := []string{"listener", "route", "target"}
	d := func(name, help string, labels []string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labels, nil)
	}
	return &collector{
		state:       state,
		connections: d("rota_connections_total", "Client connections accepted.", l),
		active:      d("rota_connections_active", "Client connections open now.", l),
		rejected:    d("rota_connections_rejected_total", "Client connections closed at once because max_conns was reached.", l),
		noTarget:    d("rota_connections_no_target_total", "Client connections closed because no target could be reached.", l),
		dialErrors:  d("rota_dial_errors_total", "Failed attempts to reach the target (refused, timed out, reset before answering).", lt),
		bytes:       d("rota_bytes_total", "Bytes proxied; direction is in (target to client) or out (client to target).", []string{"listener", "direction"}),
		up:          d("rota_target_up", "1 if the target passes its health checks, else 0.", lt),
		checks:      d("rota_health_checks_total", "Health probes by result (success or failure).", []string{"listener", "route", "target", "result"}),
		targetConns: d("rota_target_connections_total", "Client connections handed to the target.", lt),
		targetActive: d("rota_target_connections_active",
			"Client connections open to the target now.", lt),
		targetBytes:  d("rota_target_bytes_total", "Bytes proxied through the target, by direction.", []string{"listener", "route", "target", "direction"}),
		updates:      d("rota_discovery_updates_total", "Instance snapshots received from discovery.", lr),
		errors:       d("rota_discovery_errors_total", "Registry errors seen by discovery (the last good instances stay routed).", lr),
		lastSync:     d("rota_discovery_last_sync_timestamp_seconds", "Unix time of the last discovery snapshot.", lr),
		synced:       d("rota_discovery_synced", "1 once the listener (or route) had its first discovery sync.", lr),
		panicMode:    d("rota_panic_mode", "1 while the pool routes over all discovered targets because none passes its checks.", lr),
		headerErrors: d("rota_proxy_protocol_errors_total", "Clients closed for a missing, malformed, late or untrusted PROXY protocol header.", l),
		targets:      d("rota_targets", "Discovered targets by health state.", []string{"listener", "route", "state"}),
		malformed:    d("rota_discovery_malformed_total", "Registry entries skipped as malformed (each counted once; listed in /api/v1/targets until fixed or deleted).", lr),
		stale:        d("rota_discovery_stale", "1 while the watch has stopped hearing from its registry (and is moving to another member).", lr),
		relayPanics:  d("rota_relay_panics_total", "Connections closed because relaying them panicked (the stack is logged); other connections carry on.", l),
		weight:       d("rota_target_weight", "The target's weight, from the registry or the static list (1 when none is given).", lt),
		effectiveWeight: d("rota_target_effective_weight",
			"The weight the picker uses now: below rota_target_weight while the target ramps up (slow_start).", lt),
		draining: d("rota_target_draining", "1 while the target is drained through the admin API (no new connections).", lt),
		closed: d("rota_connections_closed_total",
			"Connections rota closed while in use: their target was removed, went down or was drained (after removed_conn_grace), or they reached max_conn_age.", []string{"listener", "reason"}),
		denied: d("rota_connections_denied_total",
			"Clients closed at once, before any target was dialled: in deny, not in allow (not_allowed), or over max_conns_per_client (per_client).", []string{"listener", "reason"}),
		noRoute: d("rota_connections_no_route_total", "Clients of a routed listener closed because no route matched their TLS server name.", l),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	prometheus.DescribeByCollect(c, ch)
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, l := range c.state.Status() {
		n := l.Name
		counter(c.connections, float64(l.Accepted), n)
		gauge(c.active, float64(l.Active), n)
		counter(c.rejected, float64(l.Rejected), n)
		counter(c.noTarget, float64(l.NoTarget), n)
		counter(c.bytes, float64(l.BytesIn), n, "in")
		counter(c.bytes, float64(l.BytesOut), n, "out")
		counter(c.headerErrors, float64(l.ProxyHeaderErrors), n)
		counter(c.relayPanics, float64(l.RelayPanics), n)
		for reason, k := range l.Closed {
			counter(c.closed, float64(k), n, reason)
		}
		for reason, k := range l.Denied {
			counter(c.denied, float64(k), n, reason)
		}
		if len(l.Routes) == 0 {
			c.collectPool(ch, n, "", &l.PoolStatus)
			continue
		}
		counter(c.noRoute, float64(l.NoRoute), n)
		for i := range l.Routes {
			c.collectPool(ch, n, l.Routes[i].Name, &l.Routes[i].PoolStatus)
		}
	}
}

// collectPool reports one pool's discovery and targets.
func (c *collector) collectPool(ch chan<- prometheus.Metric, n, r string, p *server.PoolStatus) {
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter(c.updates, float64(p.DiscoveryUpdates), n, r)
	counter(c.errors, float64(p.DiscoveryErrors), n, r)
	if !p.LastSync.IsZero() {
		gauge(c.lastSync, float64(p.LastSync.UnixNano())/1e9, n, r)
	}
	gauge(c.synced, b2f(p.Synced), n, r)
	counter(c.malformed, float64(p.DiscoveryMalformed), n, r)
	gauge(c.stale, b2f(p.DiscoveryStale), n, r)
	gauge(c.panicMode, b2f(p.Panic), n, r)
	states := map[string]int{"checking": 0, "up": 0, "down": 0}
	for _, t := range p.Targets {
		a := t.Addr
		states[t.State.String()]++
		gauge(c.up, b2f(t.State.String() == "up"), n, r, a)
		counter(c.checks, float64(t.ChecksOK), n, r, a, "success")
		counter(c.checks, float64(t.ChecksFailed), n, r, a, "failure")
		counter(c.targetConns, float64(t.Total), n, r, a)
		gauge(c.targetActive, float64(t.Active), n, r, a)
		counter(c.dialErrors, float64(t.DialErrors), n, r, a)
		counter(c.targetBytes, float64(t.BytesIn), n, r, a, "in")
		counter(c.targetBytes, float64(t.BytesOut), n, r, a, "out")
		gauge(c.weight, float64(max(t.Weight, 1)), n, r, a)
		gauge(c.effectiveWeight, t.EffectiveWeight, n, r, a)
		gauge(c.draining, b2f(t.Draining), n, r, a)
	}
	for s, k := range states {
		gauge(c.targets, float64(k), n, r, s)
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// metrics builds a registry private to this handler (no package-level
// default registry) with rota's collector and the Go runtime and process
// collectors.
func (h *Handler) metrics() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		newCollector(h.State),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	version := h.Version
	if version == "" {
		version = "dev"
	}
	info := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "rota_build_info", Help: "Always 1; the version label says which rota runs.",
		ConstLabels: prometheus.Labels{"version": version},
	})
	info.Set(1)
	reg.MustRegister(info)
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: nil})
}
