package server

import (
	"errors"
	"fmt"
	"time"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/fleet"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/pool"
	"github.com/rota-proxy/rota/proxy"
)

// ListenerStatus is a point-in-time view of one listener, for the admin API
// and metrics. An unrouted listener's pool is in PoolStatus; a routed one
// has its pools in Routes, and PoolStatus sums them up (synced and OK when
// every route is, stale when one is, no targets).
type ListenerStatus struct {
	Name   string
	Listen string // as configured
	Addr   string // as bound
	PoolStatus
	Routes []RouteStatus // routed listeners only, in configuration order

	// Counters are the listener's counters (proxy.Counters), read when
	// the status was taken.
	Counters []proxy.Reading
	// LastConnections are the listener's last connections in the access
	// log, oldest first (none without an access log).
	LastConnections []accesslog.Record
}

// Count is the counter named name (its metric or JSON field, see
// proxy.Counters) for key ("" for a counter without a label).
func (l ListenerStatus) Count(name, key string) uint64 {
	return uint64(proxy.Count(l.Counters, name, key))
}

// RouteStatus is one route of a routed listener.
type RouteStatus struct {
	Name string
	SNI  []string
	PoolStatus
}

// PoolStatus is one pool: where its targets come from, how discovery
// fares, and the targets.
type PoolStatus struct {
	Service   string
	Discovery string

	Synced             bool      // the first discovery sync happened
	LastSync           time.Time // of the last answer from the registry; zero before the first
	LastError          string    // the current registry error; cleared when discovery recovers
	DiscoveryOK        bool      // no registry error since the last answer
	DiscoveryStale     bool      // the watch stopped hearing from its registry
	DiscoveryUpdates   uint64
	DiscoveryErrors    uint64
	DiscoveryMalformed uint64              // registry entries skipped as malformed, once each
	Warnings           []discovery.Warning // the malformed entries now in the registry
	Panic              bool                // routing over all discovered targets (panic mode)
	// Queue is where connections wait under max_conns_per_target (its
	// length, cap and waits); nil when the pool has no cap.
	Queue *balancer.Gate

	Targets []TargetStatus // sorted by address
}

// TargetStatus is one discovered target: the pool's view of it (its
// weights, drain mark, and the live counters of its *balancer.Target) and
// its health.
type TargetStatus struct {
	pool.TargetView
	Health health.Status
}

// ErrNotFound: no such listener or target.
var ErrNotFound = errors.New("not found")

// Drain stops (on) or resumes new connections to target addr of listener
// name (in every route that has it); its open connections stay (until
// removed_conn_grace, if set). The mark is kept across discovery churn and
// reloads: in this process, or, with registries.state etcd or consul, in
// the registry, where every rota reading it applies it. It returns once
// this process's picker reflects it.
func (s *Server) Drain(name, addr string, on bool) error {
	l, pools, err := s.targetPools(name, addr)
	if err != nil {
		return err
	}
	if st := s.stateStore(l); st != nil {
		return s.setMark(l, st, pools, addr, func(m *fleet.Mark) { m.Drain = on },
			func(tv pool.TargetView) bool { return tv.Draining == on })
	}
	for _, p := range pools {
		p.Drain(addr, on)
	}
	return nil
}

// SetWeight overrides the registry's weight of target addr of listener
// name (0 clears the override), where Drain keeps its marks. It returns
// once this process's picker reflects it.
func (s *Server) SetWeight(name, addr string, weight int) error {
	l, pools, err := s.targetPools(name, addr)
	if err != nil {
		return err
	}
	if st := s.stateStore(l); st != nil {
		return s.setMark(l, st, pools, addr, func(m *fleet.Mark) { m.Weight = weight },
			func(tv pool.TargetView) bool {
				if weight > 0 {
					return tv.Weight == weight && tv.WeightSource == st.Kind()
				}
				return tv.WeightSource != st.Kind()
			})
	}
	for _, p := range pools {
		p.SetWeight(addr, weight)
	}
	return nil
}

