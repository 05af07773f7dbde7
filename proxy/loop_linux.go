//go:build linux

package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/rota-proxy/rota/balancer"
)

// The relay loops move the bytes of TCP connections on Linux. Each loop owns
// an epoll instance, and every connection it relays is two file descriptors
// in it, edge-triggered: a connection holds no goroutine and no buffer while
// it is idle, and a message costs one read and one write. HAProxy and nginx
// work the same way; with a goroutine per direction (the portable path in
// session.go) every message also costs a netpoller park and wake-up, an
// extra read that finds nothing, and two goroutine stacks per connection.
//
// A loop does not block in epoll_wait itself: its epoll descriptor is
// registered with Go's netpoller, so the loop goroutine parks like any other
// and the scheduler keeps serving accepts, dials and health checks on the
// same threads.

const (
	loopBufSize = 64 << 10 // one read per loop turn, shared by the loop's connections
	maxEvents   = 256
	// spinLimit bounds the reads one direction does before the loop turns
	// to other connections, so a bulk transfer cannot starve them.
	spinLimit = 16
)

// pendPool holds the bytes a write could not take at once. Only
// connections whose peer reads slower than they send hold one.
var pendPool = sync.Pool{New: func() any { b := make([]byte, 0, loopBufSize); return &b }}

// loopSet is the relay loops of one Proxy, started by its first relayed
// connection and stopped by Shutdown.
type loopSet struct {
	mu      sync.Mutex
	started bool
	stopped bool
	loops   []*loop
	next    atomic.Uint32
	wg      sync.WaitGroup
}

// adopt hands s, an accepted client, to a relay loop, which connects it to
// a target and from then on owns its connections and calls release when
// they are closed. It returns false when s must be handled by goroutines
// instead (session.handle): a PROXY header to read first, a test dialer,
// a client that is not plain TCP, or loops that could not start.
func (ls *loopSet) adopt(s *session, release func()) bool {
	if s.set.AcceptProxyFrom != nil || s.set.Dial != nil {
		return false
	}
	return ls.hand(s, release, msgAccept)
}

// adoptConnected is adopt for a session whose target is connected already.
func (ls *loopSet) adoptConnected(s *session, release func()) bool {
	return ls.hand(s, release, msgAdd)
}

func (ls *loopSet) hand(s *session, release func(), kind msgKind) bool {
	cfd, ok := sockFD(s.client)
	if !ok {
		return false
	}
	bfd := -1
	if kind == msgAdd {
		if bfd, ok = sockFD(s.backend); !ok {
			return false
		}
	}
	l := ls.pick(s.p)
	if l == nil {
		return false
	}
	r := &relay{s: s, l: l, release: release, last: time.Now()}
	r.c = end{r: r, fd: cfd}
	r.b = end{r: r, fd: bfd}
	s.mu.Lock()
	if s.aborted {
		// Shutdown got here first and closed the connections.
		s.mu.Unlock()
		return false
	}
	s.relay = r
	s.mu.Unlock()
	l.post(loopMsg{r: r, kind: kind})
	return true
}

func (ls *loopSet) pick(p *Proxy) *loop {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if ls.stopped {
		return nil
	}
	if !ls.started {
		ls.started = true
		for range runtime.GOMAXPROCS(0) {
			l, err := newLoop(p)
			if err != nil {
				p.Logger.Warn("relay loop unavailable; relaying with goroutines", zap.Error(err))
				break
			}
			ls.loops = append(ls.loops, l)
			ls.wg.Add(1)
			go l.run(&ls.wg)
		}
	}
	if len(ls.loops) == 0 {
		return nil
	}
	return ls.loops[int(ls.next.Add(1))%len(ls.loops)]
}

// stop ends the loops. Every connection must be released already.
func (ls *loopSet) stop() {
	ls.mu.Lock()
	ls.stopped = true
	loops := ls.loops
	ls.loops = nil
	ls.mu.Unlock()
	for _, l := range loops {
		l.file.Close() // wakes the loop's wait with an error: it returns
	}
	ls.wg.Wait()
	for _, l := range loops {
		l.mu.Lock()
		l.dead = true
		l.mu.Unlock()
		unix.Close(l.evfd)
	}
}

// sockFD is the descriptor of a TCP connection. The connection stays open
// and owns it; the loop only reads and writes it.
func sockFD(c net.Conn) (int, bool) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return 0, false
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return 0, false
	}
	fd := -1
	if rc.Control(func(u uintptr) { fd = int(u) }) != nil || fd < 0 {
		return 0, false
	}
	return fd, true
}

type msgKind uint8

const (
	msgAccept   msgKind = iota // a new client: connect it to a target
	msgAdd                     // a new client with its target connected
	msgAbort                   // cut the connection (Shutdown)
	msgDialed                  // a dial by name finished: conn or err
	msgListen                  // accept on li too
	msgUnlisten                // li is closed: forget it, then signal ack
)

