package server

import (
	"errors"
	"fmt"
	"time"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/health"
)

// ListenerStatus is a point-in-time view of one listener, for the admin API
// and metrics.
type ListenerStatus struct {
	Name      string
	Listen    string // as configured
	Addr      string // as bound
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

	Accepted   uint64
	Rejected   uint64
	NoTarget   uint64
	DialErrors uint64
	Active     int64
	BytesIn    uint64 // from targets to clients
	BytesOut   uint64 // from clients to targets
	// ProxyHeaderErrors counts clients closed for a bad or untrusted PROXY
	// protocol header.
	ProxyHeaderErrors uint64
	// RelayPanics counts connections closed because relaying them panicked.
	RelayPanics uint64
	// Closed counts connections rota wound down, by reason: "removed",
	// "down", "drained" (removed_conn_grace), "max_age".
	Closed map[string]uint64

	Targets []TargetStatus // sorted by address
}

// TargetStatus is one discovered target: its health and its connections.
type TargetStatus struct {
	health.Status
	Weight int // from the registry (at least 1)
	// EffectiveWeight is what the picker uses now: below Weight while the
	// target ramps up (slow start).
	EffectiveWeight float64
	Draining        bool     // an operator drained it
	History         []uint32 // new connections per second, the last minute, oldest first
	Active          int64
	Total           uint64
	DialErrors      uint64
	BytesIn         uint64
	BytesOut        uint64
}

// ErrNotFound: no such listener or target.
var ErrNotFound = errors.New("not found")

// Drain stops (on) or resumes new connections to target addr of listener
// name; its open connections stay (until removed_conn_grace, if set). The
// mark is kept across discovery churn and reloads. It returns once the
// picker reflects it.
func (s *Server) Drain(name, addr string, on bool) error {
	s.mu.Lock()
	var l *listener
	for _, x := range s.listeners {
		if x.config().Name == name {
			l = x
		}
	}
	s.mu.Unlock()
	if l == nil {
		return fmt.Errorf("listener %q: %w", name, ErrNotFound)
	}
	known := false
	for _, tv := range l.pool.View().Targets {
		known = known || tv.Addr == addr
	}
	if !known {
		return fmt.Errorf("listener %q has no target %q: %w", name, addr, ErrNotFound)
	}
	l.pool.Drain(addr, on)
	return nil
}

// Status returns the state of every listener, in configuration order.
func (s *Server) Status() []ListenerStatus {
	s.mu.Lock()
	lns := append([]*listener(nil), s.listeners...)
	s.mu.Unlock()
	out := make([]ListenerStatus, 0, len(lns))
	for _, l := range lns {
		out = append(out, l.status())
	}
	return out
}

func (l *listener) status() ListenerStatus {
	cfg := l.config()
	v := l.pool.View()
	d := l.pool.Discovery()
	st := ListenerStatus{
		Name: cfg.Name, Listen: cfg.Listen, Service: cfg.Service, Discovery: cfg.Discovery,
		Panic: v.Panic, Warnings: v.Warnings,
		Synced: d.Synced, LastSync: d.LastSync, LastError: d.LastError, DiscoveryOK: d.OK,
		DiscoveryStale: d.Stale, DiscoveryUpdates: d.Updates, DiscoveryErrors: d.Errors,
		DiscoveryMalformed: d.Malformed,
	}
	l.mu.Lock()
	if l.ln != nil {
		st.Addr = l.ln.Addr().String()
	}
	l.mu.Unlock()
	hs := l.pool.Health()
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
		t := tv.Target
		st.Targets = append(st.Targets, TargetStatus{
			Status:          h,
			Weight:          tv.Weight,
			EffectiveWeight: tv.EffectiveWeight,
			Draining:        tv.Draining,
			History:         tv.History.Samples(),
			Active:          t.Active.Load(),
			Total:           t.Total.Load(),
			DialErrors:      t.DialErrors.Load(),
			BytesIn:         t.BytesIn.Load(),
			BytesOut:        t.BytesOut.Load(),
		})
	}
	ps := &l.proxy.Stats
	st.Accepted = ps.Accepted.Load()
	st.Rejected = ps.Rejected.Load()
	st.NoTarget = ps.NoTarget.Load()
	st.DialErrors = ps.DialErrors.Load()
	st.Active = ps.Active.Load()
	st.BytesIn = ps.BytesIn.Load()
	st.BytesOut = ps.BytesOut.Load()
	st.ProxyHeaderErrors = ps.HeaderErrors.Load()
	st.RelayPanics = ps.Panics.Load()
	st.Closed = make(map[string]uint64, 4)
	for _, r := range []string{"removed", "down", "drained", "max_age"} {
		st.Closed[r] = l.proxy.Closed(r)
	}
	return st
}
