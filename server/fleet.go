package server

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/fleet"
	"github.com/rota-proxy/rota/pool"
)

// fleetWatch follows one registry's fleet marks (registries.state) on a
// goroutine of its own, which stop ends, and hands every set to apply.
type fleetWatch struct {
	store  fleet.Store
	cancel context.CancelFunc
	done   chan struct{}
	first  chan struct{}               // closed at the first set read, or the first failure
	marks  atomic.Pointer[fleet.Marks] // the last set read; nil before the first
}

// firstWait bounds how long a start waits for the marks: a rota that
// restarts must not send its first connections to a target the fleet
// drained, but an unreachable registry must not hold it up for long.
const firstWait = 2 * time.Second

// waitFirst waits until the first set is read or the first failure, at
// most firstWait.
func (w *fleetWatch) waitFirst() {
	select {
	case <-w.first:
	case <-time.After(firstWait):
	}
}

// startFleetWatch watches store; apply gets every set of marks read (on
// the watch's goroutine: it must not block).
func startFleetWatch(store fleet.Store, apply func(kind string, m fleet.Marks), log *zap.Logger) *fleetWatch {
	ctx, cancel := context.WithCancel(context.Background())
	w := &fleetWatch{store: store, cancel: cancel, done: make(chan struct{}), first: make(chan struct{})}
	var once sync.Once
	firstDone := func() { once.Do(func() { close(w.first) }) }
	go func() {
		defer close(w.done)
		defer firstDone()
		failing := false
		store.Watch(ctx, func(m fleet.Marks) {
			defer firstDone()
			if failing {
				log.Info("fleet marks read again", zap.String("registry", store.Kind()))
				failing = false
			}
			w.marks.Store(&m)
			apply(store.Kind(), m)
		}, func(err error) {
			defer firstDone()
			if !failing {
				log.Warn("fleet marks unreadable; keeping the last ones", zap.String("registry", store.Kind()), zap.Error(err))
				failing = true
			}
		})
	}()
	return w
}

// stop ends the watch and waits for its goroutine.
func (w *fleetWatch) stop() {
	w.cancel()
	<-w.done
}

// applyFleet hands kind's marks to every listener that keeps its marks
// there. It never blocks on a pool.
func (s *Server) applyFleet(kind string, m fleet.Marks) {
	s.mu.Lock()
	lns, cfg := s.listeners, s.cfg
	s.mu.Unlock()
	if cfg == nil {
		return
	}
	for _, l := range lns {
		lc := l.config()
		if cfg.Registries.StateOf(lc) != kind {
			continue
		}
		for _, r := range l.routeList() {
			r.pool.SetFleet(m[lc.Name], kind)
		}
	}
}

// refreshFleet hands every listener its marks after a reload: its store's
// last set, or none for a listener whose marks are local. It returns once
// the pools have applied them, so that a start or reload is in force, its
// marks included, when it returns (they used to apply a beat later: a
// rota started after a drain could send its first connections to the
// drained target; a test caught it on a busy machine).
func (s *Server) refreshFleet() {
	s.mu.Lock()
	lns, cfg, regs := s.listeners, s.cfg, s.regs
	s.mu.Unlock()
	for _, l := range lns {
		lc := l.config()
		kind := cfg.Registries.StateOf(lc)
		var marks map[string]fleet.Mark
		if w := regs.fleetOf(kind); w != nil {
			if m := w.marks.Load(); m != nil {
				marks = (*m)[lc.Name]
			}
		}
		for _, r := range l.routeList() {
			r.pool.SetFleet(marks, kind)
		}
	}
	for _, l := range lns {
		for _, r := range l.routeList() {
			r.pool.Flush()
		}
	}
}

// markWait bounds how long an admin request that wrote a fleet mark waits
// to see it applied here.
const markWait = 5 * time.Second

// setMark changes addr's mark on listener l in its fleet store and waits
// until this process applies it (applied tells, from a pool's view of the
// target).
func (s *Server) setMark(l *listener, store fleet.Store, pools []*pool.Pool, addr string, change func(*fleet.Mark), applied func(pool.TargetView) bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), markWait)
	defer cancel()
	name := l.config().Name
	m, err := store.Get(ctx, name, addr)
	if err != nil {
		return fmt.Errorf("fleet mark of %s on %q: %w", addr, name, err)
	}
	change(&m)
	if err := store.Set(ctx, name, addr, m); err != nil {
		return fmt.Errorf("fleet mark of %s on %q: %w", addr, name, err)
	}
	for {
		done := true
		for _, p := range pools {
			for _, tv := range p.View().Targets {
				if tv.Addr == addr && !applied(tv) {
					done = false
				}
			}
		}
		if done {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("fleet mark of %s on %q written to %s, not yet applied here: %w", addr, name, store.Kind(), errors.New("timed out"))
		case <-time.After(5 * time.Millisecond): // polling this process's own view, bounded by ctx
		}
	}
}

// stateStore is listener l's fleet store, nil when its marks are local.
func (s *Server) stateStore(l *listener) fleet.Store {
	s.mu.Lock()
	cfg, regs := s.cfg, s.regs
	s.mu.Unlock()
	kind := cfg.Registries.StateOf(l.config())
	if kind == config.StateLocal {
		return nil
	}
	if w := regs.fleetOf(kind); w != nil {
		return w.store
	}
	return nil
}
