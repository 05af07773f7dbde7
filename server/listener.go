package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/internal/certfile"
	"github.com/rota-proxy/rota/pool"
	"github.com/rota-proxy/rota/proxy"
)

// listener is one configured listener: a socket, its proxy, and its pools
// of targets (discovery, health, picker): one of its own, or one per route
// when it routes by TLS server name.
type listener struct {
	log   *zap.Logger
	proxy *proxy.Proxy

	serveWG sync.WaitGroup // Serve goroutines, one per bound socket

	mu     sync.Mutex
	cfg    config.Listener
	ln     net.Listener
	routes []*route // in configuration order; one named "" when unrouted
}

// route is one pool of a listener and the watch that feeds it.
type route struct {
	name string
	// spec is the route as configured: its server names and where its
	// instances come from. Each reload stores a new one, never changes
	// one: status reads it while a reload installs the next.
	spec atomic.Pointer[routeSpec]
	pool *pool.Pool

	// watch is the running discovery watcher; replaced when the source of
	// instances changes on reload.
	watchMu     sync.Mutex
	watchCancel context.CancelFunc
	watchDone   chan struct{}
}

// routeSpec is a route as the configuration describes it: an unrouted
// listener is one route named "" that matches nothing by name.
type routeSpec struct {
	name string
	sni  []string
	pool config.Pool
	log  bool              // its connections go to the access log
	tls  *config.TLSServer // it terminates its clients' TLS
}

func routeSpecs(cfg config.Listener) []routeSpec {
	if !cfg.Routed() {
		return []routeSpec{{pool: cfg.Pool, log: cfg.AccessLog, tls: cfg.TLS}}
	}
	out := make([]routeSpec, len(cfg.Routes))
	for i, r := range cfg.Routes {
		out[i] = routeSpec{name: r.Name, sni: r.SNI, pool: r.Pool, log: r.AccessLog == nil && cfg.AccessLog || r.AccessLog != nil && *r.AccessLog, tls: r.TLS}
	}
	return out
}

func newListener(cfg config.Listener, logger *zap.Logger, engine *proxy.Engine) *listener {
	log := logger.With(zap.String("listener", cfg.Name))
	l := &listener{log: log, cfg: cfg}
	l.proxy = &proxy.Proxy{Name: cfg.Name, ReportFailure: l.reportFailure, Logger: log.Named("proxy"), Engine: engine}
	return l
}

// reportFailure tells every pool of the listener that a target could not
// be reached (routes may share a target).
func (l *listener) reportFailure(addr string, err error) {
	l.mu.Lock()
	rs := l.routes
	l.mu.Unlock()
	for _, r := range rs {
		r.pool.ReportFailure(addr, err)
	}
}

func (l *listener) poolConfig(p config.Pool, regs config.Registries) pool.Config {
	return pool.Config{
		Health: checkOverTLS(p),
		// The pool tells the proxy of targets that stop taking connections,
		// so that their open ones are wound down after removed_conn_grace.
		Retired:   l.proxy.Retire,
		Panic:     p.Panic,
		EmptyHold: regs.EmptyHold,
		Balance:   p.Balance,
		SlowStart: p.SlowStart,
		// The hash policy's.
		HashKey:           p.HashKey,
		HashBalanceFactor: p.HashBalanceFactor,
		// Per target caps and their queue.
		MaxConnsPerTarget: p.MaxConnsPerTarget,
		QueueSize:         p.Queue.Size,
		QueueTimeout:      p.Queue.Timeout,
	}
}

// routesFor builds the pools of cfg's routes, keeping the pools of routes
// that exist already (by name) with their targets, health and drain marks.
// It returns the routes, those it started (to be closed if the change is
// not committed), the old ones not kept, which routes need a new watcher
// (a source that is new, changed, or on changed registries), and whether
// where the listener's instances come from changed (for the log).
func (l *listener) routesFor(cfg config.Listener, regs config.Registries, regsChanged bool) (c routeChange) {
	l.mu.Lock()
	old := l.routes
	l.mu.Unlock()
	byName := map[string]*route{}
	for _, r := range old {
		byName[r.name] = r
	}
	c.rewatch = map[*route]bool{}
	kept := map[*route]bool{}
	for _, spec := range routeSpecs(cfg) {
		r, ok := byName[spec.name]
		switch {
		case !ok:
			r = &route{name: spec.name, pool: pool.New(l.poolConfig(spec.pool, regs), l.routeLog(spec.name))}
			r.spec.Store(&spec)
			c.created = append(c.created, r)
			c.rewatch[r] = true
			c.sourceChanged = c.sourceChanged || len(old) > 0
		case !sameSource(r.spec.Load().pool, spec.pool):
			c.rewatch[r] = true
			c.sourceChanged = true
		case regsChanged:
			c.rewatch[r] = true
		}
		kept[r] = true
		c.next = append(c.next, r)
	}
	for _, r := range old {
		if !kept[r] {
			c.gone = append(c.gone, r)
			c.sourceChanged = true
		}
	}
	return c
}

