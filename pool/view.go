package pool

import (
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/discovery"
)

// View is what the admin API shows of a pool: rebuilt with the picker, and
// immutable once published.
type View struct {
	Targets  []TargetView // every known target, sorted by address
	Warnings []discovery.Warning
	Panic    bool               // routing over every discovered target: none is live
	Live     []*balancer.Target // what the picker offers, in its order
}

// TargetView is one target: its registry entry and its connection counters.
type TargetView struct {
	*balancer.Target
	Instance discovery.Instance
	// Bridging: no longer discovered, serving until a new target is live.
	Bridging bool
}

// DiscoveryState is the registry side of a pool, for the admin API and
// metrics.
type DiscoveryState struct {
	Synced    bool      // the first answer came
	LastSync  time.Time // of the last answer, changed or not; zero before the first
	OK        bool      // no registry error since the last answer
	Stale     bool      // the last error: the watch stopped hearing from its registry
	LastError string    // of the current failure; empty once recovered
	Updates   uint64    // snapshots applied
	Errors    uint64    // registry errors
	Malformed uint64    // registry entries skipped as malformed, counted once each
}

// View returns the latest view.
func (p *Pool) View() *View { return p.view.Load() }

// Discovery returns the registry side of the pool.
func (p *Pool) Discovery() DiscoveryState {
	d := DiscoveryState{
		Synced: p.synced.Load(), OK: !p.failing.Load(), Stale: p.stale.Load(),
		Updates: p.updates.Load(), Errors: p.errors.Load(), Malformed: p.malformed.Load(),
	}
	if ns := p.lastSync.Load(); ns != 0 {
		d.LastSync = time.Unix(0, ns)
	}
	if e := p.lastErr.Load(); e != nil && !d.OK {
		d.LastError = *e
	}
	return d
}

// rebuild publishes a new picker and view from the entries (on the
// serializer).
func (p *Pool) rebuild() {
	p.dirty = false
	set := make([]*balancer.Target, 0, len(p.order))
	for _, e := range p.order {
		if e.up {
			set = append(set, e.t)
		}
	}
	discovered := p.discovered()
	panicking := len(set) == 0 && discovered > 0 && p.cfg.Panic
	if panicking {
		for _, e := range p.order {
			if !e.bridging {
				set = append(set, e.t)
			}
		}
	}
	if panicking != p.panicking {
		p.panicking = panicking
		if panicking {
			p.log.Warn("panic mode: no target passes its checks; routing over all discovered targets",
				zap.Int("targets", len(set)))
		} else {
			p.log.Info("panic mode over", zap.Int("live", len(set)))
		}
	}
	p.rr.Update(set)
	v := &View{Targets: make([]TargetView, len(p.order)), Warnings: p.warnings, Panic: panicking, Live: set}
	for i, e := range p.order {
		v.Targets[i] = TargetView{Target: e.t, Instance: e.inst, Bridging: e.bridging}
	}
	p.view.Store(v)
	if p.cfg.Published != nil {
		p.cfg.Published(v)
	}
}

func sortEntries(es []*entry) {
	slices.SortFunc(es, func(a, b *entry) int { return strings.Compare(a.t.Addr, b.t.Addr) })
}
