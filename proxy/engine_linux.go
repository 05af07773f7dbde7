//go:build linux

package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/internal/poller"
	"github.com/rota-proxy/rota/internal/sock"
)

// Engine is a process's relay loops: GOMAXPROCS event loops (package
// poller), each relaying the connections it was given and accepting on
// every *Listener served. Every Proxy of a process shares one, so a reload
// adds no threads of work and connections of all listeners spread over the
// same loops. Create it with NewEngine; Close it after every Proxy using it
// has shut down.
type Engine struct {
	log     *zap.Logger
	once    sync.Once
	loops   []*loop
	err     error // why the loops could not start: goroutines relay instead
	next    atomic.Uint32
	private bool
	closed  atomic.Bool
	// pipes counts the splice pipes open in every loop, lent or idle;
	// maxPipes bounds it (see DefaultMaxPipes).
	pipes    atomic.Int32
	maxPipes int32
}

// DefaultMaxPipes bounds the splice pipes an Engine has open at once. A
// pipe holds up to 1 MiB of kernel memory while its bytes wait for a slow
// reader (a stalled download keeps its pipe full until the client reads),
// so without a bound such clients could pin a MiB each; past it, bulk
// transfers go by read and write through the loop's buffer (HAProxy's
// maxpipes). 256 pipes: at most 256 MiB, and 256 bulk transfers at once at
// splice's rate (bench/README.md).
const DefaultMaxPipes = 256

// NewEngine returns an engine of n loops (GOMAXPROCS when n <= 0). The
// loops start on first use.
func NewEngine(n int, log *zap.Logger) *Engine {
	if log == nil {
		log = zap.NewNop()
	}
	if n <= 0 {
		n = runtime.GOMAXPROCS(0)
	}
	e := &Engine{log: log, maxPipes: DefaultMaxPipes}
	e.loops = make([]*loop, n)
	return e
}

func newPrivateEngine(log *zap.Logger) *Engine {
	e := NewEngine(0, log)
	e.private = true
	return e
}

// start creates and runs the loops, once; false when they cannot run.
func (e *Engine) start() bool {
	e.once.Do(func() {
		for i := range e.loops {
			p, err := poller.New(e.log.Named("loop"))
			if err != nil {
				e.err = err
				for _, l := range e.loops[:i] {
					l.p.Stop()
				}
				e.loops = nil
				e.log.Warn("relay loops unavailable; relaying with goroutines", zap.Error(err))
				return
			}
			e.loops[i] = &loop{id: i, e: e, p: p, buf: make([]byte, loopBufSize)}
			go p.Run()
		}
	})
	return len(e.loops) > 0 && e.loops[0] != nil && !e.closed.Load()
}

func (e *Engine) limitPipes(n int) { e.maxPipes = int32(n) }
func (e *Engine) pipesOpen() int   { return int(e.pipes.Load()) }

// stallLoops is StallLoops (tests): each loop blocks in a posted function
// until release (which may be called again); it returns once every one is
// blocked.
func (e *Engine) stallLoops() (release func()) {
	gate := make(chan struct{})
	var held sync.WaitGroup
	if !e.start() {
		return func() {}
	}
	for _, l := range e.loops {
		held.Add(1)
		if !l.p.Post(func() { held.Done(); <-gate }) {
			held.Done()
		}
	}
	held.Wait()
	return sync.OnceFunc(func() { close(gate) })
}

// pick is the loop for the next connection: the loops take turns.
func (e *Engine) pick() *loop {
	return e.loops[int(e.next.Add(1))%len(e.loops)]
}

// Close stops the loops and waits for them. Every Proxy using the engine
// must have shut down.
func (e *Engine) Close() {
	if e.closed.Swap(true) {
		return
	}
	e.once.Do(func() { e.loops = nil }) // never started
	for _, l := range e.loops {
		if l != nil {
			l.p.Stop()
		}
	}
	for _, l := range e.loops {
		if l != nil {
			l.p.Wait()
			for _, pp := range l.pipes { // the loop has ended: its pipes are ours
				l.closePipe(pp)
			}
			l.pipes = nil
		}
	}
}

