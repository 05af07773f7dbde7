package server

import (
	"time"

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

	Synced           bool      // the first discovery sync happened
	LastSync         time.Time // of the last snapshot; zero before the first
	LastError        string    // latest registry error, kept after recovery
	DiscoveryOK      bool      // no registry error since the last snapshot
	DiscoveryUpdates uint64
	DiscoveryErrors  uint64
	Panic            bool // routing over all discovered targets (panic mode)

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

	Targets []TargetStatus // sorted by address
}

// TargetStatus is one discovered target: its health and its connections.
type TargetStatus struct {
	health.Status
	Active     int64
	Total      uint64
	DialErrors uint64
	BytesIn    uint64
	BytesOut   uint64
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
	hs := l.checker.Status()
	l.mu.Lock()
	cfg := l.cfg
	st := ListenerStatus{
		Name: cfg.Name, Listen: cfg.Listen, Service: cfg.Service, Discovery: cfg.Discovery,
		Panic: l.panicking,
	}
	if l.ln != nil {
		st.Addr = l.ln.Addr().String()
	}
	st.Targets = make([]TargetStatus, 0, len(hs))
	for _, h := range hs {
		t, ok := l.targets[h.Addr]
		if !ok {
			continue // removed between the two reads
		}
		st.Targets = append(st.Targets, TargetStatus{
			Status:     h,
			Active:     t.Active.Load(),
			Total:      t.Total.Load(),
			DialErrors: t.DialErrors.Load(),
			BytesIn:    t.BytesIn.Load(),
			BytesOut:   t.BytesOut.Load(),
		})
	}
	l.mu.Unlock()

	st.Synced = l.synced.Load()
	if ns := l.lastSync.Load(); ns != 0 {
		st.LastSync = time.Unix(0, ns)
	}
	if e := l.lastErr.Load(); e != nil {
		st.LastError = *e
	}
	st.DiscoveryOK = !l.inError.Load()
	st.DiscoveryUpdates = l.updates.Load()
	st.DiscoveryErrors = l.errors.Load()
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
	return st
}
