package server

import (
	"context"
	"errors"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/proxy"
)

// listener is one configured listener: a socket, its proxy, the health
// checker of its targets and the discovery watcher feeding them. Its targets
// are keyed by address so that counters and health survive discovery churn
// and reloads.
type listener struct {
	log     *zap.Logger
	proxy   *proxy.Proxy
	rr      balancer.RoundRobin
	checker *health.Checker

	serveWG sync.WaitGroup // Serve goroutines, one per bound socket

	// applyMu serialises snapshot application (the watcher's pushes and a
	// held empty snapshot coming due).
	applyMu sync.Mutex

	// watch is the running discovery watcher; replaced when the source of
	// instances changes on reload.
	watchMu     sync.Mutex
	watchCancel context.CancelFunc
	watchDone   chan struct{}

	mu         sync.Mutex
	cfg        config.Listener
	ln         net.Listener
	targets    map[string]*balancer.Target // every discovered address
	discovered []string                    // sorted
	panicking  bool
	emptyTimer *time.Timer // pending empty snapshot, see holdEmpty
	emptyToken uint64      // identifies the pending emptyTimer
	closing    bool
	timerWG    sync.WaitGroup // an emptyTimer applying its snapshot

	synced     atomic.Bool
	lastSync   atomic.Int64 // unix nanoseconds of the last snapshot
	updates    atomic.Uint64
	errors     atomic.Uint64
	lastErr    atomic.Pointer[string]
	inError    atomic.Bool
	generation atomic.Uint64 // bumped on each watcher start, to drop stale pushes
}

func newListener(cfg config.Listener, engine *proxy.Engine, logger *zap.Logger) *listener {
	log := logger.With(zap.String("listener", cfg.Name))
	l := &listener{
		log:     log,
		cfg:     cfg,
		targets: make(map[string]*balancer.Target),
	}
	l.proxy = &proxy.Proxy{Picker: &l.rr, Logger: log.Named("proxy"), Engine: engine}
	l.checker = health.New(healthConfig(cfg.Health), log.Named("health"), l.onLive)
	l.proxy.ReportFailure = l.checker.ReportFailure
	l.proxy.Configure(proxySettings(cfg))
	return l
}

