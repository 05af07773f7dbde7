package proxy

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/proxy/internal/relay"
)

// SetAccessLog makes p record its connections in l (nil: none) from now
// on; the listener's (or route's) access_log setting may still leave them
// out.
func (p *Proxy) SetAccessLog(l *accesslog.Log) { p.log.Store(l) }

// endedByRoute counts connections' ends by route and termination: the
// counters of rota_connections_ended_total. A route's counters are made
// on its first end and kept (a reload keeps its routes' names).
type endedByRoute struct {
	mu sync.Mutex // serialises additions; readers load m
	m  atomic.Pointer[map[string]*endedCounts]
}

type endedCounts [accesslog.NumTerminations]atomic.Uint64

func (e *endedByRoute) count(route string, t accesslog.Termination) {
	if m := e.m.Load(); m != nil {
		if c := (*m)[route]; c != nil {
			c[t].Add(1)
			return
		}
	}
	e.mu.Lock()
	old := e.m.Load()
	next := make(map[string]*endedCounts, 1)
	if old != nil {
		for k, v := range *old {
			next[k] = v
		}
	}
	c := next[route]
	if c == nil {
		c = new(endedCounts)
		next[route] = c
	}
	e.m.Store(&next)
	e.mu.Unlock()
	c[t].Add(1)
}

// samples are the counts, by route and termination (those not zero).
func (e *endedByRoute) samples() []Sample {
	m := e.m.Load()
	if m == nil {
		return nil
	}
	var out []Sample
	for route, c := range *m {
		for _, t := range accesslog.Terminations() {
			if n := c[t].Load(); n > 0 {
				out = append(out, Sample{Route: route, Key: t.String(), Value: float64(n)})
			}
		}
	}
	return out
}

// ended counts the end of a connection relayed with set, and logs it when
// the access log is on for its listener and route. m has ended; in and out
// are the bytes from the client and from the target, now a clock reading
// of m's.
// buffer names the log's buffer the caller keeps to (a relay loop's
// number; -1: any).
// ti is what a terminated TLS handshake negotiated, nil for none.
func (p *Proxy) ended(set *settings, m *relay.Conn, in, out uint64, now int64, buffer int, ti *accesslog.TLSInfo) {
	route, logged := p.routeOf(set, m)
	p.Stats.ended.count(route, m.Termination())
	p.record(set, m, route, logged, in, out, now, buffer, ti)
}

// routeOf is m's route and whether its connections are logged: the
// route's access_log for a routed connection, else the listener's.
func (p *Proxy) routeOf(set *settings, m *relay.Conn) (string, bool) {
	if route, logged, ok := set.router.named(m.RouteIndex()); ok {
		return route, logged
	}
	return "", set.relay.AccessLog
}

// connected logs a connect record, when the access log asks for them.
func (p *Proxy) connected(set *settings, m *relay.Conn, now int64, buffer int, ti *accesslog.TLSInfo) {
	if l := p.log.Load(); l != nil && l.OnConnect() {
		route, logged := p.routeOf(set, m)
		p.record(set, m, route, logged, 0, 0, now, buffer, ti)
	}
}

func (p *Proxy) record(set *settings, m *relay.Conn, route string, logged bool, in, out uint64, now int64, buffer int, ti *accesslog.TLSInfo) {
	l := p.log.Load()
	if l == nil || !logged {
		return
	}
	var r accesslog.Record
	m.Record(&r, now)
	r.Listener, r.Route, r.BytesIn, r.BytesOut = p.Name, route, in, out
	if ti != nil {
		r.TLS = *ti
	}
	r.Time = time.Now()
	r.Start = r.Time.Add(-r.Duration)
	if buffer < 0 {
		l.Add(&r)
	} else {
		l.AddFrom(buffer, &r)
	}
}

// refused counts and logs a client closed before a connection was made of
// it (max_conns; shutting down).
func (p *Proxy) refusedAtAccept(set *settings, client netip.AddrPort, t accesslog.Termination) {
	p.Stats.ended.count("", t)
	l := p.log.Load()
	if l == nil || !set.relay.AccessLog {
		return
	}
	r := accesslog.Record{Listener: p.Name, Client: client, Termination: t, Time: time.Now()}
	r.Start = r.Time
	l.Add(&r)
}