// routeChange is what routesFor found.
type routeChange struct {
	next, created, gone []*route
	rewatch             map[*route]bool
	sourceChanged       bool
}

func (l *listener) routeLog(name string) *zap.Logger {
	if name == "" {
		return l.log
	}
	return l.log.With(zap.String("route", name))
}

// install makes next the listener's routes: each kept route takes its
// new settings, the proxy its new settings and router. New watchers are
// started by the caller.
func (l *listener) install(cfg config.Listener, regs config.Registries, next []*route, targetTLS []*tls.Config, routeTLS []*certfile.Server) {
	specs := routeSpecs(cfg)
	for i, r := range next {
		r.spec.Store(&specs[i])
		r.pool.Configure(l.poolConfig(specs[i].pool, regs))
	}
	// One way to pick: a router, by server name or, unrouted, Single.
	router := proxy.SingleTLS(next[0].pool, targetTLS[0])
	switch {
	case !cfg.Routed() && routeTLS[0] != nil:
		// A terminating listener is one route that takes every client
		// ("*"), so that there is one way to terminate: the routed
		// one, whose handshake starts from the ClientHello the prelude
		// read, after any PROXY header.
		router = proxy.NewRouter([]proxy.Route{{SNI: []string{"*"}, Picker: next[0].pool, NoLog: !specs[0].log,
			TargetTLS: targetTLS[0], TLS: routeTLS[0].Config()}})
	case cfg.Routed():
		routes := make([]proxy.Route, len(next))
		for i, r := range next {
			routes[i] = proxy.Route{SNI: specs[i].sni, Picker: r.pool, Name: r.name, NoLog: !specs[i].log, TargetTLS: targetTLS[i]}
			if routeTLS[i] != nil {
				routes[i].TLS = routeTLS[i].Config()
			}
		}
		router = proxy.NewRouter(routes)
	}
	l.mu.Lock()
	l.cfg = cfg
	l.routes = next
	l.mu.Unlock()
	l.proxy.Configure(cfg.Settings, router)
	for _, r := range next {
		r.pool.Flush() // a reload is in force when it returns
	}
}

// serve runs the proxy on ln until ln is closed or the proxy shuts down,
// once open is closed (a process started by an upgrade accepts only once
// its targets have their first verdicts).
func (l *listener) serve(ln net.Listener, open <-chan struct{}) {
	l.mu.Lock()
	l.ln = ln
	l.mu.Unlock()
	l.serveWG.Go(func() {
		<-open
		err := l.proxy.Serve(ln)
		if err != nil && !errors.Is(err, proxy.ErrClosed) && !errors.Is(err, net.ErrClosed) {
			l.log.Error("listener stopped", zap.Error(err))
		}
	})
}

// rebind moves the listener to a new socket: the old one stops accepting,
// its open connections carry on.
func (l *listener) rebind(ln net.Listener, open <-chan struct{}) {
	l.mu.Lock()
	old := l.ln
	l.mu.Unlock()
	l.serve(ln, open)
	if old != nil {
		old.Close()
	}
}

// startWatch runs w until stopWatch or the next startWatch. The pool
// ignores what a replaced watcher still pushes.
func (r *route) startWatch(w discovery.Watcher, wg *sync.WaitGroup, log *zap.Logger) {
	r.stopWatch()
	sink := r.pool.NewSink()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	r.watchMu.Lock()
	r.watchCancel, r.watchDone = cancel, done
	r.watchMu.Unlock()
	wg.Go(func() {
		defer close(done)
		if err := w.Watch(ctx, sink); err != nil && ctx.Err() == nil {
			sink.Error(err)
			log.Error("discovery stopped", zap.Error(err))
		}
	})
}

func (r *route) stopWatch() {
	r.watchMu.Lock()
	cancel, done := r.watchCancel, r.watchDone
	r.watchCancel, r.watchDone = nil, nil
	r.watchMu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

// close stops the route's discovery and health checking. Open
// connections to its targets carry on.
func (r *route) close() {
	r.stopWatch()
	r.pool.Close()
}

// shutdown stops accepting, drains open connections for the drain timeout,
// then cuts what is left and stops discovery and health checking.
func (l *listener) shutdown(ctx context.Context) error {
	l.mu.Lock()
	drain := l.cfg.DrainTimeout
	l.mu.Unlock()
	dctx, cancel := context.WithTimeout(ctx, drain)
	defer cancel()
	err := l.proxy.Shutdown(dctx)
	l.serveWG.Wait()
	l.mu.Lock()
	rs := l.routes
	l.mu.Unlock()
	for _, r := range rs {
		r.close()
	}
	if err != nil {
		return errors.New("drain timeout reached; open connections were closed")
	}
	return nil
}

func (l *listener) config() config.Listener {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cfg
}

func (l *listener) routeList() []*route {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.routes)
}