type loopMsg struct {
	r    *relay
	kind msgKind
	t    *balancer.Target
	conn net.Conn
	err  error
	li   *listening
	ack  chan<- struct{}
}

// loop is one event loop. Everything below mu belongs to the loop
// goroutine; other goroutines reach it only through post.
type loop struct {
	p    *Proxy
	epfd int
	file *os.File // epfd, registered with Go's netpoller
	rc   syscall.RawConn
	evfd int // eventfd that wakes the loop for its inbox

	mu     sync.Mutex
	inbox  []loopMsg
	woken  bool          // evfd written, inbox not yet taken
	dead   bool          // stopped: evfd is closed
	exited chan struct{} // closed when run returns

	taken   []loopMsg
	ends    []*end // by file descriptor
	relays  map[*relay]struct{}
	again   []*relay // stopped at spinLimit with more to do
	events  [maxEvents]unix.EpollEvent
	buf     []byte
	now     time.Time
	window  time.Duration       // idle sweep period; 0 while no connection has an idle timeout
	sweepAt time.Time           // next idle sweep
	wakeAt  time.Time           // the deadline set on file; zero: none
	dials   map[*relay]struct{} // connecting, with a dial deadline
	lns     map[int]*lnState    // listeners, by descriptor
	pollFn  func(uintptr) bool
}

func newLoop(p *Proxy) (*loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	evfd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	fail := func(err error) (*loop, error) {
		unix.Close(epfd)
		unix.Close(evfd)
		return nil, err
	}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, evfd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(evfd)}); err != nil {
		return fail(fmt.Errorf("epoll_ctl eventfd: %w", err))
	}
	// Non-blocking, so os.NewFile registers it with the netpoller.
	if err := unix.SetNonblock(epfd, true); err != nil {
		return fail(fmt.Errorf("epoll fd: %w", err))
	}
	file := os.NewFile(uintptr(epfd), "epoll")
	rc, err := file.SyscallConn()
	if err != nil {
		file.Close()
		unix.Close(evfd)
		return nil, fmt.Errorf("epoll fd: %w", err)
	}
	l := &loop{p: p, epfd: epfd, file: file, rc: rc, evfd: evfd,
		relays: make(map[*relay]struct{}), dials: make(map[*relay]struct{}), lns: make(map[int]*lnState),
		buf: make([]byte, loopBufSize), exited: make(chan struct{})}
	l.pollFn = l.poll
	return l, nil
}

// post queues m for the loop and wakes it.
func (l *loop) post(m loopMsg) {
	l.mu.Lock()
	if l.dead {
		l.mu.Unlock()
		return
	}
	l.inbox = append(l.inbox, m)
	wake := !l.woken
	l.woken = true
	l.mu.Unlock()
	if wake {
		one := [8]byte{1}
		writeFD(l.evfd, one[:])
	}
}

func (l *loop) run(wg *sync.WaitGroup) {
	defer wg.Done()
	defer close(l.exited)
	for {
		err := l.rc.Read(l.pollFn)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			l.now = time.Now()
			l.timers()
		case err != nil:
			return // stopped
		}
	}
}

// poll handles everything that is ready. It returns false, which parks the
// loop in the netpoller until the epoll descriptor has events again.
func (l *loop) poll(uintptr) bool {
	for {
		n, err := epollWait(l.epfd, l.events[:])
		if err != nil && err != unix.EINTR {
			l.p.Logger.Error("relay loop: epoll_wait", zap.Error(err))
			return false
		}
		if n <= 0 && len(l.again) == 0 {
			return false
		}
		l.now = time.Now()
		for i := range max(n, 0) {
			l.handle(&l.events[i])
		}
		if len(l.again) > 0 {
			again := l.again
			l.again = nil
			for _, r := range again {
				r.queued = false
				l.step(r)
			}
			clear(again)
			if l.again == nil {
				l.again = again[:0]
			}
		}
	}
}

func (l *loop) handle(ev *unix.EpollEvent) {
	fd := int(ev.Fd)
	if fd == l.evfd {
		l.takeInbox()
		return
	}
	if fd >= len(l.ends) || l.ends[fd] == nil {
		if st := l.lns[fd]; st != nil {
			l.accept(st)
		}
		return // else closed earlier in this batch
	}
	e := l.ends[fd]
	if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		e.in = true
	}
	if ev.Events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		e.hup = true
	}
	if r := e.r; r.connecting && e == &r.b {
		l.connected(r, ev.Events)
		return
	}
	l.step(e.r)
}

