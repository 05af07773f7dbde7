// Package proxy accepts client connections and joins each to a live target.
//
// For every accepted connection the proxy picks the next live target, dials it
// with a timeout, and on a failed dial reports the target and tries the next
// one. It then copies bytes both ways with half-close, through the kernel's
// splice path when both ends are TCP. The proxy knows a Picker and a failure
// report function; it knows nothing of registries or configuration files.
package proxy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/balancer"
)

// Picker yields the targets to try for one connection, best first.
type Picker interface {
	Pick() balancer.Cursor
}

// Settings tune a Proxy. They may be replaced while the proxy runs; each
// connection uses the settings in force when it was accepted.
type Settings struct {
	DialTimeout time.Duration // per dial attempt; 0 means 2s
	Retries     int           // further targets to try after a failed attempt
	MaxConns    int           // concurrent client connections; 0 is unlimited
	IdleTimeout time.Duration // close when neither side sent anything this long; 0 is never
	// Dial, if set, replaces net.Dialer (tests use it).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// SendProxy, 1 or 2, sends a PROXY protocol header of that version to
	// every target before any client byte, naming the client.
	SendProxy byte
	// AcceptProxyFrom, if not nil, makes every client connection start
	// with a PROXY protocol header (v1 or v2) from one of these sources
	// (load balancers in front); others are closed and counted in
	// Stats.HeaderErrors, as are missing or malformed headers.
	AcceptProxyFrom []netip.Prefix
	// ProxyHeaderTimeout bounds the wait for that header; 0 means 5s.
	ProxyHeaderTimeout time.Duration
}

// Stats are the listener-wide counters of a Proxy, updated atomically.
type Stats struct {
	Accepted   atomic.Uint64 // client connections accepted
	Rejected   atomic.Uint64 // closed at once because MaxConns was reached
	NoTarget   atomic.Uint64 // closed because no target could be reached
	DialErrors atomic.Uint64 // failed attempts to reach a target
	Active     atomic.Int64  // client connections open now
	BytesIn    atomic.Uint64 // bytes from targets to clients
	BytesOut   atomic.Uint64 // bytes from clients to targets
	// HeaderErrors counts clients closed for a PROXY protocol header that
	// was missing, malformed, late, or from an untrusted source.
	HeaderErrors atomic.Uint64
}

// ErrClosed is returned by Serve after Shutdown or Close.
var ErrClosed = errors.New("proxy: closed")

// Proxy joins client connections to targets. Set Picker before use; the other
// fields are optional. A Proxy must not be copied after first use.
type Proxy struct {
	Picker Picker
	// ReportFailure, if set, is told about every target that could not be
	// reached, so health checking can take it out of rotation at once.
	ReportFailure func(addr string, err error)
	Logger        *zap.Logger
	Stats         Stats

	settings atomic.Pointer[Settings]
	refusing atomic.Bool // the last client found no target; logged once per episode

	initOnce sync.Once
	ctx      context.Context // cancelled by Close: aborts dials in flight
	cancel   context.CancelFunc
	wg       sync.WaitGroup // every connection handler

	mu        sync.Mutex
	closing   bool
	listeners map[net.Listener]struct{}
	sessions  map[*session]struct{}
	idle      chan struct{} // closed when sessions drops to zero while closing

	loops loopSet // relay loops, started by the first connection
}

func (p *Proxy) init() {
	p.initOnce.Do(func() {
		p.ctx, p.cancel = context.WithCancel(context.Background())
		p.listeners = make(map[net.Listener]struct{})
		p.sessions = make(map[*session]struct{})
		if p.Logger == nil {
			p.Logger = zap.NewNop()
		}
	})
}

// Configure replaces the settings; connections accepted from now on use them.
func (p *Proxy) Configure(s Settings) {
	p.settings.Store(&s)
}

func (p *Proxy) currentSettings() *Settings {
	if s := p.settings.Load(); s != nil {
		return s
	}
	return &Settings{}
}

