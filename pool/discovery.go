package pool

import (
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/discovery"
)

// NewSink returns the sink a discovery watcher feeds this pool through.
// Making a new one retires the previous: what an older watcher still
// pushes is ignored, so a replaced watcher cannot overwrite its successor.
func (p *Pool) NewSink() discovery.Sink {
	gen := p.sinkGen.Add(1)
	current := func() bool { return p.sinkGen.Load() == gen }
	return discovery.SinkFuncs{
		OnUpdate: func(s discovery.Snapshot) {
			if current() {
				p.inputs.push(func() {
					if current() {
						p.apply(s)
					}
				})
			}
		},
		OnSynced: func() {
			if current() {
				p.answered()
			}
		},
		OnError: func(err error) {
			if current() {
				p.failed(err)
			}
		},
	}
}

// answered records an answer from the registry: it is reachable.
func (p *Pool) answered() {
	p.lastSync.Store(time.Now().UnixNano())
	p.stale.Store(false)
	if p.failing.CompareAndSwap(true, false) {
		p.lastErr.Store(nil)
		p.log.Info("discovery recovered")
	}
}

// failed records a registry failure. The last good targets stay.
func (p *Pool) failed(err error) {
	p.errors.Add(1)
	msg := discovery.Truncate(err.Error())
	p.lastErr.Store(&msg)
	p.stale.Store(errors.Is(err, discovery.ErrStale))
	if !p.failing.Swap(true) {
		p.log.Warn("discovery failing; keeping the last known instances", zap.String("error", msg))
	}
}

// apply makes s the discovered set (on the serializer).
func (p *Pool) apply(s discovery.Snapshot) {
	p.updates.Add(1)
	p.answered()
	p.noteWarnings(s.Warnings)
	first := !p.synced.Load()
	if p.holdEmpty(s) {
		return
	}
	added, removed := p.merge(s.Instances)
	p.synced.Store(true)
	switch {
	case first:
		p.log.Info("discovery synced", zap.Int("instances", len(s.Instances)), sample("addrs", s.Instances))
	case len(added)+len(removed) > 0:
		p.log.Info("instances changed", zap.Int("instances", len(s.Instances)),
			zap.Int("added", len(added)), zap.Strings("added_sample", head(added)),
			zap.Int("removed", len(removed)), zap.Strings("removed_sample", head(removed)))
	}
	p.dirty = true
}

// holdEmpty decides whether an empty answer must wait: only the first
// answer after an outage, restart or resync is doubted, and only when it
// would empty a pool that has targets. It arms the timer that applies it
// after EmptyHold unless a non-empty answer comes first.
func (p *Pool) holdEmpty(s discovery.Snapshot) bool {
	doubt := len(s.Instances) == 0 && s.Resync && p.cfg.EmptyHold > 0 && p.discovered() > 0
	if !doubt {
		if p.hold != nil {
			// Said, since the answer may change nothing to log.
			p.log.Info("registry reports instances again; the hold ends", zap.Int("instances", len(s.Instances)))
		}
		p.cancelHold()
		return false
	}
	if p.hold == nil {
		p.log.Warn("registry reports no instances in an answer it doubts (right after an outage, a restart or a change of leader); keeping the last known ones for a while",
			zap.Int("instances", p.discovered()), zap.Duration("hold", p.cfg.EmptyHold))
		p.holdGen++
		gen := p.holdGen
		p.hold = p.after(p.cfg.EmptyHold, func() {
			if p.hold == nil || p.holdGen != gen {
				return // a newer answer came first
			}
			p.hold = nil
			p.log.Warn("registry still reports no instances; dropping the last known ones")
			p.merge(nil)
			p.dirty = true
		})
	}
	return true
}

func (p *Pool) cancelHold() {
	if p.hold != nil {
		p.hold.Stop()
		p.hold = nil
		p.holdGen++
	}
}

// discovered is the number of discovered targets (bridging ones aside).
func (p *Pool) discovered() int {
	n := 0
	for _, e := range p.order {
		if !e.bridging {
			n++
		}
	}
	return n
}

// merge makes ins (sorted by address) the discovered targets and tells the
// checker. Known addresses keep their targets; a snapshot that would leave
// nothing live while it brings new targets is bridged (make-before-break).
// It returns the addresses added and removed.
func (p *Pool) merge(ins []discovery.Instance) (added, removed []string) {
	next := make([]*entry, 0, len(ins))
	keep := make(map[string]bool, len(ins))
	for _, in := range ins {
		keep[in.Addr] = true
		e, ok := p.entries[in.Addr]
		if !ok {
			e = &entry{t: p.bal.NewTarget(in.Addr), history: &History{}, initial: !p.serving}
			p.entries[in.Addr] = e
			added = append(added, in.Addr)
		}
		e.inst, e.bridging = in, false
		next = append(next, e)
	}
	// Targets that leave: dropped at once, unless every live target leaves
	// while new ones arrive, which would refuse every client until a new
	// target passes its first probe. Then the live ones keep serving,
	// bounded by the probe timeout.
	var leaving []*entry
	liveStays := false
	for _, e := range p.order {
		if keep[e.t.Addr] {
			liveStays = liveStays || e.up
			continue
		}
		if !e.bridging {
			removed = append(removed, e.t.Addr)
		}
		leaving = append(leaving, e)
	}
	bridging := !liveStays && len(added) > 0 && anyUp(leaving)
	for _, e := range leaving {
		if bridging && e.up {
			e.bridging = true
			next = append(next, e)
			continue
		}
		p.forget(e)
	}
	if bridging {
		sortEntries(next)
		p.startBridge()
	} else {
		p.endBridge()
	}
	p.order = next
	addrs := make([]string, len(next))
	for i, e := range next {
		addrs[i] = e.t.Addr
	}
	p.checker.Update(addrs)
	return added, removed
}