func (l *loop) takeInbox() {
	var b [8]byte
	readFD(l.evfd, b[:])
	l.mu.Lock()
	l.taken, l.inbox = l.inbox, l.taken[:0]
	l.woken = false
	l.mu.Unlock()
	for i := range l.taken {
		m := l.taken[i]
		l.taken[i] = loopMsg{}
		r := m.r
		switch m.kind {
		case msgAccept, msgAdd:
			l.start(r, m.kind == msgAccept)
		case msgListen:
			l.listen(m.li)
		case msgUnlisten:
			// The listener is closed, which took it out of epoll; its
			// descriptor may be another socket's already.
			if st := l.lns[m.li.fd]; st != nil && st.li == m.li {
				delete(l.lns, m.li.fd)
			}
			m.ack <- struct{}{}
		case msgAbort:
			if r.dialing {
				r.aborted = true // closed when the dial returns
			} else if !r.done {
				l.close(r, nil)
			}
		case msgDialed:
			l.dialed(r, m)
		}
	}
}

// start takes on r: it registers the client and, for a new client,
// connects a target; else the backend is connected already.
func (l *loop) start(r *relay, connect bool) {
	l.relays[r] = struct{}{}
	if w := r.s.window(); w > 0 && (l.window == 0 || w < l.window) {
		l.window = w
		l.sweepAt = l.now.Add(w)
		l.wake(l.sweepAt)
	}
	if err := l.register(&r.c); err != nil {
		l.close(r, err)
		return
	}
	if connect {
		s := r.s
		s.cursor = l.p.Picker.Pick()
		s.tries = min(1+max(s.set.Retries, 0), s.cursor.Len())
		l.connect(r)
		return
	}
	if err := l.register(&r.b); err != nil {
		l.close(r, err)
	}
}

func (l *loop) register(e *end) error {
	if e.fd >= len(l.ends) {
		ends := make([]*end, max(2*len(l.ends), e.fd+1, 1024))
		copy(ends, l.ends)
		l.ends = ends
	}
	l.ends[e.fd] = e
	err := epollAdd(l.epfd, e.fd, unix.EPOLLIN|unix.EPOLLOUT|unix.EPOLLRDHUP|unix.EPOLLET)
	if err != nil {
		l.ends[e.fd] = nil
		return fmt.Errorf("epoll_ctl: %w", err)
	}
	return nil
}

// wake makes the loop's wait end by t at the latest.
func (l *loop) wake(t time.Time) {
	if l.wakeAt.IsZero() || t.Before(l.wakeAt) {
		l.wakeAt = t
		l.file.SetReadDeadline(t)
	}
}

// timers runs when the loop's deadline passes: it fails dials that took
// too long, cuts connections idle for their idle timeout (checked every
// quarter of the shortest one, so a connection goes between 1 and 1.25
// idle timeouts after its last byte), and sets the next deadline.
func (l *loop) timers() {
	l.wakeAt = time.Time{} // passed; dials started below set it anew
	var next time.Time
	for r := range l.dials {
		if !l.now.Before(r.dialBy) {
			l.dialFailed(r, fmt.Errorf("dial timeout after %v", dialTimeout(r.s.set)))
			continue
		}
		if next.IsZero() || r.dialBy.Before(next) {
			next = r.dialBy
		}
	}
	for _, st := range l.lns {
		if st.retryAt.IsZero() {
			continue
		}
		if !l.now.Before(st.retryAt) {
			st.retryAt = time.Time{}
			l.arm(st)
		} else if next.IsZero() || st.retryAt.Before(next) {
			next = st.retryAt
		}
	}
	if l.window > 0 {
		if !l.now.Before(l.sweepAt) {
			for r := range l.relays {
				if t := r.s.set.IdleTimeout; t > 0 && !r.dialing && !r.connecting && l.now.Sub(r.last) >= t {
					l.close(r, nil)
				}
			}
			l.sweepAt = l.now.Add(l.window)
		}
		if next.IsZero() || l.sweepAt.Before(next) {
			next = l.sweepAt
		}
	}
	if !next.IsZero() {
		l.wake(next)
	} else if l.wakeAt.IsZero() {
		l.file.SetReadDeadline(time.Time{})
	}
}

