package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/proxy"
)

// router is one rota listener assembled by hand, as the contract's data
// flow has it: discovery.Watcher -> health.Checker -> balancer.RoundRobin
// -> proxy.Proxy, with the proxy's failed dials reported to the checker.
// It records when each stage saw each set, so that the report can split
// the convergence time.
type router struct {
	addr    string
	checker *health.Checker
	rr      balancer.RoundRobin
	proxy   *proxy.Proxy

	mu      sync.Mutex
	targets map[string]*balancer.Target // by address; kept while discovered
	snaps   []event                     // what the watcher delivered
	lives   []event                     // what the balancer was given

	cancel    context.CancelFunc
	watchDone chan error
	serveDone chan error
}

// event is a set of addresses and when a stage got it.
type event struct {
	at    time.Time
	addrs []string // sorted
}

func startRouter(w discovery.Watcher, hc health.Config, log *zap.Logger) (*router, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("proxy listener: %w", err)
	}
	r := &router{
		addr:      ln.Addr().String(),
		targets:   map[string]*balancer.Target{},
		watchDone: make(chan error, 1),
		serveDone: make(chan error, 1),
	}
	r.checker = health.New(hc, log.Named("health"), r.setLive)
	r.proxy = &proxy.Proxy{Picker: &r.rr, ReportFailure: r.checker.ReportFailure, Logger: log.Named("proxy")}
	r.proxy.Configure(proxy.Settings{DialTimeout: 2 * time.Second, Retries: 2})

	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.serveDone <- r.proxy.Serve(ln) }()
	go func() {
		r.watchDone <- w.Watch(ctx, discovery.SinkFuncs{
			OnUpdate: r.setDiscovered,
			OnError:  func(err error) { log.Warn("discovery error", zap.Error(err)) },
		})
	}()
	return r, nil
}

// setDiscovered is the watcher's sink: the checker gets the new set.
func (r *router) setDiscovered(s discovery.Snapshot) {
	addrs := s.Addrs()
	now := time.Now()
	r.mu.Lock()
	r.snaps = append(r.snaps, event{now, addrs})
	for a := range r.targets {
		if !slices.Contains(addrs, a) {
			delete(r.targets, a)
		}
	}
	for _, a := range addrs {
		if r.targets[a] == nil {
			r.targets[a] = balancer.NewTarget(a)
		}
	}
	r.mu.Unlock()
	r.checker.Update(addrs)
}

// setLive is the checker's onChange: the balancer gets the live targets.
func (r *router) setLive(live []string) {
	r.mu.Lock()
	ts := make([]*balancer.Target, 0, len(live))
	for _, a := range live {
		t := r.targets[a]
		if t == nil {
			t = balancer.NewTarget(a)
			r.targets[a] = t
		}
		ts = append(ts, t)
	}
	r.rr.Update(ts)
	r.lives = append(r.lives, event{time.Now(), live})
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
	for _, t := range r.rr.Live() {
		if t.Addr == addr {
			return true
		}
	}
	return false
}

// close stops the watcher, the proxy and the checker, in that order.
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
	r.checker.Close()
	return errors.Join(werr, perr, serr)
}
