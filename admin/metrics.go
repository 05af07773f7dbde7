package admin

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rota-proxy/rota/proxy"
	"github.com/rota-proxy/rota/server"
)

// collector turns server state into metrics at scrape time. The data path
// only bumps atomics it already holds (per listener and per target); labels
// are formatted here, once per scrape, never per connection. Targets that
// are no longer discovered simply stop being reported, so their series go
// away with them.
type collector struct {
	state State

	// listener is the listener-wide counters' families, one per row of
	// proxy.Counters (nil where a row has no family).
	listener []*prometheus.Desc

	dialErrors                            *prometheus.Desc
	up, checks, targetConns, targetActive *prometheus.Desc
	targetBytes                           *prometheus.Desc
	updates, errors, lastSync, synced     *prometheus.Desc
	panicMode, targets, malformed, stale  *prometheus.Desc
	weight, effectiveWeight, draining     *prometheus.Desc
}

func newCollector(state State) *collector {
	// Per pool (discovery) and per target, a route label: "" for a
	// listener's own pool, the route's name on a routed listener.
	lr := []string{"listener", "route"}
	lt := []string{"listener", "route", "target"}
	d := func(name, help string, labels []string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labels, nil)
	}
	c := &collector{
		state:       state,
		dialErrors:  d("rota_dial_errors_total", "Failed attempts to reach the target (refused, timed out, reset before answering).", lt),
		up:          d("rota_target_up", "1 if the target passes its health checks, else 0.", lt),
		checks:      d("rota_health_checks_total", "Health probes by result (success or failure).", []string{"listener", "route", "target", "result"}),
		targetConns: d("rota_target_connections_total", "Client connections handed to the target.", lt),
		targetActive: d("rota_target_connections_active",
			"Client connections open to the target now.", lt),
		targetBytes: d("rota_target_bytes_total", "Bytes proxied through the target, by direction.", []string{"listener", "route", "target", "direction"}),
		updates:     d("rota_discovery_updates_total", "Instance snapshots received from discovery.", lr),
		errors:      d("rota_discovery_errors_total", "Registry errors seen by discovery (the last good instances stay routed).", lr),
		lastSync:    d("rota_discovery_last_sync_timestamp_seconds", "Unix time of the last discovery snapshot.", lr),
		synced:      d("rota_discovery_synced", "1 once the listener (or route) had its first discovery sync.", lr),
		panicMode:   d("rota_panic_mode", "1 while the pool routes over all discovered targets because none passes its checks.", lr),
		targets:     d("rota_targets", "Discovered targets by health state.", []string{"listener", "route", "state"}),
		malformed:   d("rota_discovery_malformed_total", "Registry entries skipped as malformed (each counted once; listed in /api/v1/targets until fixed or deleted).", lr),
		stale:       d("rota_discovery_stale", "1 while the watch has stopped hearing from its registry (and is moving to another member).", lr),
		weight:      d("rota_target_weight", "The target's weight, from the registry or the static list (1 when none is given).", lt),
		effectiveWeight: d("rota_target_effective_weight",
			"The weight the picker uses now: below rota_target_weight while the target ramps up (slow_start).", lt),
		draining: d("rota_target_draining", "1 while the target is drained through the admin API (no new connections).", lt),
	}
	for _, k := range proxy.Counters() {
		var desc *prometheus.Desc
		if k.Metric != "" {
			labels := []string{"listener"}
			if k.Label != "" {
				labels = append(labels, k.Label)
			}
			desc = d(k.Metric, k.Help, labels)
		}
		c.listener = append(c.listener, desc)
	}
	return c
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	prometheus.DescribeByCollect(c, ch)
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	for _, l := range c.state.Status() {
		n := l.Name
		for i, r := range l.Counters {
			desc := c.listener[i]
			if desc == nil || r.Routed && len(l.Routes) == 0 {
				continue
			}
			kind := prometheus.CounterValue
			if r.Gauge {
				kind = prometheus.GaugeValue
			}
			for _, s := range r.Samples {
				labels := []string{n}
				if r.Label != "" {
					labels = append(labels, s.Key)
				}
				ch <- prometheus.MustNewConstMetric(desc, kind, s.Value, labels...)
			}
		}
		if len(l.Routes) == 0 {
			c.collectPool(ch, n, "", &l.PoolStatus)
			continue
		}
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
