package admin

import (
	"net/http"
	"slices"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/proxy"
	"github.com/rota-proxy/rota/server"
)

// collector turns server state into metrics at scrape time. The data path
// only bumps atomics it already holds (per listener and per target); labels
// are formatted here, once per scrape, never per connection. Targets that
// are no longer discovered simply stop being reported, so their series go
// away with them.
//
// Each family is declared once: the listener's in proxy.Counters, a pool's
// and a target's in the tables below (name, help, kind, an extra label,
// and how to read it).
type collector struct {
	state    State
	listener []*prometheus.Desc // one per proxy.Counters row; nil: not a metric
	pool     []*prometheus.Desc // one per poolFamilies row
	target   []*prometheus.Desc // one per targetFamilies row
	targets  *prometheus.Desc   // rota_targets{state}
	// logDropped is rota_access_log_dropped_total.
	logDropped *prometheus.Desc
	// queueWait is rota_queue_wait_seconds, a pool's histogram.
	queueWait *prometheus.Desc
}

// family is a metric of a pool (labels listener, route) or of a target
// (listener, route, target), and Label when it has one.
type family[T any] struct {
	name, help string
	gauge      bool
	label      string
	read       func(T) []proxy.Sample
}

func one(v float64) []proxy.Sample { return []proxy.Sample{{Value: v}} }

var poolFamilies = []family[*server.PoolStatus]{
	{name: "rota_discovery_updates_total", help: "Instance snapshots received from discovery.",
		read: func(p *server.PoolStatus) []proxy.Sample { return one(float64(p.DiscoveryUpdates)) }},
	{name: "rota_discovery_errors_total", help: "Registry errors seen by discovery (the last good instances stay routed).",
		read: func(p *server.PoolStatus) []proxy.Sample { return one(float64(p.DiscoveryErrors)) }},
	{name: "rota_discovery_last_sync_timestamp_seconds", help: "Unix time of the last discovery snapshot.", gauge: true,
		read: func(p *server.PoolStatus) []proxy.Sample {
			if p.LastSync.IsZero() {
				return nil
			}
			return one(float64(p.LastSync.UnixNano()) / 1e9)
		}},
	{name: "rota_discovery_synced", help: "1 once the listener (or route) had its first discovery sync.", gauge: true,
		read: func(p *server.PoolStatus) []proxy.Sample { return one(b2f(p.Synced)) }},
	{name: "rota_discovery_malformed_total", help: "Registry entries skipped as malformed (each counted once; listed in /api/v1/targets until fixed or deleted).",
		read: func(p *server.PoolStatus) []proxy.Sample { return one(float64(p.DiscoveryMalformed)) }},
	{name: "rota_discovery_stale", help: "1 while the watch has stopped hearing from its registry (and is moving to another member).", gauge: true,
		read: func(p *server.PoolStatus) []proxy.Sample { return one(b2f(p.DiscoveryStale)) }},
	{name: "rota_queue_length", help: "Connections waiting for a place under max_conns_per_target.", gauge: true,
		read: func(p *server.PoolStatus) []proxy.Sample {
			if p.Queue == nil {
				return nil
			}
			return one(float64(p.Queue.Length()))
		}},
	{name: "rota_panic_mode", help: "1 while the pool routes over all discovered targets because none passes its checks.", gauge: true,
		read: func(p *server.PoolStatus) []proxy.Sample { return one(b2f(p.Panic)) }},
}

var targetFamilies = []family[*server.TargetStatus]{
	{name: "rota_target_up", help: "1 if the target passes its health checks, else 0.", gauge: true,
		read: func(t *server.TargetStatus) []proxy.Sample { return one(b2f(t.Health.State == health.Up)) }},
	{name: "rota_health_checks_total", help: "Health probes by result (success or failure).", label: "result",
		read: func(t *server.TargetStatus) []proxy.Sample {
			return []proxy.Sample{{Key: "success", Value: float64(t.Health.ChecksOK)}, {Key: "failure", Value: float64(t.Health.ChecksFailed)}}
		}},
	{name: "rota_target_connections_total", help: "Client connections handed to the target.",
		read: func(t *server.TargetStatus) []proxy.Sample { return one(float64(t.Total.Load())) }},
	{name: "rota_target_connections_active", help: "Client connections open to the target now.", gauge: true,
		read: func(t *server.TargetStatus) []proxy.Sample { return one(float64(t.Active.Load())) }},
	{name: "rota_dial_errors_total", help: "Failed attempts to reach the target (refused, timed out, reset before answering).",
		read: func(t *server.TargetStatus) []proxy.Sample { return one(float64(t.DialErrors.Load())) }},
	{name: "rota_target_bytes_total", help: "Bytes proxied through the target, by direction.", label: "direction",
		read: func(t *server.TargetStatus) []proxy.Sample {
			return []proxy.Sample{{Key: "in", Value: float64(t.BytesIn.Load())}, {Key: "out", Value: float64(t.BytesOut.Load())}}
		}},
	{name: "rota_target_weight", help: "The target's weight, from the registry or the static list (1 when none is given).", gauge: true,
		read: func(t *server.TargetStatus) []proxy.Sample { return one(float64(max(t.Weight, 1))) }},
	{name: "rota_target_effective_weight", help: "The weight the picker uses now: below rota_target_weight while the target ramps up (slow_start).", gauge: true,
		read: func(t *server.TargetStatus) []proxy.Sample { return one(t.EffectiveWeight) }},
	{name: "rota_target_draining", help: "1 while the target is drained through the admin API (no new connections).", gauge: true,
		read: func(t *server.TargetStatus) []proxy.Sample { return one(b2f(t.Draining)) }},
	{name: "rota_target_backup", help: "1 if the target is a backup: it gets new connections only while no primary target is live.", gauge: true,
		read: func(t *server.TargetStatus) []proxy.Sample { return one(b2f(t.Backup)) }},
}