// connect starts connecting r to the next target of its cursor. Targets
// named by address are connected by the loop (a non-blocking connect whose
// completion is an epoll event); names need a resolver, so a goroutine
// dials those.
func (l *loop) connect(r *relay) {
	s := r.s
	for s.tries > 0 {
		t := s.cursor.Next()
		if t == nil {
			break
		}
		s.tries--
		ap, err := netip.ParseAddrPort(t.Addr)
		if err != nil {
			r.dialing = true
			go func() {
				c, err := s.dial(t)
				l.post(loopMsg{r: r, kind: msgDialed, t: t, conn: c, err: err})
			}()
			return
		}
		fd, err := startConnect(ap)
		if err == nil {
			r.b = end{r: r, fd: fd}
			err = l.register(&r.b)
			if err != nil {
				closeFD(fd)
			}
		}
		if err != nil {
			r.b = end{r: r, fd: -1}
			r.lastErr = fmt.Errorf("%s: %w", t.Addr, err)
			s.fail(t, err)
			continue
		}
		r.connecting, r.dialT = true, t
		r.dialBy = l.now.Add(dialTimeout(s.set))
		l.dials[r] = struct{}{}
		l.wake(r.dialBy)
		return
	}
	err := r.lastErr
	if err == nil {
		err = errors.New("no live target")
	} else {
		err = fmt.Errorf("all attempts failed, last: %w", err)
	}
	src, _ := s.clientAddrs()
	l.p.refuse(src, err)
	l.close(r, nil)
}

// startConnect opens a non-blocking socket and starts connecting it to ap.
func startConnect(ap netip.AddrPort) (int, error) {
	a, port := ap.Addr(), ap.Port()
	var (
		domain = unix.AF_INET
		sa     unsafe.Pointer
		salen  uintptr
		sa4    unix.RawSockaddrInet4
		sa6    unix.RawSockaddrInet6
	)
	if a.Is4() || a.Is4In6() {
		sa4.Family, sa4.Addr = unix.AF_INET, a.Unmap().As4()
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:], port)
		sa, salen = unsafe.Pointer(&sa4), unsafe.Sizeof(sa4)
	} else {
		domain = unix.AF_INET6
		sa6.Family, sa6.Addr = unix.AF_INET6, a.As16()
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa6.Port))[:], port)
		sa, salen = unsafe.Pointer(&sa6), unsafe.Sizeof(sa6)
	}
	r, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(domain), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if e != 0 {
		return -1, fmt.Errorf("socket: %w", e)
	}
	fd := int(r)
	setNoDelay(fd) // like net.Dial
	if _, _, e := unix.RawSyscall(unix.SYS_CONNECT, r, uintptr(sa), salen); e != 0 && e != unix.EINPROGRESS {
		closeFD(fd)
		return -1, fmt.Errorf("connect: %w", e)
	}
	return fd, nil
}

// setNoDelay makes small messages go out at once, as Go does for its TCP
// connections.
func setNoDelay(fd int) {
	one := int32(1)
	unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY, uintptr(unsafe.Pointer(&one)), 4, 0)
}

func closeFD(fd int) { unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0) }

func shutdownWrite(fd int) error {
	if _, _, e := unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(fd), unix.SHUT_WR, 0); e != 0 {
		return e
	}
	return nil
}

func epollAdd(epfd, fd int, events uint32) error {
	ev := unix.EpollEvent{Events: events, Fd: int32(fd)}
	if _, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), unix.EPOLL_CTL_ADD, uintptr(fd), uintptr(unsafe.Pointer(&ev)), 0, 0); e != 0 {
		return e
	}
	return nil
}

// connected handles an event on a connecting backend: the connect
// finished, one way or the other.
func (l *loop) connected(r *relay, events uint32) {
	if events&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
		errno, err := unix.GetsockoptInt(r.b.fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err == nil {
			err = syscall.Errno(errno)
			if errno == 0 {
				err = unix.ECONNREFUSED
			}
		}
		l.dialFailed(r, err)
		return
	}
	if events&unix.EPOLLOUT == 0 {
		return
	}
	s := r.s
	t := r.dialT
	r.connecting, r.dialT = false, nil
	delete(l.dials, r)
	s.target = t
	t.Active.Add(1)
	t.Total.Add(1)
	l.p.served()
	if b, err := s.proxyHeader(); err != nil {
		l.close(r, fmt.Errorf("PROXY header: %w", err))
		return
	} else if b != nil {
		l.send(r, b)
	}
	if s.replay != nil && len(*s.replay) > 0 {
		l.send(r, *s.replay)
		t.BytesOut.Add(uint64(len(*s.replay)))
	}
	l.step(r)
}

// send writes b, which precedes anything the client sends, to a freshly
// connected backend. A reset shows on the backend's next read.
func (l *loop) send(r *relay, b []byte) {
	if r.resetSeen {
		return
	}
	if r.b.pend != nil {
		*r.b.pend = append(*r.b.pend, b...)
		return
	}
	if err := l.write(&r.b, b); err != nil && isReset(err) {
		r.resetSeen = true
	}
}

// dialFailed gives up on the target r is connecting to and tries the next.
func (l *loop) dialFailed(r *relay, err error) {
	t := r.dialT
	r.connecting, r.dialT = false, nil
	delete(l.dials, r)
	l.forget(&r.b)
	closeFD(r.b.fd)
	r.b = end{r: r, fd: -1}
	r.lastErr = fmt.Errorf("%s: %w", t.Addr, err)
	if l.p.ctx.Err() != nil {
		l.close(r, err) // shutting down: not the target's fault
		return
	}
	s := r.s
	s.fail(t, err)
	l.connect(r)
}

