package proxy

import (
	"sync/atomic"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/proxy/internal/relay"
)

// Stats are the listener-wide counters of a Proxy, updated atomically.
// Counters says how each is shown.
type Stats struct {
	relay.Stats
	// Panics counts connections closed because relaying them panicked.
	Panics atomic.Uint64
	// TLSErrors counts failed TLS handshakes (termination) by reason.
	TLSErrors tlsStats
	// ended counts connections' ends by route and termination.
	ended endedByRoute
}

// A Counter is one of a listener's counters as operators see it: its
// Prometheus family, its field in a listener of /api/v1/targets, and how to
// read it from Stats. Each counter is declared once, in counters; the
// admin API generates /metrics and the JSON from the table. Adding a
// counter is a field in Stats (or relay.Stats) and a row here.
type Counter struct {
	Metric string // family name, labelled by listener (and Label)
	Help   string
	Gauge  bool   // a level, not a running total
	Label  string // the label the samples' keys fill; "" for one sample
	JSON   string // the listener's field in /api/v1/targets; "" for none
	Routed bool   // only listeners with routes report it in /metrics
	// ByRoute: its samples are labelled by route too ("" for a
	// listener's own pool); the JSON shows their sums by Key.
	ByRoute bool
	Read    func(*Stats) []Sample
}

// Sample is one value of a Counter: Key fills its Label ("" when it has
// none), Route the route label of a counter ByRoute.
type Sample struct {
	Route string
	Key   string
	Value float64
}

// Counters lists the listener-wide counters, in the order they are shown.
func Counters() []Counter { return counters }

// Reading is a Counter's samples at one moment.
type Reading struct {
	*Counter
	Samples []Sample
}

// Read reads every counter of s, in Counters' order.
func (s *Stats) Read() []Reading {
	out := make([]Reading, len(counters))
	for i := range counters {
		out[i] = Reading{Counter: &counters[i], Samples: counters[i].Read(s)}
	}
	return out
}

// Count is the value of the counter named name (its metric or its JSON
// field) for key ("" for a counter without a label); 0 when there is none.
func Count(rs []Reading, name, key string) float64 {
	for _, r := range rs {
		if r.Metric == name || r.JSON == name {
			sum := 0.0 // a counter by route: every route's
			for _, s := range r.Samples {
				if s.Key == key {
					sum += s.Value
				}
			}
			return sum
		}
	}
	return 0
}

func one(v uint64) []Sample { return []Sample{{Value: float64(v)}} }

// counters is the table (immutable).
var counters = []Counter{
	{Metric: "rota_connections_total", Help: "Client connections accepted.", JSON: "total_conns",
		Read: func(s *Stats) []Sample { return one(s.Accepted.Load()) }},
	{Metric: "rota_connections_active", Help: "Client connections open now.", Gauge: true, JSON: "active_conns",
		Read: func(s *Stats) []Sample { return []Sample{{Value: float64(s.Active.Load())}} }},
	{Metric: "rota_connections_rejected_total", Help: "Client connections closed at once because max_conns was reached.", JSON: "rejected_conns",
		Read: func(s *Stats) []Sample { return one(s.Rejected.Load()) }},
	{Metric: "rota_connections_no_target_total", Help: "Client connections closed because no target could be reached.", JSON: "no_target_conns",
		Read: func(s *Stats) []Sample { return one(s.NoTarget.Load()) }},
	{Metric: "", JSON: "dial_errors", // per target in /metrics (rota_dial_errors_total)
		Read: func(s *Stats) []Sample { return one(s.DialErrors.Load()) }},
	{Metric: "rota_bytes_total", Help: "Bytes proxied; direction is in (target to client) or out (client to target).", Label: "direction",
		Read: func(s *Stats) []Sample {
			return []Sample{{Key: "in", Value: float64(s.BytesIn.Load())}, {Key: "out", Value: float64(s.BytesOut.Load())}}
		}},
	{Metric: "rota_proxy_protocol_errors_total", Help: "Clients closed for a missing, malformed, late or untrusted PROXY protocol header.",
		Read: func(s *Stats) []Sample { return one(s.HeaderErrors.Load()) }},
	{Metric: "rota_tls_handshake_errors_total", Label: "reason", JSON: "tls_handshake_errors",
		Help: "Clients of a listener that terminates TLS whose handshake failed, by why; no target was dialled for them.",
		Read: func(s *Stats) []Sample {
			var out []Sample
			for _, r := range TLSReasons() {
				out = append(out, Sample{Key: r.String(), Value: float64(s.TLSErrors[r].Load())})
			}
			return out
		}},
	{Metric: "rota_relay_panics_total", Help: "Connections closed because relaying them panicked (the stack is logged); other connections carry on.",
		Read: func(s *Stats) []Sample { return one(s.Panics.Load()) }},
	{Metric: "rota_connections_closed_total", Label: "reason", JSON: "closed_conns",
		Help: "Connections rota closed while in use: their target was removed, went down or was drained (after removed_conn_grace), or they reached max_conn_age.",
		Read: func(s *Stats) []Sample {
			out := make([]Sample, 0, balancer.NumReasons)
			for _, r := range balancer.Reasons() {
				out = append(out, Sample{Key: r.String(), Value: float64(s.Closed[r].Load())})
			}
			return out
		}},
	{Metric: "rota_connections_denied_total", Label: "reason", JSON: "denied_conns",
		Help: "Clients closed at once, before any target was dialled: in deny, not in allow (not_allowed), or over max_conns_per_client (per_client).",
		Read: func(s *Stats) []Sample {
			var out []Sample
			for _, d := range relay.Denials() {
				out = append(out, Sample{Key: d.String(), Value: float64(s.Denied[d].Load())})
			}
			return out
		}},
	{Metric: "rota_connections_replayed_total", Help: "Connections whose bytes went to a second target after the first reset before answering (replay_on_reset).",
		JSON: "replayed_conns",
		Read: func(s *Stats) []Sample { return one(s.Replays.Load()) }},
	{Metric: "rota_connections_ended_total", Label: "termination", ByRoute: true, JSON: "ended_conns",
		Help: "Client connections ended, by how (the access log's termination codes).",
		Read: func(s *Stats) []Sample { return s.ended.samples() }},
	{Metric: "rota_connections_no_route_total", Help: "Clients of a routed listener closed because no route matched their TLS server name.",
		JSON: "no_route_conns", Routed: true,
		Read: func(s *Stats) []Sample { return one(s.NoRoute.Load()) }},
}