// targetPools finds listener name and the pools of its routes that have
// target addr.
func (s *Server) targetPools(name, addr string) (*listener, []*pool.Pool, error) {
	s.mu.Lock()
	var l *listener
	for _, x := range s.listeners {
		if x.config().Name == name {
			l = x
		}
	}
	s.mu.Unlock()
	if l == nil {
		return nil, nil, fmt.Errorf("listener %q: %w", name, ErrNotFound)
	}
	var pools []*pool.Pool
	for _, r := range l.routeList() {
		for _, tv := range r.pool.View().Targets {
			if tv.Addr == addr {
				pools = append(pools, r.pool)
				break
			}
		}
	}
	if len(pools) == 0 {
		return nil, nil, fmt.Errorf("listener %q has no target %q: %w", name, addr, ErrNotFound)
	}
	return l, pools, nil
}

// Routed is how many targets the named listener's pickers offer now
// (every route's), -1 when there is no such listener. Unlike Status it
// reads only the published pickers: cheap at any number of targets.
func (s *Server) Routed(name string) int {
	s.mu.Lock()
	lns := append([]*listener(nil), s.listeners...)
	s.mu.Unlock()
	for _, l := range lns {
		if l.config().Name != name {
			continue
		}
		n := 0
		for _, r := range l.routeList() {
			n += len(r.pool.View().Live)
		}
		return n
	}
	return -1
}

// Status returns the state of every listener, in configuration order.
func (s *Server) Status() []ListenerStatus {
	s.mu.Lock()
	lns := append([]*listener(nil), s.listeners...)
	s.mu.Unlock()
	alog := s.AccessLog()
	out := make([]ListenerStatus, 0, len(lns))
	for _, l := range lns {
		st := l.status()
		if alog != nil {
			st.LastConnections = alog.Recent(st.Name)
		}
		out = append(out, st)
	}
	return out
}

func (l *listener) status() ListenerStatus {
	cfg := l.config()
	st := ListenerStatus{Name: cfg.Name, Listen: cfg.Listen}
	rs := l.routeList()
	if !cfg.Routed() && len(rs) == 1 {
		st.PoolStatus = rs[0].status(rs[0].spec.Load())
	} else {
		st.Synced, st.DiscoveryOK = true, true
		for _, r := range rs {
			spec := r.spec.Load() // one configuration's, whatever a reload does meanwhile
			rst := RouteStatus{Name: r.name, SNI: spec.sni, PoolStatus: r.status(spec)}
			st.Routes = append(st.Routes, rst)
			st.Synced = st.Synced && rst.Synced
			st.DiscoveryOK = st.DiscoveryOK && rst.DiscoveryOK
			st.DiscoveryStale = st.DiscoveryStale || rst.DiscoveryStale
			if rst.LastError != "" && st.LastError == "" {
				st.LastError = "route " + r.name + ": " + rst.LastError
			}
			if rst.LastSync.After(st.LastSync) {
				st.LastSync = rst.LastSync
			}
		}
	}
	l.mu.Lock()
	if l.ln != nil {
		st.Addr = l.ln.Addr().String()
	}
	l.mu.Unlock()
	st.Counters = l.proxy.Stats.Read()
	return st
}

// status is the route's pool's status; spec is the route's configuration
// the caller read.
func (r *route) status(spec *routeSpec) PoolStatus {
	v := r.pool.View()
	d := r.pool.Discovery()
	src := spec.pool
	st := PoolStatus{
		Service: src.Service, Discovery: src.Discovery,
		Panic: v.Panic, Warnings: v.Warnings,
		Synced: d.Synced, LastSync: d.LastSync, LastError: d.LastError, DiscoveryOK: d.OK,
		DiscoveryStale: d.Stale, DiscoveryUpdates: d.Updates, DiscoveryErrors: d.Errors,
		DiscoveryMalformed: d.Malformed,
	}
	if q := r.pool.Queue(); q.Cap() > 0 {
		st.Queue = q
	}
	hs := r.pool.Health()
	st.Targets = make([]TargetStatus, 0, len(v.Targets))
	i := 0
	for _, tv := range v.Targets {
		// Both are sorted by address; health may lag the view by a beat.
		for i < len(hs) && hs[i].Addr < tv.Addr {
			i++
		}
		h := health.Status{Addr: tv.Addr}
		if i < len(hs) && hs[i].Addr == tv.Addr {
			h = hs[i]
		}
		st.Targets = append(st.Targets, TargetStatus{TargetView: tv, Health: h})
	}
	return st
}