// forget drops e, no longer discovered; Retired hears of it at the next
// rebuild if it served.
func (p *Pool) forget(e *entry) {
	delete(p.entries, e.t.Addr)
	if e.followed {
		p.gone = append(p.gone, e.t)
	}
}

func anyUp(es []*entry) bool {
	for _, e := range es {
		if e.up {
			return true
		}
	}
	return false
}

// startBridge arms the deadline of a make-before-break.
func (p *Pool) startBridge() {
	p.endBridge()
	b := &bridge{}
	p.bridge = b
	b.timer = p.after(p.cfg.Health.Timeout+100*time.Millisecond, func() {
		if p.bridge == b {
			p.log.Info("no new target passed its first probe in time; dropping the old ones")
			p.dropBridging()
		}
	})
}

// endBridge stops a make-before-break whose old targets are gone already.
func (p *Pool) endBridge() {
	if p.bridge != nil {
		p.bridge.timer.Stop()
		p.bridge = nil
	}
}

// dropBridging ends a make-before-break: the old targets go.
func (p *Pool) dropBridging() {
	p.endBridge()
	next := p.order[:0]
	var addrs []string
	for _, e := range p.order {
		if e.bridging {
			p.forget(e)
			continue
		}
		next = append(next, e)
		addrs = append(addrs, e.t.Addr)
	}
	clear(p.order[len(next):])
	p.order = next
	p.checker.Update(addrs)
	p.dirty = true
}

// healthChanged applies one target's health change (on the serializer).
func (p *Pool) healthChanged(addr string, up bool) {
	e, ok := p.entries[addr]
	if !ok {
		return
	}
	first := e.initial
	e.initial = false
	if e.up == up {
		return
	}
	e.up = up
	p.dirty = true
	if up && !first {
		p.startRamp(e)
	} else if !up {
		e.liveSince = time.Time{}
	}
	if up && !e.bridging && p.bridge != nil {
		p.dropBridging() // a new target is live: the old ones can go
	}
}

// noteWarnings takes the registry's current warnings; new ones count.
func (p *Pool) noteWarnings(ws []discovery.Warning) {
	seen := make(map[discovery.Warning]bool, len(ws))
	for _, w := range ws {
		if !p.seenWarn[w] {
			p.malformed.Add(1)
		}
		seen[w] = true
	}
	p.seenWarn, p.warnings = seen, ws
}

// sample is a log field with the first few instance addresses.
func sample(key string, ins []discovery.Instance) zap.Field {
	n := min(len(ins), 5)
	addrs := make([]string, n)
	for i := range n {
		addrs[i] = ins[i].Addr
	}
	return zap.Strings(key, addrs)
}

func head(addrs []string) []string { return addrs[:min(len(addrs), 5)] }

// Handover returns what a process taking over from this one needs to start
// where this pool stands: the instances discovered and, for each target
// still ramping up (slow start), when it began. It waits for the
// serializer; nil, nil once the pool is closed.
func (p *Pool) Handover() ([]discovery.Instance, map[string]time.Time) {
	type out struct {
		ins   []discovery.Instance
		ramps map[string]time.Time
	}
	ch := make(chan out, 1)
	if !p.inputs.push(func() {
		var o out
		for _, e := range p.order {
			if e.bridging {
				continue
			}
			o.ins = append(o.ins, e.inst)
			if !e.liveSince.IsZero() {
				if o.ramps == nil {
					o.ramps = map[string]time.Time{}
				}
				o.ramps[e.t.Addr] = e.liveSince
			}
		}
		ch <- o
	}) {
		return nil, nil
	}
	select {
	case o := <-ch:
		return o.ins, o.ramps
	case <-p.done:
		return nil, nil
	}
}

// SeedDiscovery starts the pool with the instances another process had
// discovered (an upgrade), as if its registry had answered with them, so
// that it serves before its own watch's first answer (which replaces them,
// as any answer does); targets ramping up there go on from when they began.
// A pool whose watch answered first keeps its answer.
func (p *Pool) SeedDiscovery(ins []discovery.Instance, ramps map[string]time.Time) {
	p.inputs.push(func() {
		if !p.synced.Load() && len(ins) > 0 {
			p.merge(ins)
			p.synced.Store(true)
			p.log.Info("discovery seeded from the process this one took over from", zap.Int("instances", len(ins)))
		}
		for addr, since := range ramps {
			if e, ok := p.entries[addr]; ok && p.cfg.SlowStart > 0 {
				e.liveSince = since
			}
		}
		p.dirty = true
	})
}
