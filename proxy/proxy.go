// Package proxy accepts client connections and joins each to a live target.
//
// For every accepted connection the proxy picks the next live target, dials it
// with a timeout, and on a failed dial reports the target and tries the next
// one. It then copies bytes both ways with half-close, through the kernel's
// splice path for bulk transfers. The proxy knows a Picker and a failure
// report function; it knows nothing of registries or configuration files.
//
// What happens to a connection is decided in one place, the state machine
// of proxy/internal/relay; two drivers carry it out. On Linux an Engine's
// event loops own the sockets (engine_linux.go): an open connection holds no
// goroutine. Elsewhere, and for listeners that are not a *Listener, two
// goroutines relay each connection (goroutines.go).
package proxy

import (
	"context"
	"errors"
	"golang.org/x/time/rate"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/proxy/internal/relay"
)

// Picker yields the targets to try for one connection, best first.
type Picker = relay.Picker

// Settings tune a Proxy (relay.Settings documents each). They may be
// replaced while the proxy runs; each connection uses the settings in
// force when it was accepted.
type Settings = relay.Settings

// ProxyVersion is a PROXY protocol version (Settings.ProxyProtocol).
type ProxyVersion = relay.ProxyVersion

// Grace is a duration or Never (Settings.RemovedConnGrace).
type Grace = relay.Grace

// Never is the Grace that never runs out.
const Never = relay.Never

// Rate is a connection rate (Settings.MaxConnRate, MaxConnRatePerClient).
type Rate = relay.Rate

// ErrClosed is returned by Serve after Shutdown or Close.
var ErrClosed = errors.New("proxy: closed")

// Proxy joins client connections to targets. Configure it before Serve;
// the fields are optional. A Proxy must not be copied after first use.
type Proxy struct {
	// Name is the listener's, in the access log.
	Name string
	// ReportFailure, if set, is told about every target that could not be
	// reached, so health checking can take it out of rotation at once. It
	// is called from the relay loops: it must not block.
	ReportFailure func(addr string, err error)
	Logger        *zap.Logger
	Stats         Stats
	// Engine runs the connections. Share one among every Proxy of a
	// process; nil: the proxy starts its own on first use and stops it in
	// Shutdown.
	Engine *Engine

	settings atomic.Pointer[settings]
	log      atomic.Pointer[accesslog.Log] // nil: no access log
	refusing atomic.Bool                   // the last client found no target; logged once per episode

	initOnce       sync.Once
	epoch          time.Time // the goroutine driver's clock starts here
	ownEngine      bool
	goroutinesOnly bool        // tests: relay with goroutines on Linux too
	stopping       atomic.Bool // Shutdown began: Serve ends with ErrClosed
	closing        atomic.Bool // the listeners are closed: no new connection is taken on
	aborting       atomic.Bool // Shutdown's deadline passed: connections are cut
	idleOnce       sync.Once
	idle           chan struct{} // closed once closing and no connection is open
	serving        sync.WaitGroup

	clientsOnce sync.Once
	clients     *relay.ClientLimit // open connections by client address

	panicOn       func([]byte) bool     // tests: panic on such a client chunk
	panicOnAccess func(netip.Addr) bool // tests: panic starting such a client

	mu        sync.Mutex // guards the fields below; never held across a wait
	listeners map[net.Listener]struct{}
	gconns    map[*gconn]struct{} // connections relayed by goroutines
}

// settings are a Settings with what the relays derive from it once.
type settings struct {
	relay  relay.Config
	router *Router
}

func (p *Proxy) init() {
	p.initOnce.Do(func() {
		p.listeners = make(map[net.Listener]struct{})
		p.gconns = make(map[*gconn]struct{})
		p.idle = make(chan struct{})
		p.epoch = time.Now()
		if p.Logger == nil {
			p.Logger = zap.NewNop()
		}
		if p.Engine == nil {
			p.Engine = newPrivateEngine(p.Logger)
			p.ownEngine = true
		}
	})
}

