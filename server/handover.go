package server

import (
	"time"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/health"
)

// HandoverVersion is the version of HandoverState this build writes and
// reads; a process handed another version starts fresh (and says so).
const HandoverVersion = 1

// HandoverState is what a process passes to the one that takes over from
// it in an upgrade, beside the sockets: each pool's health (state,
// counters, when the next probe is due), its local drain marks and weight
// overrides (the fleet's are in the registry), its last discovered
// instances and its targets' slow-start progress. It is JSON.
type HandoverState struct {
	Version int         `json:"version"`
	Pools   []PoolState `json:"pools"`
}

// PoolState is one listener's (or route's) pool in a HandoverState.
type PoolState struct {
	Listener string          `json:"listener"`
	Route    string          `json:"route,omitempty"`
	Health   []health.Status `json:"health"`
	Drained  []string        `json:"drained,omitempty"`
	Weights  map[string]int  `json:"weights,omitempty"`
	// Instances are the last discovered; Ramps, when each target still
	// ramping up (slow start) began.
	Instances []discovery.Instance `json:"instances,omitempty"`
	Ramps     map[string]time.Time `json:"ramps,omitempty"`
}

// Handover returns the state to pass on in an upgrade.
func (s *Server) Handover() *HandoverState {
	s.mu.Lock()
	ls := s.listeners
	s.mu.Unlock()
	st := &HandoverState{Version: HandoverVersion}
	for _, l := range ls {
		name := l.config().Name
		for _, r := range l.routeList() {
			ps := PoolState{Listener: name, Route: r.name, Health: r.pool.Health()}
			ps.Instances, ps.Ramps = r.pool.Handover()
			for _, tv := range r.pool.View().Targets {
				if tv.Draining && tv.DrainSource == "local" {
					ps.Drained = append(ps.Drained, tv.Addr)
				}
				if tv.WeightSource == "local" {
					if ps.Weights == nil {
						ps.Weights = map[string]int{}
					}
					ps.Weights[tv.Addr] = tv.Weight
				}
			}
			st.Pools = append(st.Pools, ps)
		}
	}
	return st
}

// restoreRoute gives a new pool the state its namesake had in the process
// this one took over from, once.
func (s *Server) restoreRoute(listener string, r *route) {
	if s.restore == nil {
		return
	}
	for i, ps := range s.restore.Pools {
		if ps.Listener != listener || ps.Route != r.name {
			continue
		}
		r.pool.Seed(ps.Health)
		for _, addr := range ps.Drained {
			r.pool.Drain(addr, true)
		}
		for addr, w := range ps.Weights {
			r.pool.SetWeight(addr, w)
		}
		r.pool.SeedDiscovery(ps.Instances, ps.Ramps)
		s.restore.Pools = append(s.restore.Pools[:i], s.restore.Pools[i+1:]...)
		return
	}
}