func healthConfig(h config.Health) health.Config {
	return health.Config{
		Check: h.Check, Path: h.Path, Interval: h.Interval, Timeout: h.Timeout,
		Rise: h.Rise, Fall: h.Fall, BackoffMax: h.BackoffMax,
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

// startWatch runs w until stopWatch or the next startWatch. Pushes from a
// watcher that has been replaced are ignored.
func (l *listener) startWatch(w discovery.Watcher, wg *sync.WaitGroup) {
	l.stopWatch()
	gen := l.generation.Add(1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	l.watchMu.Lock()
	l.watchCancel, l.watchDone = cancel, done
	l.watchMu.Unlock()
	sink := discovery.SinkFuncs{
		OnUpdate: func(s discovery.Snapshot) {
			if l.generation.Load() == gen {
				l.onSnapshot(s)
			}
		},
		OnError: func(err error) {
			if l.generation.Load() == gen {
				l.onError(err)
			}
		},
	}
	wg.Go(func() {
		defer close(done)
		if err := w.Watch(ctx, sink); err != nil && ctx.Err() == nil {
			l.onError(err)
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

// onSnapshot applies a full discovery snapshot: targets are created for new
// addresses and dropped for vanished ones, and the checker follows.
func (l *listener) onSnapshot(s discovery.Snapshot) {
	l.applyMu.Lock()
	defer l.applyMu.Unlock()
	addrs := s.Addrs()
	if l.holdEmpty(addrs) {
		l.updates.Add(1)
		l.lastSync.Store(time.Now().UnixNano())
		return
	}
	l.applySnapshot(addrs, true)
}

// applySnapshot makes addrs the discovered set; fresh says it just came
// from the registry (and counts as a sync).
func (l *listener) applySnapshot(addrs []string, fresh bool) {
	l.makeBeforeBreak(addrs)
	l.mu.Lock()
	for _, a := range addrs {
		if _, ok := l.targets[a]; !ok {
			l.targets[a] = balancer.NewTarget(a)
		}
	}
	for a := range l.targets {
		if _, found := slices.BinarySearch(addrs, a); !found {
			delete(l.targets, a)
		}
	}
	changed := !slices.Equal(l.discovered, addrs)
	l.discovered = addrs
	l.mu.Unlock()

	if fresh {
		l.updates.Add(1)
		l.lastSync.Store(time.Now().UnixNano())
	}
	if l.inError.CompareAndSwap(true, false) {
		l.log.Info("discovery recovered", zap.Int("instances", len(addrs)))
	}
	if !l.synced.Swap(true) {
		l.log.Info("discovery synced", zap.Int("instances", len(addrs)), zap.Strings("addrs", addrs))
	} else if changed {
		l.log.Info("instances changed", zap.Int("instances", len(addrs)), zap.Strings("addrs", addrs))
	}
	l.checker.Update(addrs)
	// The checker publishes only when the live set changes; a removed
	// target that was down, or panic mode, still needs a fresh picker.
	l.onLive(nil)
}

// emptyHold is how long a registry may report no instances at all before
// rota believes it. A registry restarted without its data (a Consul agent in
// dev mode, an etcd restored empty) answers "none" until its instances
// register again; emptying the pool at once would refuse every client in
// that window. HAProxy's "hold obsolete" does the same for DNS. Instances
// kept meanwhile are still health checked, so dead ones go down anyway.
const emptyHold = 5 * time.Second

// holdEmpty reports whether an empty snapshot must wait: it arms a timer
// that applies it after emptyHold unless a non-empty one arrives first.
func (l *listener) holdEmpty(addrs []string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(addrs) > 0 || len(l.discovered) == 0 {
		if l.emptyTimer != nil {
			l.emptyTimer.Stop()
			l.emptyTimer = nil
		}
		return false
	}
	if l.emptyTimer == nil && !l.closing {
		l.log.Warn("registry reports no instances; keeping the last known ones for a while",
			zap.Int("instances", len(l.discovered)), zap.Duration("hold", emptyHold))
		gen := l.generation.Load()
		l.emptyToken++
		token := l.emptyToken
		l.emptyTimer = time.AfterFunc(emptyHold, func() {
			// applyMu orders this after any snapshot being applied; the
			// token says no newer snapshot cancelled this one meanwhile.
			l.applyMu.Lock()
			defer l.applyMu.Unlock()
			l.mu.Lock()
			fire := l.emptyTimer != nil && l.emptyToken == token && !l.closing && l.generation.Load() == gen
			if fire {
				l.emptyTimer = nil
				l.timerWG.Add(1) // under mu, before shutdown can see closing
			}
			l.mu.Unlock()
			if fire {
				defer l.timerWG.Done()
				l.log.Warn("registry still reports no instances; dropping the last known ones")
				l.applySnapshot(nil, false)
			}
		})
	}
	return true
}

// makeBeforeBreak handles a snapshot that replaces every live target (a
// blue/green switch, a registry that came back with a new set): applied
// as is, it would leave nothing to route to until the new targets pass
// their first probe, and clients arriving meanwhile would be refused. So
// the new targets are probed first while the old ones keep serving,
// bounded by the health timeout.
func (l *listener) makeBeforeBreak(addrs []string) {
	live := l.checker.Live()
	if len(live) == 0 {
		return
	}
	for _, a := range live {
		if _, found := slices.BinarySearch(addrs, a); found {
			return // some live target stays: nothing to bridge
		}
	}
	l.mu.Lock()
	var added []string
	union := slices.Clone(addrs)
	for _, a := range addrs {
		if _, ok := l.targets[a]; !ok {
			added = append(added, a)
			l.targets[a] = balancer.NewTarget(a)
		}
	}
	for a := range l.targets {
		if _, found := slices.BinarySearch(addrs, a); !found {
			union = append(union, a)
		}
	}
	timeout := l.cfg.Health.Timeout
	l.mu.Unlock()
	if len(added) == 0 {
		return
	}
	l.checker.Update(union)
	deadline := time.Now().Add(timeout + 100*time.Millisecond)
	for time.Now().Before(deadline) && !l.probedAny(added) {
		// The checker has no per-probe notification; a short poll bounded
		// by the probe timeout is simplest and runs only on a full swap.
		time.Sleep(time.Millisecond)
	}
}

// probedAny reports whether one of addrs is live, or all have a probe result.
func (l *listener) probedAny(addrs []string) bool {
	pending := 0
	for _, st := range l.checker.Status() {
		if _, found := slices.BinarySearch(addrs, st.Addr); !found {
			continue
		}
		switch st.State {
		case health.Up:
			return true
		case health.Checking:
			pending++
		}
	}
	return pending == 0
}

// onError records a registry failure. The last snapshot stays in force.
func (l *listener) onError(err error) {
	l.errors.Add(1)
	msg := err.Error()
	l.lastErr.Store(&msg)
	if !l.inError.Swap(true) {
		l.log.Warn("discovery failing; keeping the last known instances", zap.Error(err))
	}
}

// onLive publishes a new picker over the live targets. With panic mode on
// and every discovered target failing, it routes over all of them instead:
// a wrong health verdict then costs less than refusing everyone.
//
// The live set is read afresh under l.mu rather than taken from the
// argument, so that concurrent publishers can never install a stale set.
func (l *listener) onLive([]string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	live := l.checker.Live()
	set := make([]*balancer.Target, 0, len(live))
	for _, a := range live {
		if t, ok := l.targets[a]; ok {
			set = append(set, t)
		}
	}
	panicking := len(set) == 0 && len(l.targets) > 0 && l.cfg.Panic
	if panicking {
		for _, a := range l.discovered {
			set = append(set, l.targets[a])
		}
	}
	if panicking != l.panicking {
		l.panicking = panicking
		if panicking {
			l.log.Warn("panic mode: no target passes its checks; routing over all discovered targets",
				zap.Int("targets", len(set)))
		} else {
			l.log.Info("panic mode over", zap.Int("live", len(set)))
		}
	}
	l.rr.Update(set)
}

// apply takes the new settings of a reloaded listener.
func (l *listener) apply(cfg config.Listener) {
	l.mu.Lock()
	l.cfg = cfg
	l.mu.Unlock()
	l.proxy.Configure(proxySettings(cfg))
	l.checker.SetConfig(healthConfig(cfg.Health))
	l.onLive(nil) // the panic flag may have changed
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
	l.mu.Lock()
	l.closing = true
	if l.emptyTimer != nil {
		l.emptyTimer.Stop()
		l.emptyTimer = nil
	}
	l.mu.Unlock()
	l.timerWG.Wait()
	l.checker.Close()
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
