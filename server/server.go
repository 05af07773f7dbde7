// Package server assembles rota's listeners from a configuration and applies
// reloads: for each listener it binds the socket, builds its pools (one, or
// one per route: discovery, health checking and the picker) and their
// watchers, and configures its proxy (watcher → pool → picker → proxy). The
// first configuration and every later one take one path (reload.go). It
// also owns the registry clients and the embedded etcd server those
// listeners share.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/embedetcd"
	"github.com/rota-proxy/rota/internal/certfile"
	"github.com/rota-proxy/rota/internal/handover"
	"github.com/rota-proxy/rota/proxy"
)

// Server runs the listeners of one configuration. Create it with Start; stop
// it with Shutdown. Its methods are safe for concurrent use.
type Server struct {
	log    *zap.Logger
	engine *proxy.Engine // the relay loops every listener's connections share

	wg sync.WaitGroup // watcher goroutines and draining listeners

	// removedDrains bounds the drains of listeners a reload removed;
	// cutRemoved ends them (Shutdown, when its own context ends: a second
	// signal cuts every drain, not only the current listeners').
	removedDrains context.Context
	cutRemoved    context.CancelFunc

	// reloadMu serialises Reload and Shutdown.
	reloadMu  sync.Mutex
	mu        sync.Mutex // guards the fields below
	cfg       *config.Config
	listeners []*listener // in configuration order
	regs      *registries
	alog      *accesslog.Log // nil: no access log
	closed    bool
	// inherit, if set, hands over a listening socket a parent process
	// passed for a listener (by name); the caller keeps the file.
	inherit func(name string) *os.File
	// restore is the state handed over by the process this one took over
	// from, consumed as the pools are made (the first apply); nil: none.
	restore *HandoverState
	// deferEmbedded: the first start leaves the embedded etcd to
	// StartEmbedded.
	deferEmbedded bool
	// open is closed once the listeners may accept (at once, unless the
	// start was held: Open); openOnce closes it.
	open     chan struct{}
	openOnce sync.Once
}

// Start brings up everything cfg describes: the embedded etcd server if any,
// registry clients, then every listener. It is a reload from nothing (see
// reload): sockets are all bound and every pool planned before any is
// served, so a bad address fails the whole start and nothing is left
// running. cfg must be valid (config.Load or Validate); Start does not modify
// it. logger may be nil.
func Start(ctx context.Context, cfg *config.Config, logger *zap.Logger) (*Server, error) {
	return StartWith(ctx, cfg, logger, StartOptions{})
}

// StartOptions are how a process that inherited listening sockets starts
// (an upgrade's new process, socket activation).
type StartOptions struct {
	// Inherit returns the socket passed for a listener's name, or nil; a
	// listener whose configured address the socket does not match binds
	// afresh.
	Inherit func(name string) *os.File
	// Restore, if set, is the state the process this one takes over from
	// handed over: each new pool starts with its namesake's.
	Restore *HandoverState
	// DeferEmbedded: an embedded etcd server is not started here but by
	// StartEmbedded, once the process this one takes over from has
	// stopped its own on the same data directory.
	DeferEmbedded bool
	// Hold: the listeners accept only once Open is called (an upgrade's
	// new process, until its targets have their first verdicts; clients
	// meanwhile wait in the sockets' queues, which its parent still
	// accepts from).
	Hold bool
}