// abort cuts every connection of p in the loops.
func (e *Engine) abort(p *Proxy) {
	if !e.start() {
		return
	}
	for _, l := range e.loops {
		l.p.Post(func() {
			for c := l.conns.next; c != nil; {
				next := c.next
				if c.p == p {
					c.finish(false, accesslog.Shutdown, errors.New("shutting down: drain timeout reached"))
				}
				c = next
			}
		})
	}
}

// retire schedules the wind-down of p's connections to t in every loop
// (see Proxy.Retire).
func (e *Engine) retire(p *Proxy, t *balancer.Target, why balancer.Reason, grace time.Duration) {
	if !e.start() {
		return
	}
	for _, l := range e.loops {
		l.p.Post(func() {
			at := l.p.Now() + int64(grace)
			for c := l.conns.next; c != nil; c = c.next {
				if c.p == p && !c.done && c.m.Target() == t {
					c.m.Retire(at, why)
					c.arm()
				}
			}
		})
	}
}

// serve accepts on ln in every loop until ln is closed, and reports true
// then; false when the loops cannot run (Serve then accepts itself).
func (e *Engine) serve(p *Proxy, ln *Listener, conns *sync.WaitGroup) bool {
	if !e.start() {
		return false
	}
	li, ok := ln.serve(p, conns, len(e.loops))
	if !ok {
		return true // closed already
	}
	for _, l := range e.loops {
		if !l.p.Post(func() { l.listen(li) }) {
			li.unref()
		}
	}
	<-li.done
	return true
}

const (
	loopBufSize = 64 << 10 // one read per turn, shared by the loop's connections
	// turnBytes bounds what one direction moves before the loop turns to
	// other connections (and its timers), so bulk transfers cannot starve
	// them: sixteen reads of the loop buffer, or one splice of a full pipe.
	turnBytes = maxSplice
	// maxSplice is the size of a pipe, and the most one splice moves.
	maxSplice = 1 << 20
	// maxIdlePipes bounds the pipes a loop keeps for the next bulk transfer.
	maxIdlePipes = 16
)

// pendPool holds the bytes a write could not take at once. Only
// connections whose peer reads slower than they send hold one.
var pendPool = sync.Pool{New: func() any { b := make([]byte, 0, loopBufSize); return &b }}

// loop is one event loop and what its connections share. Everything in it
// belongs to the loop's goroutine.
type loop struct {
	id    int // its index in the engine
	e     *Engine
	p     *poller.Poller
	buf   []byte
	pipes []*pipe // idle pipes, empty
	conns conn    // list head: the loop's connections (for abort)
}

// pipe is a kernel pipe a bulk transfer splices through, and the bytes in
// it. A side holds one only while it sends a bulk transfer, so an idle
// connection pays a pointer for it, not the pipe.
type pipe struct{ r, w, n int }

// getPipe lends an empty pipe; nil if none can be made or the engine has
// its DefaultMaxPipes open (the transfer goes on with read and write).
func (l *loop) getPipe() *pipe {
	if n := len(l.pipes); n > 0 {
		pp := l.pipes[n-1]
		l.pipes = l.pipes[:n-1]
		return pp
	}
	if l.e.pipes.Add(1) > l.e.maxPipes {
		l.e.pipes.Add(-1)
		return nil
	}
	r, w, err := newPipe()
	if err != nil {
		l.e.pipes.Add(-1)
		return nil
	}
	return &pipe{r: r, w: w}
}

// putPipe takes back an empty pipe.
func (l *loop) putPipe(pp *pipe) {
	if len(l.pipes) < maxIdlePipes {
		l.pipes = append(l.pipes, pp)
		return
	}
	l.closePipe(pp)
}

// closePipe closes a pipe, empty or not, and gives its place back.
func (l *loop) closePipe(pp *pipe) {
	sock.Close(pp.r)
	sock.Close(pp.w)
	l.e.pipes.Add(-1)
}