// dialed takes the result of a dial by name (connect).
func (l *loop) dialed(r *relay, m loopMsg) {
	r.dialing = false
	s := r.s
	if r.aborted || r.done {
		if m.conn != nil {
			m.conn.Close()
		}
		l.close(r, nil)
		return
	}
	if m.err != nil {
		r.lastErr = fmt.Errorf("%s: %w", m.t.Addr, m.err)
		if l.p.ctx.Err() != nil {
			l.close(r, m.err)
			return
		}
		s.fail(m.t, m.err)
		l.connect(r)
		return
	}
	fd, ok := sockFD(m.conn)
	if !ok {
		m.conn.Close()
		l.close(r, errors.New("dialer returned a connection that is not TCP"))
		return
	}
	r.b = end{r: r, fd: fd}
	s.mu.Lock()
	s.backend, s.target = m.conn, m.t
	s.mu.Unlock()
	m.t.Active.Add(1)
	m.t.Total.Add(1)
	if err := l.register(&r.b); err != nil {
		l.close(r, err)
		return
	}
	l.p.served()
	l.step(r)
}

// relay is a connection owned by a loop: the client, the backend, and
// where each direction stands.
type relay struct {
	s       *session
	l       *loop
	release func()
	c, b    end
	last    time.Time // last byte read from either side
	// resetSeen: a write to the backend found it reset. Linux reports a
	// reset once, so the backend's next read sees a plain EOF.
	resetSeen  bool
	dialing    bool // a goroutine is dialling a target by name
	aborted    bool // Shutdown asked while dialing
	connecting bool // the loop is connecting r.b to dialT
	dialT      *balancer.Target
	dialBy     time.Time // dial timeout
	lastErr    error     // of the last failed attempt
	queued     bool      // in loop.again
	done       bool
}

// end is one side of a relay.
type end struct {
	r    *relay
	fd   int
	in   bool    // readable: edge seen and not yet read to the end
	hup  bool    // peer closed or errored: read until EOF, not just a short read
	eof  bool    // read EOF from this side
	shut bool    // sent FIN to this side (shutdown SHUT_WR)
	pend *[]byte // bytes waiting to be written to this side
	off  int     // first unwritten byte of pend
	// A pipe, once this side has sent a bulk transfer: its bytes then go
	// to the peer by splice(2), never copied through user space.
	pr, pw int
	piped  int // bytes in the pipe
}

// step moves whatever can move in both directions of r.
func (l *loop) step(r *relay) {
	if r.done || r.dialing || r.connecting {
		return
	}
	more := l.flow(r, &r.c, &r.b)
	if r.done || r.dialing {
		return
	}
	more = l.flow(r, &r.b, &r.c) || more
	if r.done || r.dialing {
		return
	}
	if r.c.eof && r.b.shut && r.b.eof && r.c.shut {
		l.close(r, nil)
		return
	}
	if more && !r.queued {
		r.queued = true
		l.again = append(l.again, r)
	}
}

// flow copies src to dst until src has nothing more, dst takes no more, or
// the spin limit; it reports whether it stopped at the limit. At EOF it
// half-closes dst once dst has everything.
func (l *loop) flow(r *relay, src, dst *end) bool {
	for i := 0; ; i++ {
		if dst.pend != nil && !l.flush(r, dst) {
			return false
		}
		if src.piped > 0 && !l.pump(r, src, dst) {
			return false
		}
		if src.eof {
			if !dst.shut {
				dst.shut = true
				// When the other direction is done too, close (next, in
				// step) sends the FIN.
				if !dst.eof || !src.shut {
					if err := shutdownWrite(dst.fd); err != nil && err != unix.ENOTCONN {
						l.close(r, err)
					}
				}
			}
			return false
		}
		if !src.in {
			return false
		}
		if i == spinLimit {
			return true
		}
		if src.pw > 0 {
			if !l.drain(r, src) {
				return false
			}
			continue
		}
		if !l.read(r, src, dst) {
			return false
		}
	}
}

// maxSplice is the size of a relay's pipe, and the most one splice moves.
const maxSplice = 1 << 20

// startSplice gives src a pipe; false if the kernel would not.
func startSplice(src *end) bool {
	var p [2]int32
	if _, _, e := unix.RawSyscall(unix.SYS_PIPE2, uintptr(unsafe.Pointer(&p)), unix.O_NONBLOCK|unix.O_CLOEXEC, 0); e != 0 {
		return false
	}
	// A larger pipe moves more per call; failing that, 64 KiB still works.
	unix.RawSyscall(unix.SYS_FCNTL, uintptr(p[0]), unix.F_SETPIPE_SZ, maxSplice)
	src.pr, src.pw = int(p[0]), int(p[1])
	return true
}

