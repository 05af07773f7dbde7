package pool

import (
	"math"
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
	// Weight is the one in force (at least 1): an override's (the
	// fleet's, else a local one), else the registry's; EffectiveWeight is
	// what the picker uses now: less than Weight during a slow start.
	Weight          int
	EffectiveWeight float64
	// Draining: an operator, or its registry, asked for no new
	// connections to it.
	Draining bool
	// DrainSource is where the drain mark is kept: "local" (this
	// process), the fleet store's kind ("etcd", "consul"), or "registry"
	// (the instance is on its way out: a terminating Kubernetes
	// endpoint); "" for none.
	// WeightSource is where Weight comes from: "registry", "local", or
	// the fleet store's kind.
	DrainSource, WeightSource string
	// Backup: it gets new connections only while no primary is live
	// (Instance.Backup, here for the admin API and metrics).
	Backup bool
	// History is its new connections per second over the last minute.
	History *History
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
// serializer), and tells Retired of every target whose reason to take no
// new connections changed.
func (p *Pool) rebuild() {
	p.dirty = false
	now := time.Now()
	entries := make([]balancer.Entry, 0, len(p.order))
	set := make([]*balancer.Target, 0, len(p.order))
	ramping := false
	add := func(e *entry) {
		w := p.effective(e, now)
		ramping = ramping || !e.liveSince.IsZero()
		entries = append(entries, balancer.Entry{T: e.t, W: int(math.Round(w * weightScale))})
		set = append(set, e.t)
	}
	// Backups serve only while no primary is live; a primary back takes
	// the new connections again (open ones stay where they are). While
	// primaries serve, live backups are the last resort of a connection
	// whose every primary failed before the pool heard of it.
	var fallback []*balancer.Target
	for _, e := range p.order {
		if e.up && !p.isDrained(e.t.Addr) && !e.inst.Backup {
			add(e)
		}
	}
	primaries := len(set) > 0
	for _, e := range p.order {
		if e.up && !p.isDrained(e.t.Addr) && e.inst.Backup {
			if primaries {
				fallback = append(fallback, e.t)
			} else {
				add(e)
			}
		}
	}
	discovered := p.discovered()
	panicking := len(set) == 0 && discovered > 0 && p.cfg.Panic
	if panicking {
		for _, e := range p.order {
			if !e.bridging && !p.isDrained(e.t.Addr) {
				add(e)
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
	if len(set) > 0 {
		p.serving = true
	}
	p.bal.SetHash(p.cfg.HashBalanceFactor, p.cfg.HashKey == "sni")
	p.gate.Set(p.cfg.MaxConnsPerTarget, p.cfg.QueueSize, p.cfg.QueueTimeout)
	if p.cfg.MaxConnsPerTarget > 0 {
		p.bal.SetGate(p.gate)
	} else {
		p.bal.SetGate(nil)
	}
	p.bal.UpdateWithFallback(p.cfg.Balance, entries, fallback)
	p.retire(panicking)
	if ramping && p.ramp == nil {
		p.ramp = p.after(max(p.cfg.SlowStart/rampSteps, minRampStep), func() {
			p.ramp = nil
			p.dirty = true
		})
	}
	v := &View{Targets: make([]TargetView, len(p.order)), Warnings: p.warnings, Panic: panicking, Live: set}
	for i, e := range p.order {
		v.Targets[i] = TargetView{
			Target: e.t, Instance: e.inst, Bridging: e.bridging,
			Weight: p.weightOf(e), EffectiveWeight: math.Round(p.effective(e, now)*100) / 100,
			Draining: p.isDrained(e.t.Addr), History: e.history, Backup: e.inst.Backup,
			DrainSource: p.drainSource(e.t.Addr), WeightSource: p.weightSource(e),
		}
	}
	p.view.Store(v)
	if p.cfg.Published != nil {
		p.cfg.Published(v)
	}
}

const (
	// weightScale keeps two decimals of an effective weight in the
	// picker's integer weights (the picker reduces them by their common
	// divisor, so equal weights stay a plain rotation).
	weightScale = 100
	// rampSteps is how many times a slow start's weight is raised; a
	// ramp step is at least minRampStep.
	rampSteps   = 20
	minRampStep = 50 * time.Millisecond
	// rampFloor is the share of its weight a target starts a slow start
	// with: small, but enough to warm it.
	rampFloor = 0.05
)

// weightOf is an instance's weight (a registry that says nothing means 1).
// weightOf is e's weight before any slow start: the fleet's override, else
// a local one, else the registry's (at least 1).
func (p *Pool) weightOf(e *entry) int {
	if w := p.fleet[e.t.Addr].Weight; w > 0 {
		return w
	}
	if w := p.weights[e.t.Addr]; w > 0 {
		return w
	}
	return max(e.inst.Weight, 1)
}

// weightSource says where e's weight comes from: "registry", "local" or
// the fleet store's kind.
func (p *Pool) weightSource(e *entry) string {
	switch {
	case p.fleet[e.t.Addr].Weight > 0:
		return p.fleetKind
	case p.weights[e.t.Addr] > 0:
		return "local"
	}
	return "registry"
}

// drainSource says where addr's drain mark comes from ("" for none).
func (p *Pool) drainSource(addr string) string {
	switch {
	case p.fleet[addr].Drain:
		return p.fleetKind
	case p.drained[addr]:
		return "local"
	case p.registryDrains(addr):
		return "registry"
	}
	return ""
}

// isDrained tells whether addr takes no new connections by a mark, the
// fleet's or a local one, or because its registry says it is on its way
// out (discovery.Instance.Draining).
func (p *Pool) isDrained(addr string) bool {
	return p.drained[addr] || p.fleet[addr].Drain || p.registryDrains(addr)
}

func (p *Pool) registryDrains(addr string) bool {
	e := p.entries[addr]
	return e != nil && e.inst.Draining
}

// effective is e's weight now: its full weight, or a share of it rising
// linearly over a slow start. A finished slow start is cleared.
func (p *Pool) effective(e *entry, now time.Time) float64 {
	w := float64(p.weightOf(e))
	if e.liveSince.IsZero() {
		return w
	}
	frac := float64(now.Sub(e.liveSince)) / float64(p.cfg.SlowStart)
	if p.cfg.SlowStart <= 0 || frac >= 1 {
		e.liveSince = time.Time{}
		return w
	}
	return w * max(rampFloor, frac)
}

// startRamp begins e's slow start if it turns live while another target
// serves: a target that starts with the pool, or alone, has nobody to
// spare it.
func (p *Pool) startRamp(e *entry) {
	if p.cfg.SlowStart <= 0 || !p.serving {
		return
	}
	for _, o := range p.order {
		if o != e && o.up && !p.isDrained(o.t.Addr) {
			e.liveSince = time.Now()
			return
		}
	}
}

// retire tells Retired of every target whose reason to take no new
// connections changed since the last rebuild: balancer.Removed (no longer
// discovered), Down (failing its checks, outside panic mode), Drained, or
// Kept (taking them again). Only targets that have served are followed:
// one that never did has no connections to close.
func (p *Pool) retire(panicking bool) {
	if p.cfg.Retired == nil {
		p.gone = nil
		return
	}
	for _, e := range p.order {
		why := balancer.Kept
		switch {
		case p.isDrained(e.t.Addr):
			why = balancer.Drained
		case !e.up && !panicking && !e.bridging:
			why = balancer.Down
		}
		switch {
		case e.followed && e.why != why:
			p.cfg.Retired(e.t, why)
		case !e.followed && why == balancer.Kept:
			e.followed = true
		}
		e.why = why
	}
	for _, t := range p.gone {
		p.cfg.Retired(t, balancer.Removed)
	}
	p.gone = nil
}

func sortEntries(es []*entry) {
	slices.SortFunc(es, func(a, b *entry) int { return strings.Compare(a.t.Addr, b.t.Addr) })
}
