package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/pool"
	"github.com/rota-proxy/rota/proxy"
)

// router is one rota listener assembled as the server assembles it:
// discovery.Watcher -> pool.Pool (health checking, picker) -> proxy.Proxy,
// with the proxy's failed dials reported to the pool. It records when each
// stage saw each set, so that the report can split the convergence time.
type router struct {
	addr  string
	pool  *pool.Pool
	proxy *proxy.Proxy

	mu    sync.Mutex
	snaps []event // what the watcher delivered
	lives []event // what the picker was given

	cancel    context.CancelFunc
	watchDone chan error
	serveDone chan error
}

// event is a set of addresses and when a stage got it.
type event struct {
	at    time.Time
	addrs []string // sorted
}

// startRouter starts a router over w's instances with the configuration's
// default health settings and the given check.
func startRouter(w discovery.Watcher, check string, log *zap.Logger) (*router, error) {
	hc := config.DefaultPool().Health
	hc.Check = check
	ln, err := proxy.Listen("127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("proxy listener: %w", err)
	}
	r := &router{
		addr:      ln.Addr().String(),
		watchDone: make(chan error, 1),
		serveDone: make(chan error, 1),
	}
	r.pool = pool.New(pool.Config{Health: hc, EmptyHold: 5 * time.Second, Published: r.published}, log)
	r.proxy = &proxy.Proxy{ReportFailure: r.pool.ReportFailure, Logger: log.Named("proxy")}
	r.proxy.Configure(proxy.Settings{DialTimeout: 2 * time.Second, Retries: 2}, proxy.Single(r.pool))

	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.serveDone <- r.proxy.Serve(ln) }()
	sink := r.pool.NewSink()
	go func() {
		r.watchDone <- w.Watch(ctx, discovery.SinkFuncs{
			OnUpdate: func(s discovery.Snapshot) {
				r.mu.Lock()
				r.snaps = append(r.snaps, event{time.Now(), s.Addrs()})
				r.mu.Unlock()
				sink.Update(s)
			},
			OnSynced: sink.Synced,
			OnError: func(err error) {
				log.Warn("discovery error", zap.Error(err))
				sink.Error(err)
			},
		})
	}()
	return r, nil
}

// published records what the picker was given.
func (r *router) published(v *pool.View) {
	addrs := make([]string, len(v.Live))
	for i, t := range v.Live {
		addrs[i] = t.Addr
	}
	r.mu.Lock()
	r.lives = append(r.lives, event{time.Now(), addrs})
	r.mu.Unlock()
}

// firstSince returns when the first set of log (snaps or lives) recorded
// at or after since satisfied cond, and whether there is one.
func (r *router) firstSince(log *[]event, since time.Time, cond func([]string) bool) (time.Time, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range *log {
		if !e.at.Before(since) && cond(e.addrs) {
			return e.at, true
		}
	}
	return time.Time{}, false
}

// balancerHas reports whether the current live set holds addr.
func (r *router) balancerHas(addr string) bool {
	for _, t := range r.pool.View().Live {
		if t.Addr == addr {
			return true
		}
	}
	return false
}

// live is the number of targets the picker offers.
func (r *router) live() int { return len(r.pool.View().Live) }

// stop is close for a deferred call: a failure to stop is logged.
func (r *router) stop(log *zap.Logger) {
	if err := r.close(); err != nil {
		log.Warn("stopping the router", zap.Error(err))
	}
}

// close stops the watcher, the proxy and the pool, in that order.
func (r *router) close() error {
	r.cancel()
	werr := <-r.watchDone
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	perr := r.proxy.Shutdown(ctx)
	serr := <-r.serveDone
	if errors.Is(serr, proxy.ErrClosed) {
		serr = nil
	}
	r.pool.Close()
	return errors.Join(werr, perr, serr)
}