func splice(from, to, n int) (int, error) {
	m, _, e := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(from), 0, uintptr(to), 0, uintptr(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
	if e != 0 {
		return 0, e
	}
	return int(m), nil
}

// drain splices what src has into its empty pipe. It returns false when r
// was closed.
func (l *loop) drain(r *relay, src *end) bool {
	n, err := splice(src.fd, src.pw, maxSplice)
	switch {
	case err == unix.EINTR:
		return true
	case err == unix.EAGAIN:
		src.in = false // the pipe was empty, so it is the socket
		return true
	case err != nil:
		l.close(r, err)
		return false
	case n == 0:
		src.in, src.eof = false, true
		return true
	}
	src.piped = n
	r.last = l.now
	l.count(r, src, n)
	return true
}

// pump splices src's pipe into dst and reports whether it emptied.
func (l *loop) pump(r *relay, src, dst *end) bool {
	for src.piped > 0 {
		n, err := splice(src.pr, dst.fd, src.piped)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return false // dst is full; its EPOLLOUT edge resumes
		case err != nil:
			l.close(r, err)
			return false
		}
		src.piped -= n
	}
	return true
}

// count adds n bytes read from src to the counters.
func (l *loop) count(r *relay, src *end, n int) {
	s := r.s
	if src == &r.c {
		s.p.Stats.BytesOut.Add(uint64(n))
		s.target.BytesOut.Add(uint64(n))
	} else {
		s.p.Stats.BytesIn.Add(uint64(n))
		s.target.BytesIn.Add(uint64(n))
	}
}

// read reads src once and passes the bytes to dst. Before the target's first
// byte, client bytes are kept for replay and a reset from the target means
// the next target is dialled. It returns false when r was closed or is
// being redialled.
func (l *loop) read(r *relay, src, dst *end) bool {
	s := r.s
	toBackend := src == &r.c
	replaying := toBackend && !s.committed
	buf := l.buf
	if replaying {
		if s.replay == nil {
			s.replay = bufPool.Get().(*[]byte)
		}
		buf = (*s.replay)[len(*s.replay):cap(*s.replay)]
	}
	n, err := readFD(src.fd, buf)
	switch {
	case err == unix.EAGAIN:
		src.in = false
		return true
	case err != nil:
		if !toBackend && isReset(err) {
			return l.retry(r, err)
		}
		l.close(r, err)
		return false
	case n == 0:
		src.in, src.eof = false, true
		if toBackend {
			s.clientEOF = true
		} else if !s.committed {
			if r.resetSeen {
				return l.retry(r, errors.New("EOF after a reset"))
			}
			// A clean close is an answer: the target may have consumed
			// the request, so it is never replayed elsewhere.
			r.commit()
		}
		return true
	}
	if n < len(buf) && !src.hup {
		// Edge-triggered: bytes arriving after this read raise a new edge.
		src.in = false
	}
	r.last = l.now
	data := buf[:n]
	l.count(r, src, n)
	if toBackend {
		if replaying {
			*s.replay = (*s.replay)[:len(*s.replay)+n]
			if !r.resetSeen {
				if err := l.write(dst, data); err != nil && isReset(err) {
					r.resetSeen = true
				}
			}
			if len(*s.replay) == cap(*s.replay) {
				r.commit()
			}
			return true
		}
	} else if !s.committed {
		r.commit()
	}
	if err := l.write(dst, data); err != nil {
		l.close(r, err)
		return false
	}
	if n == len(l.buf) && s.committed {
		// A full read: a bulk transfer. The rest goes by splice. (Small
		// messages stay with read and write, which beat a pipe's round
		// trip.)
		startSplice(src)
	}
	return true
}

// write writes data to e, keeping what the socket does not take in e.pend.
func (l *loop) write(e *end, data []byte) error {
	for len(data) > 0 {
		n, err := writeFD(e.fd, data)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			break
		}
		if err != nil {
			return err
		}
		data = data[n:]
	}
	if len(data) > 0 {
		bp := pendPool.Get().(*[]byte)
		*bp = append((*bp)[:0], data...)
		e.pend, e.off = bp, 0
	}
	return nil
}

// flush writes e.pend and reports whether it is all written.
func (l *loop) flush(r *relay, e *end) bool {
	p := *e.pend
	for e.off < len(p) {
		n, err := writeFD(e.fd, p[e.off:])
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			return false
		}
		if err != nil {
			if e == &r.b && !r.s.committed {
				// Kept for replay; the backend's read decides what follows.
				if isReset(err) {
					r.resetSeen = true
				}
				break
			}
			l.close(r, err)
			return false
		}
		e.off += n
	}
	putPend(e)
	return true
}