// synced reports whether every route has had its first discovery sync.
func (l *listener) synced() bool {
	for _, r := range l.routeList() {
		if !r.pool.Discovery().Synced {
			return false
		}
	}
	return true
}

// sameSource reports whether two pools discover the same instances, so
// that the running watcher can stay.
func sameSource(a, b config.Pool) bool {
	return a.Discovery == b.Discovery && a.Service == b.Service &&
		slices.Equal(a.Tags, b.Tags) && slices.Equal(a.Static, b.Static)
}

// tlsServer loads the listener's TLS termination files.
func (l *listener) tlsServer(t config.TLSServer) (*certfile.Server, error) {
	sf := certfile.ServerFiles{ClientCAFile: t.ClientCAFile, ALPN: t.ALPN, MinVersion: tls.VersionTLS12}
	for _, c := range t.Certs {
		sf.Certs = append(sf.Certs, certfile.Files{CertFile: c.CertFile, KeyFile: c.KeyFile})
	}
	if t.MinVersion == "1.3" {
		sf.MinVersion = tls.VersionTLS13
	}
	switch t.Auth() {
	case config.ClientAuthRequest:
		sf.ClientAuth = certfile.ClientAuthRequest
	case config.ClientAuthRequire:
		sf.ClientAuth = certfile.ClientAuthRequire
	}
	log := l.log.Named("tls")
	return certfile.NewServer(sf,
		func(err error) {
			log.Warn("certificate files changed but do not load; still serving the previous ones", zap.Error(err))
		},
		func(f certfile.Files) {
			log.Info("certificate files changed; serving them from the next handshake", zap.String("cert_file", f.CertFile), zap.String("client_ca_file", f.ClientCAFile))
		})
}

// speaksTLS reports whether a listener terminates TLS (itself or on a
// route) or speaks it to some targets: it is then served by goroutines.
func speaksTLS(lc config.Listener) bool {
	for _, sp := range routeSpecs(lc) {
		if sp.pool.TargetTLS != nil || sp.pool.Connect || sp.tls != nil {
			return true
		}
	}
	return false
}

// routeTLSServers loads each route's termination files (nil where it
// passes TLS through), in routeSpecs' order; an unrouted listener's are
// its own.
func (l *listener) routeTLSServers(lc config.Listener) ([]*certfile.Server, error) {
	specs := routeSpecs(lc)
	out := make([]*certfile.Server, len(specs))
	for i, sp := range specs {
		if sp.tls == nil {
			continue
		}
		s, err := l.tlsServer(*sp.tls)
		switch {
		case err != nil && sp.name == "": // the listener's own
			return nil, fmt.Errorf("tls: %w", err)
		case err != nil:
			return nil, fmt.Errorf("route %q: tls: %w", sp.name, err)
		}
		out[i] = s
	}
	return out, nil
}

// targetTLSConfigs loads each route's target_tls, or its Consul Connect
// identity, (nil where there is neither), in routeSpecs' order.
func targetTLSConfigs(lc config.Listener, regs *registries) ([]*tls.Config, error) {
	specs := routeSpecs(lc)
	out := make([]*tls.Config, len(specs))
	for i, sp := range specs {
		if sp.pool.Connect {
			if regs == nil || regs.consul == nil {
				return nil, errors.New("connect: true needs registries.consul")
			}
			c, err := regs.consul.connectTLS(sp.pool)
			if err != nil {
				return nil, err
			}
			out[i] = c
			continue
		}
		t := sp.pool.TargetTLS
		if t == nil {
			continue
		}
		c, err := certfile.ClientConfig(certfile.ClientFiles{ServerName: t.ServerName, CAFile: t.CAFile,
			Cert: certfile.Files{CertFile: t.CertFile, KeyFile: t.KeyFile}, InsecureSkipVerify: t.InsecureSkipVerify, ALPN: t.ALPN})
		if err != nil {
			if sp.name != "" {
				return nil, fmt.Errorf("route %q: target_tls: %w", sp.name, err)
			}
			return nil, fmt.Errorf("target_tls: %w", err)
		}
		out[i] = c
	}
	return out, nil
}

// checkOverTLS is p's health checking: targets that get TLS from rota are
// checked over it too (tcp becomes tls, http https) with target_tls's
// settings, unless the check sets its own.
func checkOverTLS(p config.Pool) health.Config {
	h := p.Health
	t := p.TargetTLS
	if t == nil || h.TLS.Set() {
		return h
	}
	switch h.Check {
	case health.CheckTCP:
		h.Check = health.CheckTLS
	case health.CheckHTTP:
		h.Check = health.CheckHTTPS
	default:
		return h
	}
	h.TLS = health.TLS{ServerName: t.ServerName, CAFile: t.CAFile, CertFile: t.CertFile, KeyFile: t.KeyFile, InsecureSkipVerify: t.InsecureSkipVerify}
	return h
}