// listening is one Serve of a *Listener: shared by the loops that accept
// on it.
type listening struct {
	ln    *Listener
	p     *Proxy
	fd    int
	conns *sync.WaitGroup // Serve's: its connections
	local netip.AddrPort  // the bound address, for PROXY headers
	refs  atomic.Int32    // loops that still have fd registered
	done  chan struct{}   // closed with fd, when no loop has it
	errs  episode         // accept failures, logged once per episode
	mu    sync.Mutex
	hs    []*acceptor // per loop
}

// unref drops one loop's hold on fd; the last closes it.
func (li *listening) unref() {
	if li.refs.Add(-1) == 0 {
		sock.Close(li.fd)
		close(li.done)
	}
}

// stop makes every loop forget li. It does not wait.
func (li *listening) stop() {
	li.mu.Lock()
	hs := li.hs
	li.hs = nil
	li.mu.Unlock()
	for _, h := range hs {
		if !h.l.p.Post(h.stop) {
			li.unref()
		}
	}
	// Loops that never registered (their listen is still queued) drop
	// their reference there, seeing the listener closed.
}

// acceptor is one loop's registration of a listener.
type acceptor struct {
	li      *listening
	l       *loop
	fd      poller.FD
	timer   poller.Timer
	delay   time.Duration
	paused  bool
	stopped bool
}

const acceptEvents = poller.In | poller.Exclusive

func (l *loop) listen(li *listening) {
	h := &acceptor{li: li, l: l}
	li.mu.Lock()
	closed := li.ln.isClosed()
	if !closed {
		li.hs = append(li.hs, h)
	}
	li.mu.Unlock()
	if closed {
		li.unref()
		return
	}
	err := l.p.Share(&h.fd, li.fd, acceptEvents, h, 0)
	if errors.Is(err, errEINVAL) { // kernels before 4.5: no EPOLLEXCLUSIVE
		err = l.p.Share(&h.fd, li.fd, poller.In, h, 0)
	}
	if err != nil {
		li.p.Logger.Error("listener: cannot accept in a relay loop", zap.Error(err))
		h.stopped = true
		li.unref()
	}
}

// stop forgets the listener in this loop.
func (h *acceptor) stop() {
	if h.stopped {
		return
	}
	h.stopped = true
	h.l.p.Cancel(&h.timer)
	h.l.p.Forget(&h.fd)
	h.li.unref()
}

// Ready accepts the connections waiting, up to a batch; the listener is
// level-triggered, so epoll reports those left again, and the loop asks
// epoll again before it parks.
func (h *acceptor) Ready(uint8, uint32) {
	for range 32 {
		fd, peer, err := accept(h.li.fd)
		switch {
		case err == nil:
			h.delay = 0
			h.l.accepted(h.li, fd, peer)
			continue
		case err == errEAGAIN:
			return
		case err == errEINTR || err == errECONNABORTED:
			continue
		}
		// Out of descriptors, typically. Leave the listener out of this
		// loop's epoll for a while rather than spin on it.
		h.li.errs.hit(h.li.p.Logger, "accept failed; backing off", err)
		h.l.p.Pause(&h.fd)
		h.paused = true
		h.delay = acceptBackoff(h.delay)
		h.l.p.Set(&h.timer, h.l.p.Now()+int64(h.delay), h)
		return
	}
}

// Expired ends a back-off.
func (h *acceptor) Expired() {
	if h.paused && !h.stopped {
		h.paused = false
		if err := h.l.p.Resume(&h.fd, acceptEvents); err != nil {
			h.l.p.Resume(&h.fd, poller.In)
		}
	}
}

// Abort forgets the listener after a panic.
func (h *acceptor) Abort(any) { h.stop() }

