package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"reflect"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/config"
)

// reload is one application of a configuration to a Server, the first
// (from nothing) or a later one: bind opens what it needs (registry
// clients, new sockets), plan builds every pool and watcher that will
// change, and only then commit puts it all in force, or abort undoes it,
// leaving what runs untouched. Its owner holds the Server's reloadMu
// throughout.
type reload struct {
	s       *Server
	cfg     *config.Config
	first   bool                 // no configuration ran before
	current map[string]*listener // the running listeners, by name

	oldRegs, regs *registries
	regsChanged   bool
	oldLog, log   *accesslog.Log          // the access log before and after; nil: off
	sockets       map[string]net.Listener // new or moved listeners'
	plans         map[string]*plan
}

func (s *Server) newReload(cfg *config.Config) (*reload, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errors.New("server is shut down")
	}
	rl := &reload{s: s, cfg: cfg, first: s.cfg == nil, oldRegs: s.regs,
		current: make(map[string]*listener, len(s.listeners)),
		sockets: map[string]net.Listener{}, plans: map[string]*plan{}}
	for _, l := range s.listeners {
		rl.current[l.config().Name] = l
	}
	rl.regs = rl.oldRegs
	rl.regsChanged = rl.first || !reflect.DeepEqual(s.cfg.Registries, cfg.Registries)
	rl.oldLog, rl.log = s.alog, s.alog
	return rl, nil
}

// bind opens the registry clients (when they changed) and binds every new
// or moved listener's socket.
func (rl *reload) bind(ctx context.Context) error {
	var was *accesslog.Config
	if !rl.first {
		was = rl.s.cfg.AccessLog
	}
	if !reflect.DeepEqual(was, rl.cfg.AccessLog) {
		rl.log = nil
		if c := rl.cfg.AccessLog; c != nil {
			l, err := accesslog.Open(*c)
			if err != nil {
				return err
			}
			rl.log = l
		}
	}
	if rl.regsChanged {
		regs, err := openRegistries(ctx, rl.cfg.Registries, rl.oldRegs, rl.s.log, rl.s.applyFleet, rl.s.deferEmbedded)
		if err != nil {
			return err
		}
		rl.regs = regs
	}
	for _, lc := range rl.cfg.Listeners {
		if l, ok := rl.current[lc.Name]; ok && l.config().Listen == lc.Listen {
			continue
		}
		// Moving a listener onto an address that another listener gives
		// up in this same reload fails here; rejecting it is the safe
		// outcome (do it in two reloads).
		ln, err := rl.s.socket(lc.Name, lc.Listen)
		if err != nil {
			return fmt.Errorf("listener %q: %w", lc.Name, err)
		}
		rl.sockets[lc.Name] = ln
	}
	return nil
}

// plan builds every pool and watcher that will change, before anything
// running does.
func (rl *reload) plan() error {
	for _, lc := range rl.cfg.Listeners {
		l, ok := rl.current[lc.Name]
		if !ok {
			l = newListener(lc, rl.s.log, rl.s.engine)
		}
		pl, err := rl.s.plan(l, lc, rl.cfg.Registries, rl.regs, rl.regsChanged)
		if err != nil {
			return fmt.Errorf("listener %q: %w", lc.Name, err)
		}
		rl.plans[lc.Name] = pl
	}
	return nil
}

// abort undoes what bind and plan opened and started; nothing running
// changed.
func (rl *reload) abort() {
	for _, pl := range rl.plans {
		pl.abort()
	}
	for _, ln := range rl.sockets {
		ln.Close()
	}
	if rl.regs != rl.oldRegs {
		rl.regs.closeUnshared(rl.oldRegs)
	}
	if rl.log != rl.oldLog && rl.log != nil {
		closeLog(rl.log)
	}
}

// commit puts the configuration in force: listeners are added, changed
// and removed (a removed one drains; its discovery stops now), and the
// registry clients no longer used are closed.
func (rl *reload) commit() {
	s, log := rl.s, rl.s.log
	var next []*listener
	keep := map[string]bool{}
	for _, lc := range rl.cfg.Listeners {
		keep[lc.Name] = true
		pl := rl.plans[lc.Name]
		l := pl.l
		prev, existed := rl.current[lc.Name]
		var was config.Listener
		if existed {
			was = prev.config()
		}
		pl.commit(&s.wg)
		next = append(next, l)
		ln, bound := rl.sockets[lc.Name]
		switch {
		case !existed:
			l.serve(ln, rl.s.open)
			log.Info("listening", zap.String("listener", lc.Name), zap.String("addr", ln.Addr().String()),
				zap.String("discovery", lc.Discovery), zap.String("service", lc.Service), zap.Int("routes", len(lc.Routes)))
			continue
		case bound:
			l.rebind(ln, rl.s.open)
			log.Info("listener moved", zap.String("listener", lc.Name),
				zap.String("from", was.Listen), zap.String("to", lc.Listen))
		}
		if pl.changedSource {
			log.Info("listener discovery changed", zap.String("listener", lc.Name),
				zap.String("discovery", lc.Discovery), zap.String("service", lc.Service), zap.Int("routes", len(lc.Routes)))
		}
	}
	var removed []*listener
	for name, l := range rl.current {
		if !keep[name] {
			removed = append(removed, l)
		}
	}
	for _, l := range next {
		l.proxy.SetAccessLog(rl.log)
	}
	s.mu.Lock()
	s.cfg, s.listeners, s.regs, s.alog = rl.cfg, next, rl.regs, rl.log
	s.mu.Unlock()
	if rl.oldLog != rl.log && rl.oldLog != nil {
		closeLog(rl.oldLog) // its queued records are written first
	}
	for _, l := range removed {
		log.Info("listener removed; draining", zap.String("listener", l.config().Name))
		// Its discovery stops now: the registry clients it reads may be
		// closed below, and its pools keep their last instances for the
		// connections that drain.
		for _, r := range l.routeList() {
			r.stopWatch()
		}
		s.wg.Go(func() {
			if err := l.shutdown(s.removedDrains); err != nil {
				l.log.Warn("listener drained", zap.Error(err))
			}
		})
	}
	if rl.regs != rl.oldRegs {
		// Watchers of the old clients have all been replaced above.
		rl.oldRegs.closeUnshared(rl.regs)
	}
	s.refreshFleet()
}

// logCloseWait bounds the wait for an access log's writer to write what
// is queued when the log is replaced or rota stops (a writer stuck on a
// full pipe is left behind).
const logCloseWait = 2 * time.Second

func closeLog(l *accesslog.Log) {
	ctx, cancel := context.WithTimeout(context.Background(), logCloseWait)
	defer cancel()
	l.Close(ctx)
}