// Configure replaces the settings and the way targets are picked (a
// Router: by server name, or Single); connections accepted from now on use
// them.
func (p *Proxy) Configure(s Settings, r *Router) {
	set := &settings{relay: relay.Config{Settings: s}, router: r}
	if r != nil {
		set.relay.Picker = r.single
		if r.single == nil {
			set.relay.Route = r.route
		}
	}
	if len(s.Deny) > 0 || len(s.Allow) > 0 {
		deny, allow := s.Deny, s.Allow
		set.relay.Access = func(a netip.Addr) relay.Denial {
			if contains(deny, a) {
				return relay.Denied
			}
			if len(allow) > 0 && !contains(allow, a) {
				return relay.NotAllowed
			}
			return relay.Admitted
		}
	}
	if s.MaxConnsPerClient > 0 {
		set.relay.Clients = p.clientLimit()
	}
	// Fresh buckets per configuration: a reload that changes a rate
	// starts it full.
	if r := s.MaxConnRate; r.PerSecond > 0 {
		set.relay.Rate = rate.NewLimiter(rate.Limit(r.PerSecond), r.Burst())
	}
	if r := s.MaxConnRatePerClient; r.PerSecond > 0 {
		set.relay.ClientRates = relay.NewClientRates(r)
	}
	if trusted := s.AcceptProxyProtocol; len(trusted) > 0 {
		set.relay.AcceptProxy = func(a netip.Addr) bool { return contains(trusted, a.Unmap()) }
	}
	if f := p.panicOn; f != nil {
		set.relay.Inspect = func(b []byte) {
			if f(b) {
				panic("proxy: injected panic")
			}
		}
	}
	if f := p.panicOnAccess; f != nil {
		access := set.relay.Access
		set.relay.Access = func(a netip.Addr) relay.Denial {
			if f(a) {
				panic("proxy: injected panic at start")
			}
			if access == nil {
				return relay.Admitted
			}
			return access(a)
		}
	}
	p.settings.Store(set)
}

func contains(prefixes []netip.Prefix, a netip.Addr) bool {
	for _, p := range prefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func (p *Proxy) currentSettings() *settings {
	if s := p.settings.Load(); s != nil {
		return s
	}
	p.Configure(Settings{}, nil) // no picker: every client is refused
	return p.settings.Load()
}

// Serve accepts connections on ln and proxies each until ln is closed or
// the proxy shuts down. On a *Listener (see Listen) the Engine's loops
// accept and relay the connections; on another listener Serve accepts, and
// goroutines relay. Serve takes ownership of ln and closes it. It returns
// only after every connection it accepted is finished, so nothing it
// started outlives it: net.ErrClosed when ln was closed, ErrClosed after
// Shutdown or Close, or the error that made accepting fail.
func (p *Proxy) Serve(ln net.Listener) error {
	p.init()
	p.mu.Lock()
	if p.stopping.Load() {
		p.mu.Unlock()
		ln.Close()
		return ErrClosed
	}
	p.listeners[ln] = struct{}{}
	p.serving.Add(1)
	p.mu.Unlock()

	var conns sync.WaitGroup
	defer func() {
		ln.Close()
		conns.Wait()
		p.mu.Lock()
		delete(p.listeners, ln)
		p.mu.Unlock()
		p.serving.Done()
	}()
	var err error
	// A listener that terminates or originates TLS is served by
	// goroutines: its handshakes and records are crypto/tls's.
	if l, ok := ln.(*Listener); ok && !p.goroutinesOnly && !p.speaksTLS() && p.Engine.serve(p, l, &conns) {
		err = net.ErrClosed
	} else {
		err = p.acceptLoop(ln, &conns)
	}
	if p.stopping.Load() {
		return ErrClosed
	}
	return err
}

// acceptLoop accepts with ln.Accept, relaying each client with goroutines.
func (p *Proxy) acceptLoop(ln net.Listener, conns *sync.WaitGroup) error {
	var delay time.Duration // accept back-off after temporary errors
	var errs episode
	for {
		c, err := ln.Accept()
		if err != nil {
			if p.stopping.Load() {
				return ErrClosed
			}
			if !isTemporary(err) {
				return err
			}
			// Out of file descriptors and the like: retrying at once would
			// spin a core while nothing improves. Back off like net/http.
			errs.hit(p.Logger, "accept failed; backing off", err)
			delay = acceptBackoff(delay)
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-p.idle:
				t.Stop()
			}
			continue
		}
		delay = 0
		errs.quiet(p.Logger, "accepting again")
		set := p.currentSettings()
		if !p.admit(set, addrPort(c.RemoteAddr())) {
			c.Close()
			continue
		}
		conns.Add(1)
		p.relayWithGoroutines(c, set, conns)
	}
}

// admit takes on an accepted client unless MaxConns clients are open
// already or the proxy is closing. A client taken on counts as active until
// release. The count is raised before it is checked, so concurrent loops
// can never take on more than MaxConns between them.
func (p *Proxy) admit(set *settings, client netip.AddrPort) bool {
	p.Stats.Accepted.Add(1)
	n := p.Stats.Active.Add(1)
	var t accesslog.Termination
	switch {
	case p.closing.Load():
		t = accesslog.Shutdown
	case set.relay.MaxConns > 0 && n > int64(set.relay.MaxConns):
		p.Stats.Rejected.Add(1)
		t = accesslog.MaxConns
	default:
		return true
	}
	p.release(nil)
	p.refusedAtAccept(set, client, t)
	return false
}

// release ends a client taken on by admit.
func (p *Proxy) release(conns *sync.WaitGroup) {
	if p.Stats.Active.Add(-1) == 0 && p.closing.Load() {
		p.idleOnce.Do(func() { close(p.idle) })
	}
	if conns != nil {
		conns.Done()
	}
}