func descs[T any](fs []family[T], labels ...string) []*prometheus.Desc {
	out := make([]*prometheus.Desc, len(fs))
	for i, f := range fs {
		ls := labels
		if f.label != "" {
			ls = append(slices.Clip(labels), f.label)
		}
		out[i] = prometheus.NewDesc(f.name, f.help, ls, nil)
	}
	return out
}

func newCollector(state State) *collector {
	c := &collector{
		state:   state,
		pool:    descs(poolFamilies, "listener", "route"),
		target:  descs(targetFamilies, "listener", "route", "target"),
		targets: prometheus.NewDesc("rota_targets", "Discovered targets by health state.", []string{"listener", "route", "state"}, nil),
		queueWait: prometheus.NewDesc("rota_queue_wait_seconds",
			"How long connections waited in the queue under max_conns_per_target, served or timed out.", []string{"listener", "route"}, nil),
		logDropped: prometheus.NewDesc("rota_access_log_dropped_total",
			"Access log records dropped because the writer fell behind (the proxy is never slowed for it).", nil, nil),
	}
	for _, k := range proxy.Counters() {
		var desc *prometheus.Desc
		if k.Metric != "" {
			labels := []string{"listener"}
			if k.ByRoute {
				labels = append(labels, "route")
			}
			if k.Label != "" {
				labels = append(labels, k.Label)
			}
			desc = prometheus.NewDesc(k.Metric, k.Help, labels, nil)
		}
		c.listener = append(c.listener, desc)
	}
	return c
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	prometheus.DescribeByCollect(c, ch)
}

// emit sends one family's samples, labelled labels and, where the family
// has a label, each sample's key.
func emit(ch chan<- prometheus.Metric, d *prometheus.Desc, gauge, keyed bool, samples []proxy.Sample, labels ...string) {
	kind := prometheus.CounterValue
	if gauge {
		kind = prometheus.GaugeValue
	}
	for _, s := range samples {
		ls := labels
		if keyed {
			ls = append(slices.Clip(labels), s.Key)
		}
		ch <- prometheus.MustNewConstMetric(d, kind, s.Value, ls...)
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	if s, ok := c.state.(interface{ AccessLog() *accesslog.Log }); ok {
		if l := s.AccessLog(); l != nil {
			ch <- prometheus.MustNewConstMetric(c.logDropped, prometheus.CounterValue, float64(l.Dropped()))
		}
	}
	for _, l := range c.state.Status() {
		n := l.Name
		for i, r := range l.Counters {
			d := c.listener[i]
			switch {
			case d == nil || r.Routed && len(l.Routes) == 0:
			case r.ByRoute:
				for _, s := range r.Samples {
					emit(ch, d, r.Gauge, r.Label != "", []proxy.Sample{s}, n, s.Route)
				}
			default:
				emit(ch, d, r.Gauge, r.Label != "", r.Samples, n)
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
	for i, f := range poolFamilies {
		emit(ch, c.pool[i], f.gauge, f.label != "", f.read(p), n, r)
	}
	if q := p.Queue; q != nil {
		count, sum, buckets := q.Wait.Snapshot()
		ch <- prometheus.MustNewConstHistogram(c.queueWait, count, sum, buckets, n, r)
	}
	states := map[string]int{"checking": 0, "up": 0, "down": 0}
	for j := range p.Targets {
		t := &p.Targets[j]
		states[t.Health.State.String()]++
		for i, f := range targetFamilies {
			emit(ch, c.target[i], f.gauge, f.label != "", f.read(t), n, r, t.Addr)
		}
	}
	for s, k := range states {
		ch <- prometheus.MustNewConstMetric(c.targets, prometheus.GaugeValue, float64(k), n, r, s)
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
