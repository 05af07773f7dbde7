package server

import (
	"context"
	"errors"
	"net"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/pool"
	"github.com/rota-proxy/rota/proxy"
)

// listener is one configured listener: a socket, its proxy, and the pool of
// targets (discovery, health, picker) the proxy picks from.
type listener struct {
	log   *zap.Logger
	proxy *proxy.Proxy
	pool  *pool.Pool

	serveWG sync.WaitGroup // Serve goroutines, one per bound socket

	// watch is the running discovery watcher; replaced when the source of
	// instances changes on reload.
	watchMu     sync.Mutex
	watchCancel context.CancelFunc
	watchDone   chan struct{}

	mu  sync.Mutex
	cfg config.Listener
	ln  net.Listener
}

func newListener(cfg config.Listener, regs config.Registries, engine *proxy.Engine, logger *zap.Logger) *listener {
	log := logger.With(zap.String("listener", cfg.Name))
	l := &listener{
		log: log,
		cfg: cfg,
	}
	l.pool = pool.New(l.poolConfig(cfg, regs), log)
	l.proxy = &proxy.Proxy{Picker: l.pool, ReportFailure: l.pool.ReportFailure, Logger: log.Named("proxy"), Engine: engine}
	l.proxy.Configure(proxySettings(cfg))
	return l
}

func (l *listener) poolConfig(cfg config.Listener, regs config.Registries) pool.Config {
	h := cfg.Health
	return pool.Config{
		// The pool tells the proxy of targets that stop taking connections,
		// so that their open ones are wound down after removed_conn_grace.
		Retired: func(t *balancer.Target, reason string) { l.proxy.Retire(t, reason) },
		Health: health.Config{
			Check: h.Check, Path: h.Path, Interval: h.Interval, Timeout: h.Timeout,
			Rise: h.Rise, Fall: h.Fall, BackoffMax: h.BackoffMax,
		},
		Panic:     cfg.Panic,
		EmptyHold: regs.EmptyHold,
		Balance:   balancer.Policy(cfg.Balance),
		SlowStart: cfg.SlowStart,
	}
}

func proxySettings(cfg config.Listener) proxy.Settings {
	s := proxy.Settings{
		DialTimeout:        cfg.DialTimeout,
		Retries:            cfg.Retries,
		MaxConns:           cfg.MaxConns,
		IdleTimeout:        cfg.IdleTimeout,
		ProxyHeaderTimeout: cfg.ProxyHeaderTimeout,
		ReplayOnReset:      cfg.ReplayOnReset,
		RetireGrace:        time.Duration(cfg.RemovedConnGrace),
		MaxConnAge:         cfg.MaxConnAge,
	}
	switch cfg.ProxyProtocol {
	case "v1":
		s.SendProxy = 1
	case "v2":
		s.SendProxy = 2
	}
	if len(cfg.AcceptProxyProtocol) > 0 {
		// Validated with the config; an error cannot happen here.
		s.AcceptProxyFrom, _ = cfg.TrustedProxies()
	}
	return s
}

// serve runs the proxy on ln until ln is closed or the proxy shuts down.
func (l *listener) serve(ln net.Listener) {
	l.mu.Lock()
	l.ln = ln
	l.mu.Unlock()
	l.serveWG.Go(func() {
		err := l.proxy.Serve(ln)
		if err != nil && !errors.Is(err, proxy.ErrClosed) && !errors.Is(err, net.ErrClosed) {
			l.log.Error("listener stopped", zap.Error(err))
		}
	})
}

// rebind moves the listener to a new socket: the old one stops accepting,
// its open connections carry on.
func (l *listener) rebind(ln net.Listener) {
	l.mu.Lock()
	old := l.ln
	l.mu.Unlock()
	l.serve(ln)
	if old != nil {
		old.Close()
	}
}

// startWatch runs w until stopWatch or the next startWatch. The pool
// ignores what a replaced watcher still pushes.
func (l *listener) startWatch(w discovery.Watcher, wg *sync.WaitGroup) {
	l.stopWatch()
	sink := l.pool.NewSink()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	l.watchMu.Lock()
	l.watchCancel, l.watchDone = cancel, done
	l.watchMu.Unlock()
	wg.Go(func() {
		defer close(done)
		if err := w.Watch(ctx, sink); err != nil && ctx.Err() == nil {
			sink.Error(err)
			l.log.Error("discovery stopped", zap.Error(err))
		}
	})
}

func (l *listener) stopWatch() {
	l.watchMu.Lock()
	cancel, done := l.watchCancel, l.watchDone
	l.watchCancel, l.watchDone = nil, nil
	l.watchMu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

// apply takes the new settings of a reloaded listener.
func (l *listener) apply(cfg config.Listener, regs config.Registries) {
	l.mu.Lock()
	l.cfg = cfg
	l.mu.Unlock()
	l.proxy.Configure(proxySettings(cfg))
	l.pool.Configure(l.poolConfig(cfg, regs))
	l.pool.Flush() // a reload is in force when it returns
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
	l.stopWatch()
	l.pool.Close()
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