// acceptBackoff is the wait after another failed accept: from 5ms,
// doubling to 1s.
func acceptBackoff(prev time.Duration) time.Duration {
	if prev == 0 {
		return 5 * time.Millisecond
	}
	return min(2*prev, time.Second)
}

// Shutdown stops accepting, waits for open connections to finish until ctx is
// done, then closes those still open. It returns ctx.Err() if it had to cut
// connections, else nil. It holds no lock while it waits, and nothing it
// waits for waits for the proxy.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.init()
	p.mu.Lock()
	p.stopping.Store(true)
	lns := make([]net.Listener, 0, len(p.listeners))
	for ln := range p.listeners {
		lns = append(lns, ln)
	}
	p.mu.Unlock()
	// The listeners close first, and only then is a client refused as
	// shutting down: one accepted before is served like any other. (After
	// an upgrade the sockets live on in the new process: a client accepted
	// here in the last moment must not be turned away.)
	for _, ln := range lns {
		ln.Close()
	}
	p.closing.Store(true)
	if p.Stats.Active.Load() == 0 {
		p.idleOnce.Do(func() { close(p.idle) })
	}
	var err error
	select {
	case <-p.idle:
	case <-ctx.Done():
		err = ctx.Err()
		p.abortAll()
		<-p.idle
	}
	p.serving.Wait()
	if p.ownEngine {
		p.Engine.Close()
	}
	return err
}

// Close stops accepting and cuts every open connection at once.
func (p *Proxy) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	p.Shutdown(ctx)
	return nil
}

// goroutineConns lists the connections relayed by goroutines now.
func (p *Proxy) goroutineConns() []*gconn {
	p.mu.Lock()
	defer p.mu.Unlock()
	gs := make([]*gconn, 0, len(p.gconns))
	for g := range p.gconns {
		gs = append(gs, g)
	}
	return gs
}

// abortAll cuts every open connection.
func (p *Proxy) abortAll() {
	p.aborting.Store(true)
	p.Engine.abort(p)
	for _, g := range p.goroutineConns() {
		g.abort()
	}
}

// Retire says that t takes no new connections, for why (balancer.Removed,
// Down or Drained); its open connections are wound down (a FIN to both
// sides once each side's bytes are through, never a reset) after the
// RemovedConnGrace in force. balancer.Kept says it takes them again: wind-downs
// not begun are called off. It never blocks: the pool calls it from its
// serializer.
func (p *Proxy) Retire(t *balancer.Target, why balancer.Reason) {
	grace := time.Duration(p.currentSettings().relay.RemovedConnGrace)
	if grace < 0 && why != balancer.Kept {
		return
	}
	p.init()
	p.Engine.retire(p, t, why, grace)
	for _, g := range p.goroutineConns() {
		g.retire(t, why, grace)
	}
}

// ClientConns is the number of connections open from client address a,
// as max_conns_per_client counts them (0 when it is off).
func (p *Proxy) ClientConns(a netip.Addr) int { return p.clientLimit().Open(a) }

// clientLimit is the per-client count, shared by every settings of p.
func (p *Proxy) clientLimit() *relay.ClientLimit {
	p.clientsOnce.Do(func() { p.clients = relay.NewClientLimit() })
	return p.clients
}

// ActiveConns is the number of client connections open now.
func (p *Proxy) ActiveConns() int64 { return p.Stats.Active.Load() }

// refuse counts a client for which no target could be reached, and logs
// the first of a run of them.
func (p *Proxy) refuse(client netip.AddrPort, err error) {
	if !p.refusing.Swap(true) {
		p.Logger.Warn("refusing clients: no target could be reached", zap.Stringer("client", client), zap.Error(err))
	}
}

// served ends a run of refused clients.
func (p *Proxy) served() {
	if p.refusing.Load() && p.refusing.Swap(false) {
		p.Logger.Info("clients are served again")
	}
}

// episode rate-limits a warning that a hot loop can raise thousands of
// times a second: the first occurrence is logged, the rest are counted, and
// the end of the run is logged with the count. Safe for concurrent use.
type episode struct {
	active atomic.Bool // read without the lock on hot paths
	mu     sync.Mutex
	count  int
	last   time.Time
}

// hit records one occurrence, logging it if it starts an episode.
func (e *episode) hit(log *zap.Logger, msg string, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.last = time.Now()
	e.count++
	if !e.active.Load() {
		e.active.Store(true)
		e.count = 1
		log.Warn(msg+" (further occurrences are counted, not logged)", zap.Error(err))
	}
}

// quiet ends an episode that has seen no occurrence for a second.
func (e *episode) quiet(log *zap.Logger, msg string) {
	if !e.active.Load() {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.active.Load() && time.Since(e.last) >= time.Second {
		e.active.Store(false)
		log.Info(msg, zap.Int("failures", e.count))
	}
}