func putPend(e *end) {
	if e.pend != nil {
		*e.pend = (*e.pend)[:0]
		pendPool.Put(e.pend)
		e.pend, e.off = nil, 0
	}
}

// retry connects the next target after the current one reset before its
// first byte; the client's bytes so far are replayed to it.
func (l *loop) retry(r *relay, cause error) bool {
	s := r.s
	if s.committed || r.aborted {
		l.close(r, cause)
		return false
	}
	s.fail(s.target, fmt.Errorf("reset before first byte: %w", cause))
	l.dropBackend(r)
	r.resetSeen = false
	l.connect(r)
	return false
}

// dropBackend closes r's backend connection.
func (l *loop) dropBackend(r *relay) {
	l.forget(&r.b)
	s := r.s
	s.mu.Lock()
	// A backend dialled by a goroutine has a net.Conn, which owns the
	// descriptor; one the loop connected has only the descriptor.
	if s.backend != nil {
		s.backend.Close()
	} else if r.b.fd >= 0 {
		closeFD(r.b.fd)
	}
	r.b = end{r: r, fd: -1}
	if s.target != nil {
		s.target.Active.Add(-1)
	}
	s.backend, s.target = nil, nil
	s.mu.Unlock()
}

// forget takes e out of the loop's table; closing its descriptor (which the
// caller does next, or the dialer later) takes it out of epoll.
func (l *loop) forget(e *end) {
	if e.fd >= 0 && e.fd < len(l.ends) && l.ends[e.fd] == e {
		l.ends[e.fd] = nil
	}
	putPend(e)
	if e.pw > 0 {
		closeFD(e.pr)
		closeFD(e.pw)
		e.pr, e.pw, e.piped = 0, 0, 0
	}
}

// close ends r: both connections are closed and the session released.
func (l *loop) close(r *relay, err error) {
	if r.done {
		return
	}
	r.done = true
	if err != nil {
		l.p.Logger.Debug("connection cut", zap.Error(err))
	}
	l.forget(&r.c)
	if r.connecting {
		delete(l.dials, r)
		r.connecting = false
	}
	l.dropBackend(r)
	delete(l.relays, r)
	s := r.s
	s.mu.Lock()
	s.aborted = true
	s.releaseReplayLocked()
	s.mu.Unlock()
	if s.client != nil {
		s.client.Close()
	} else {
		closeFD(r.c.fd)
	}
	s.p.untrack(s)
	r.release()
}

func readFD(fd int, b []byte) (int, error) {
	for {
		n, _, e := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)))
		switch e {
		case 0:
			return int(n), nil
		case unix.EINTR:
			continue
		}
		return 0, e
	}
}