// StartWith is Start with o.
func StartWith(ctx context.Context, cfg *config.Config, logger *zap.Logger, o StartOptions) (*Server, error) {
	if logger == nil {
		logger = zap.NewNop()
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	s := &Server{log: logger, engine: proxy.NewEngine(0, logger.Named("relay")), inherit: o.Inherit, open: make(chan struct{}), restore: o.Restore, deferEmbedded: o.DeferEmbedded}
	if !o.Hold {
		s.Open()
	}
	s.removedDrains, s.cutRemoved = context.WithCancel(context.Background())
	if err := s.apply(ctx, cfg); err != nil {
		s.cutRemoved()
		s.engine.Close()
		return nil, err
	}
	s.restore = nil // for the first pools only: a later reload's start fresh
	s.deferEmbedded = false
	return s, nil
}

// listen binds a proxy socket, of the kind the proxy's relay loops accept
// on directly.
func listen(addr string) (net.Listener, error) {
	ln, err := proxy.Listen(addr)
	if err != nil {
		return nil, err // not a nil *proxy.Listener in an interface
	}
	return ln, nil
}

// Flush waits until every pool has applied what it was told so far (a
// health verdict has reached its picker).
func (s *Server) Flush() {
	s.mu.Lock()
	ls := s.listeners
	s.mu.Unlock()
	for _, l := range ls {
		for _, r := range l.routeList() {
			r.pool.Flush()
		}
	}
}

// StopEmbedded stops the embedded etcd server, if this process runs one
// (an upgrade: the new process starts it on the same data directory). The
// pools keep their last targets while no registry answers.
func (s *Server) StopEmbedded() {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	s.mu.Lock()
	regs := s.regs
	s.mu.Unlock()
	if regs != nil && regs.embedded != nil {
		regs.embedded.Close()
		regs.embedded = nil
		s.log.Info("embedded etcd stopped: the new process runs it")
	}
}

// StartEmbedded starts the embedded etcd server a deferred start left out
// (StartOptions.DeferEmbedded), retrying while its ports are still bound
// by the process this one took over from, until ctx ends.
func (s *Server) StartEmbedded(ctx context.Context) error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	s.mu.Lock()
	regs, cfg := s.regs, s.cfg
	s.mu.Unlock()
	if regs == nil || regs.embedded != nil || cfg.Registries.Etcd == nil || cfg.Registries.Etcd.Embedded == nil {
		return nil
	}
	for {
		srv, err := embedetcd.Start(ctx, embeddedConfig(cfg.Registries.Etcd.Embedded, s.log))
		if err == nil {
			regs.embedded = srv
			s.log.Info("embedded etcd ready", zap.Strings("endpoints", srv.Endpoints()))
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("embedded etcd: %w (last: %v)", ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Open lets the listeners accept, after a held start (StartOptions.Hold).
func (s *Server) Open() { s.openOnce.Do(func() { close(s.open) }) }

// socket is the listening socket of listener name at addr: the one
// inherited for it when its address matches, else a new one.
func (s *Server) socket(name, addr string) (net.Listener, error) {
	if s.inherit != nil {
		if f := s.inherit(name); f != nil {
			ln, err := proxy.ListenFile(f)
			switch {
			case err != nil:
				s.log.Warn("inherited socket unusable; binding afresh", zap.String("listener", name), zap.Error(err))
			case handover.Serves(ln.Addr(), addr):
				s.log.Info("listening on the inherited socket", zap.String("listener", name), zap.Stringer("addr", ln.Addr()))
				return ln, nil
			default:
				s.log.Info("inherited socket is on another address; binding afresh", zap.String("listener", name),
					zap.Stringer("inherited", ln.Addr()), zap.String("listen", addr))
				ln.Close()
			}
		}
	}
	return listen(addr)
}

// Sockets returns a duplicate of every listener's listening socket, by
// listener name, for a new process to inherit (an upgrade). The caller owns
// the files.
func (s *Server) Sockets() (map[string]*os.File, error) {
	s.mu.Lock()
	ls := s.listeners
	s.mu.Unlock()
	out := map[string]*os.File{}
	for _, l := range ls {
		l.mu.Lock()
		ln := l.ln
		l.mu.Unlock()
		pl, ok := ln.(*proxy.Listener)
		if !ok {
			continue
		}
		f, err := pl.File()
		if err != nil {
			for _, f := range out {
				f.Close()
			}
			return nil, fmt.Errorf("listener %q: %w", l.config().Name, err)
		}
		out[l.config().Name] = f
	}
	return out, nil
}

// AccessLog is the access log in force; nil when there is none.
func (s *Server) AccessLog() *accesslog.Log {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.alog
}

// Addr returns the bound address of the named listener, or nil. With port 0
// in the configuration it tells which port was picked.
func (s *Server) Addr(name string) net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range s.listeners {
		if l.config().Name == name {
			l.mu.Lock()
			defer l.mu.Unlock()
			if l.ln != nil {
				return l.ln.Addr()
			}
		}
	}
	return nil
}

// Config returns the configuration in force.
func (s *Server) Config() *config.Config {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cfg
}

// Ready reports whether every listener has had its first discovery sync.
func (s *Server) Ready() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	for _, l := range s.listeners {
		if !l.synced() {
			return false
		}
	}
	return true
}

// Reload applies cfg: listeners are added and removed by name, changed ones
// take their new settings, and health state and open connections are kept.
// A configuration that cannot be applied (a socket that cannot be bound, an
// embedded etcd change, a registry client that cannot be built) is rejected
// as a whole and the running one stays in force.
func (s *Server) Reload(ctx context.Context, cfg *config.Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	if err := s.apply(ctx, cfg); err != nil {
		return fmt.Errorf("reload: %w", err)
	}
	return nil
}

// apply is the one way a configuration comes into force, the first one
// (Start) and every later one (Reload): bind, plan, then commit, or abort
// if anything failed before anything running changed. cfg is valid.
func (s *Server) apply(ctx context.Context, cfg *config.Config) error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	rl, err := s.newReload(cfg)
	if err != nil {
		return err
	}
	if err := rl.bind(ctx); err != nil {
		rl.abort()
		return err
	}
	if err := rl.plan(); err != nil {
		rl.abort()
		return err
	}
	rl.commit()
	return nil
}

// plan is what applying a listener's configuration takes, built before
// anything running changes: its routes' pools (new ones started, idle
// until committed) and a watcher for each route whose source is new or
// changed.
type plan struct {
	l             *listener
	cfg           config.Listener
	regs          config.Registries
	routes, gone  []*route
	created       []*route
	watchers      map[*route]discovery.Watcher
	changedSource bool // a kept route's source changed, or routes came or went
	// Each route's origination (nil for plain TCP) and termination, its
	// files loaded (nil for passthrough), in routeSpecs' order: an
	// unrouted listener's are its own.
	targetTLS []*tls.Config
	routeTLS  []*certfile.Server
}

func (s *Server) plan(l *listener, lc config.Listener, rc config.Registries, regs *registries, regsChanged bool) (*plan, error) {
	if speaksTLS(l.config()) != speaksTLS(lc) {
		// A running listener is served by the loops or, speaking TLS, by
		// goroutines: the choice is made when it starts.
		return nil, errors.New("tls (or target_tls) cannot be turned on or off on a running listener: give the listener another name (a new listener), or restart rota")
	}
	targetTLS, err := targetTLSConfigs(lc, regs)
	if err != nil {
		return nil, err
	}
	routeTLS, err := l.routeTLSServers(lc)
	if err != nil {
		return nil, err
	}
	c := l.routesFor(lc, rc, regsChanged)
	for _, r := range c.created {
		s.restoreRoute(lc.Name, r)
	}
	pl := &plan{l: l, cfg: lc, regs: rc, routes: c.next, gone: c.gone, created: c.created,
		changedSource: c.sourceChanged, watchers: map[*route]discovery.Watcher{}, targetTLS: targetTLS, routeTLS: routeTLS}
	specs := routeSpecs(lc)
	for i, r := range c.next {
		if !c.rewatch[r] {
			continue
		}
		w, err := regs.watcher(specs[i].pool, l.routeLog(r.name))
		if err != nil {
			pl.abort()
			if r.name != "" {
				err = fmt.Errorf("route %q: %w", r.name, err)
			}
			return nil, err
		}
		pl.watchers[r] = w
	}
	return pl, nil
}

// commit applies the plan: settings, router and pools, then the new
// watchers; routes no longer configured stop (their open connections
// carry on).
func (pl *plan) commit(wg *sync.WaitGroup) {
	pl.l.install(pl.cfg, pl.regs, pl.routes, pl.targetTLS, pl.routeTLS)
	for _, r := range pl.routes {
		if w, ok := pl.watchers[r]; ok {
			r.startWatch(w, wg, pl.l.routeLog(r.name))
		}
	}
	for _, r := range pl.gone {
		r.close()
	}
}

// abort undoes a plan that will not be committed: the pools it started.
func (pl *plan) abort() {
	for _, r := range pl.created {
		r.pool.Close()
	}
	pl.created = nil
}

// Shutdown stops every listener: no new connections are accepted, open ones
// drain for each listener's drain_timeout (bounded also by ctx), then the
// rest are closed; discovery, health checking and registries stop. It
// returns an error if connections had to be cut.
func (s *Server) Shutdown(ctx context.Context) error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	// Listeners a reload removed drain on; when ctx ends, so do they.
	stop := context.AfterFunc(ctx, s.cutRemoved)
	defer stop()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return nil
	}
	s.closed = true
	s.Open() // a held listener's goroutine ends on its closed socket
	lns := s.listeners
	regs, alog := s.regs, s.alog
	s.mu.Unlock()

	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for _, l := range lns {
		wg.Go(func() {
			if err := l.shutdown(ctx); err != nil {
				mu.Lock()
				errs = append(errs, fmt.Errorf("listener %q: %w", l.config().Name, err))
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	s.wg.Wait() // removed listeners still draining, watcher goroutines
	s.cutRemoved()
	s.engine.Close()
	if alog != nil {
		closeLog(alog)
	}
	if regs != nil {
		regs.close()
	}
	return errors.Join(errs...)
}