// Serve accepts connections on ln and proxies each until ln fails or is
// closed, or the proxy is shut down. On Linux the connections live in the
// proxy's relay loops, and on a *Listener (see Listen) the loops accept them
// too; otherwise each has goroutines of its own. Serve takes ownership of ln
// and closes it. It returns only after every connection it accepted is
// finished, so no goroutine it started outlives it; the relay loops run
// until Shutdown. After Shutdown or Close it returns ErrClosed.
func (p *Proxy) Serve(ln net.Listener) error {
	p.init()
	p.mu.Lock()
	if p.closing {
		p.mu.Unlock()
		ln.Close()
		return ErrClosed
	}
	p.listeners[ln] = struct{}{}
	p.mu.Unlock()

	var conns sync.WaitGroup
	defer func() {
		conns.Wait()
		p.mu.Lock()
		delete(p.listeners, ln)
		p.mu.Unlock()
		ln.Close()
	}()

	if l, ok := ln.(*Listener); ok {
		if ok, err := p.loops.serve(p, l, &conns); ok {
			return err
		}
	}
	release := p.releaser(&conns)
	var delay time.Duration // accept back-off after temporary errors
	for {
		c, err := ln.Accept()
		if err != nil {
			if p.isClosing() {
				return ErrClosed
			}
			if isTemporary(err) {
				// Out of file descriptors and the like: retrying at once would
				// spin a core while nothing improves. Back off like net/http.
				if delay == 0 {
					p.Logger.Warn("accept failed; backing off", zap.Error(err))
				}
				delay = acceptBackoff(delay)
				t := time.NewTimer(delay)
				select {
				case <-t.C:
				case <-p.ctx.Done():
					t.Stop()
				}
				continue
			}
			return err
		}
		delay = 0
		if !p.admit(p.currentSettings(), &conns) {
			c.Close()
			continue
		}
		if s := p.open(c, release); s != nil && !p.loops.adopt(s, release) {
			go s.handle(release)
		}
	}
}

// admit counts an accepted client and takes it on unless MaxConns clients
// are open already. A client taken on counts as active, and in p.wg and
// conns, until the function from releaser runs.
func (p *Proxy) admit(set *Settings, conns *sync.WaitGroup) bool {
	p.Stats.Accepted.Add(1)
	if max := set.MaxConns; max > 0 && p.Stats.Active.Load() >= int64(max) {
		p.Stats.Rejected.Add(1)
		return false
	}
	p.Stats.Active.Add(1)
	p.wg.Add(1)
	conns.Add(1)
	return true
}

// releaser returns what ends a client taken on by admit.
func (p *Proxy) releaser(conns *sync.WaitGroup) func() {
	return func() {
		p.Stats.Active.Add(-1)
		p.wg.Done()
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

// HandleConn proxies one client connection and returns when it is finished.
// HandleConn takes ownership of conn and always closes it. It does not count
// against MaxConns; Serve does that.
func (p *Proxy) HandleConn(conn net.Conn) {
	p.init()
	p.wg.Add(1)
	p.Stats.Active.Add(1)
	done := make(chan struct{})
	release := func() {
		p.Stats.Active.Add(-1)
		p.wg.Done()
		close(done)
	}
	if s := p.open(conn, release); s != nil && !p.loops.adopt(s, release) {
		s.handle(release)
	}
	<-done
}

// Shutdown stops accepting, waits for open connections to finish until ctx is
// done, then closes those still open. It returns ctx.Err() if it had to cut
// connections, else nil.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.init()
	p.mu.Lock()
	p.closing = true
	for ln := range p.listeners {
		ln.Close()
	}
	if p.idle == nil {
		p.idle = make(chan struct{})
		if len(p.sessions) == 0 {
			close(p.idle)
		}
	}
	idle := p.idle
	p.mu.Unlock()

	var err error
	select {
	case <-idle:
	case <-ctx.Done():
		err = ctx.Err()
		p.closeSessions()
	}
	p.cancel()
	p.wg.Wait()
	p.loops.stop()
	return err
}

// Close stops accepting and cuts every open connection at once.
func (p *Proxy) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	p.Shutdown(ctx)
	return nil
}

// ActiveConns is the number of client connections open now.
func (p *Proxy) ActiveConns() int64 { return p.Stats.Active.Load() }

func (p *Proxy) isClosing() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closing
}

func (p *Proxy) closeSessions() {
	p.mu.Lock()
	ss := make([]*session, 0, len(p.sessions))
	for s := range p.sessions {
		ss = append(ss, s)
	}
	p.mu.Unlock()
	for _, s := range ss {
		s.abort()
	}
}

func (p *Proxy) track(s *session) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closing && p.idle != nil && len(p.sessions) == 0 {
		return false // drained already: a late HandleConn must not reopen
	}
	p.sessions[s] = struct{}{}
	return true
}

func (p *Proxy) untrack(s *session) {
	p.mu.Lock()
	delete(p.sessions, s)
	if p.closing && p.idle != nil && len(p.sessions) == 0 {
		select {
		case <-p.idle:
		default:
			close(p.idle)
		}
	}
	p.mu.Unlock()
}

// isTemporary reports accept errors worth waiting out.
func isTemporary(err error) bool {
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED} {
		if errors.Is(err, e) {
			return true
		}
	}
	var ne interface{ Timeout() bool }
	return errors.As(err, &ne) && ne.Timeout()
}