func writeFD(fd int, b []byte) (int, error) {
	n, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

func epollWait(epfd int, events []unix.EpollEvent) (int, error) {
	n, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// commit ends the replay window: the backend is final.
func (r *relay) commit() {
	r.s.mu.Lock()
	r.s.commitLocked()
	r.s.mu.Unlock()
}

// abort asks the loop to cut r.
func (r *relay) abort() { r.l.post(loopMsg{r: r, kind: msgAbort}) }

// disable keeps connections off the loops: they are relayed by goroutines.
func (ls *loopSet) disable() {
	ls.mu.Lock()
	ls.stopped = true
	ls.mu.Unlock()
}

// listening is a Listener whose connections the loops accept.
type listening struct {
	ln      *Listener
	fd      int
	rc      syscall.RawConn
	conns   *sync.WaitGroup // Serve's: its connections
	release func()
}

// lnState is one loop's view of a listener: armed in its epoll, or backing
// off after running out of descriptors.
type lnState struct {
	li      *listening
	armed   bool
	delay   time.Duration
	retryAt time.Time
}

// serve accepts on ln inside the loops: every loop has the listener in its
// epoll (EPOLLEXCLUSIVE: one is woken per connection) and accept4s on it
// directly, so a client socket never enters Go's netpoller (saving two
// epoll_ctl calls, a getsockname and a goroutine hand-off per connection).
// It returns when ln is closed; false if no loop runs, and Serve accepts as
// usual.
func (ls *loopSet) serve(p *Proxy, ln *Listener, conns *sync.WaitGroup) (bool, error) {
	if ls.pick(p) == nil {
		return false, nil
	}
	rc, err := ln.SyscallConn()
	if err != nil {
		return false, nil
	}
	fd := -1
	if rc.Control(func(u uintptr) { fd = int(u) }) != nil || fd < 0 {
		return false, nil
	}
	ls.mu.Lock()
	loops := slices.Clone(ls.loops)
	ls.mu.Unlock()
	li := &listening{ln: ln, fd: fd, rc: rc, conns: conns, release: p.releaser(conns)}
	for _, l := range loops {
		l.post(loopMsg{kind: msgListen, li: li})
	}
	<-ln.closed
	ack := make(chan struct{}, len(loops))
	for _, l := range loops {
		l.post(loopMsg{kind: msgUnlisten, li: li, ack: ack})
	}
	for _, l := range loops {
		select {
		case <-ack:
		case <-l.exited:
		}
	}
	if p.isClosing() {
		return true, ErrClosed
	}
	return true, net.ErrClosed
}

func (l *loop) listen(li *listening) {
	st := &lnState{li: li}
	l.lns[li.fd] = st
	l.arm(st)
}

// arm adds st's listener to the loop's epoll. Through Control, which holds
// the descriptor open: a closed listener's number may be reused already.
func (l *loop) arm(st *lnState) {
	err := st.li.rc.Control(func(fd uintptr) {
		e := epollAdd(l.epfd, int(fd), unix.EPOLLIN|unix.EPOLLEXCLUSIVE)
		if e == unix.EINVAL { // kernels before 4.5
			e = epollAdd(l.epfd, int(fd), unix.EPOLLIN)
		}
		st.armed = e == nil
	})
	if err != nil || !st.armed {
		delete(l.lns, st.li.fd)
	}
}

// accept takes the connections waiting on st's listener, up to a batch;
// the listener is level-triggered, so more raise another event.
func (l *loop) accept(st *lnState) {
	var acceptErr error
	err := st.li.rc.Control(func(lfd uintptr) {
		for range 32 {
			var rsa unix.RawSockaddrAny
			alen := uint32(unix.SizeofSockaddrAny)
			fd, _, e := unix.RawSyscall6(unix.SYS_ACCEPT4, lfd, uintptr(unsafe.Pointer(&rsa)), uintptr(unsafe.Pointer(&alen)), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
			switch e {
			case 0:
				l.accepted(st.li, int(fd), peerOf(&rsa))
				st.delay = 0
			case unix.EAGAIN:
				return
			case unix.EINTR, unix.ECONNABORTED:
			default:
				// Out of descriptors, typically. The listener is
				// level-triggered: leave it out of this loop's epoll
				// for a while rather than spin on it.
				acceptErr = os.NewSyscallError("accept4", e)
				unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, int(lfd), nil)
				st.armed = false
				return
			}
		}
	})
	switch {
	case err != nil:
		delete(l.lns, st.li.fd) // closed
	case acceptErr != nil:
		if st.delay == 0 {
			l.p.Logger.Warn("accept failed; backing off", zap.Error(acceptErr))
		}
		st.delay = acceptBackoff(st.delay)
		st.retryAt = l.now.Add(st.delay)
		l.wake(st.retryAt)
	}
}

// accepted starts relaying the client connection fd.
func (l *loop) accepted(li *listening, fd int, peer netip.AddrPort) {
	p := l.p
	if p.isClosing() {
		closeFD(fd) // accepted as Shutdown closed the listener
		return
	}
	set := p.currentSettings()
	if !p.admit(set, li.conns) {
		closeFD(fd)
		return
	}
	setNoDelay(fd) // like net.Listen
	if set.AcceptProxyFrom != nil || set.Dial != nil {
		// These take the goroutine path, which needs a net.Conn.
		f := os.NewFile(uintptr(fd), "client")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			p.Logger.Warn("client dropped", zap.Error(err))
			li.release()
			return
		}
		if s := p.open(c, li.release); s != nil {
			go s.handle(li.release)
		}
		return
	}
	s := &session{p: p, set: set, start: l.now, cfd: fd, peer: peer}
	// Spread connections over the loops: EPOLLEXCLUSIVE tends to wake the
	// same loop for every connection, and one loop is one thread.
	to := p.loops.pick(p)
	if to == nil {
		to = l
	}
	r := &relay{s: s, l: to, release: li.release, last: l.now}
	r.c = end{r: r, fd: fd}
	r.b = end{r: r, fd: -1}
	s.relay = r
	if !p.track(s) {
		closeFD(fd)
		li.release()
		return
	}
	if to != l {
		to.post(loopMsg{r: r, kind: msgAccept})
		return
	}
	l.start(r, true)
}

func peerOf(rsa *unix.RawSockaddrAny) netip.AddrPort {
	switch rsa.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), port)
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), port)
	}
	return netip.AddrPort{}
}

// localAddr is the address a client connected to.
func localAddr(fd int) net.Addr {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return &net.TCPAddr{}
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return &net.TCPAddr{IP: net.IP(sa.Addr[:]).To16(), Port: sa.Port}
	case *unix.SockaddrInet6:
		return &net.TCPAddr{IP: net.IP(sa.Addr[:]), Port: sa.Port}
	}
	return &net.TCPAddr{}
}