// accepted takes on the client fd: admitted, it goes to the next loop.
func (l *loop) accepted(li *listening, fd int, peer netip.AddrPort) {
	p := li.p
	if li.errs.active.Load() {
		li.errs.quiet(p.Logger, "accepting again")
	}
	set := p.currentSettings()
	if !p.admit(set, peer) {
		sock.Close(fd)
		return
	}
	li.conns.Add(1) // fd has TCP_NODELAY from the listener (fromTCP)
	local := li.local
	if set.relay.ProxyProtocol != 0 && (!local.Addr().IsValid() || local.Addr().IsUnspecified()) {
		local = sockname(fd)
	}
	to := l.e.pick()
	c := &conn{p: p, set: set, conns: li.conns}
	c.cfd = fd
	c.m.Src, c.m.Dst = peer, local // Init takes them from here
	if to == l {
		to.start(c)
		return
	}
	if !to.p.Post(func() { to.start(c) }) {
		sock.Close(fd)
		p.release(li.conns)
	}
}

// Listener is a TCP listener made for Serve. On Linux its descriptor is
// handed to the relay loops, which accept on it themselves (a client socket
// never enters Go's netpoller); elsewhere it is an ordinary listener. Close
// stops Serve like closing any listener does.
type Listener struct {
	addr net.Addr

	mu      sync.Mutex
	fd      int
	closed  bool
	serving *listening
	tl      net.Listener  // Accept's, made on first use
	done    chan struct{} // closed once fd is
}

// Listen binds addr ("host:port") for Serve.
func Listen(addr string) (*Listener, error) {
	lc := net.ListenConfig{KeepAlive: -1}
	ln, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	return fromTCP(ln.(*net.TCPListener))
}

// fromTCP makes a Listener of a duplicate of ln's socket; the caller
// closes ln.
func fromTCP(ln *net.TCPListener) (*Listener, error) {
	fd, err := dupFD(ln)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", ln.Addr(), err)
	}
	// Accepted sockets inherit it (Linux copies the listener's options
	// into each): one system call per listener, not one per client.
	sock.SetNoDelay(fd)
	return &Listener{addr: ln.Addr(), fd: fd, done: make(chan struct{})}, nil
}

// File returns a duplicate of the listening socket, for a process to
// inherit (an upgrade): the caller owns it. Closing l later leaves the
// socket listening for whoever holds the duplicate.
func (l *Listener) File() (*os.File, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, net.ErrClosed
	}
	d, err := unix.FcntlInt(uintptr(l.fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup: %w", err)
	}
	return os.NewFile(uintptr(d), l.addr.String()), nil
}

// Addr is the bound address.
func (l *Listener) Addr() net.Addr { return l.addr }

// Accept accepts one connection, for a Serve whose engine could not start
// its loops (it then accepts like on any listener). The loops do not use it.
func (l *Listener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, net.ErrClosed
	}
	if l.tl == nil {
		// A Go listener on a duplicate of the socket, made only now so that
		// Go's netpoller is not woken for connections the loops accept.
		tl, err := fileListener(l.fd)
		if err != nil {
			l.mu.Unlock()
			return nil, err
		}
		l.tl = tl
	}
	tl := l.tl
	l.mu.Unlock()
	return tl.Accept()
}

func (l *Listener) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

// serve marks l as served by loops of p.
func (l *Listener) serve(p *Proxy, conns *sync.WaitGroup, loops int) (*listening, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || l.serving != nil {
		return nil, false
	}
	li := &listening{ln: l, p: p, fd: l.fd, conns: conns, done: l.done}
	if ta, ok := l.addr.(*net.TCPAddr); ok {
		li.local = ta.AddrPort()
		li.local = netip.AddrPortFrom(li.local.Addr().Unmap(), li.local.Port())
	}
	li.refs.Store(int32(loops))
	l.serving = li
	return li, true
}

// Close stops listening. It returns once the socket is closed (the loops
// accepting on it let go of it first); it never waits for a connection,
// and the loops never wait for anything while it does.
func (l *Listener) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		<-l.done
		return nil
	}
	l.closed = true
	if l.tl != nil {
		l.tl.Close()
	}
	li := l.serving
	if li == nil {
		sock.Close(l.fd)
		close(l.done)
		l.mu.Unlock()
		return nil
	}
	l.mu.Unlock()
	li.stop()
	<-l.done
	return nil
}
