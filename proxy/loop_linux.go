//go:build linux

package proxy

import (
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
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

// adopt hands s to a relay loop, which from now on owns its connections and
// calls release when they are closed. It returns false when s must be
// relayed by goroutines instead: a connection that is not plain TCP (a test
// dialer, say) or a loop that could not start.
func (ls *loopSet) adopt(s *session, release func()) bool {
	cfd, ok := sockFD(s.client)
	if !ok {
		return false
	}
	bfd, ok := sockFD(s.backend)
	if !ok {
		return false
	}
	l := ls.pick(s.p)
	if l == nil {
		return false
	}
	r := &relay{s: s, l: l, release: release, last: time.Now()}
	r.c = end{r: r, conn: s.client, fd: cfd}
	r.b = end{r: r, conn: s.backend, fd: bfd}
	s.mu.Lock()
	if s.aborted {
		// Shutdown got here first and closed the connections.
		s.mu.Unlock()
		return false
	}
	s.relay = r
	s.mu.Unlock()
	l.post(loopMsg{r: r, kind: msgAdd})
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
	msgAdd      msgKind = iota // a new connection to relay
	msgAbort                   // cut the connection (Shutdown)
	msgRedialed                // the dial after an early reset finished; err says how
)

type loopMsg struct {
	r    *relay
	kind msgKind
	err  error
}

// loop is one event loop. Everything below mu belongs to the loop
// goroutine; other goroutines reach it only through post.
type loop struct {
	p    *Proxy
	epfd int
	file *os.File // epfd, registered with Go's netpoller
	rc   syscall.RawConn
	evfd int // eventfd that wakes the loop for its inbox

	mu    sync.Mutex
	inbox []loopMsg
	woken bool // evfd written, inbox not yet taken

	taken  []loopMsg
	ends   []*end // by file descriptor
	relays map[*relay]struct{}
	again  []*relay // stopped at spinLimit with more to do
	events [maxEvents]unix.EpollEvent
	buf    []byte
	now    time.Time
	window time.Duration // idle sweep period; 0 while no connection has an idle timeout
	pollFn func(uintptr) bool
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
		relays: make(map[*relay]struct{}), buf: make([]byte, loopBufSize)}
	l.pollFn = l.poll
	return l, nil
}

// post queues m for the loop and wakes it.
func (l *loop) post(m loopMsg) {
	l.mu.Lock()
	l.inbox = append(l.inbox, m)
	wake := !l.woken
	l.woken = true
	l.mu.Unlock()
	if wake {
		one := [8]byte{1}
		unix.Write(l.evfd, one[:])
	}
}

func (l *loop) run(wg *sync.WaitGroup) {
	defer wg.Done()
	for {
		err := l.rc.Read(l.pollFn)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			l.now = time.Now()
			l.sweep()
			l.file.SetReadDeadline(l.now.Add(l.window))
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
		return // closed earlier in this batch
	}
	e := l.ends[fd]
	if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		e.in = true
	}
	if ev.Events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		e.hup = true
	}
	l.step(e.r)
}

func (l *loop) takeInbox() {
	var b [8]byte
	unix.Read(l.evfd, b[:])
	l.mu.Lock()
	l.taken, l.inbox = l.inbox, l.taken[:0]
	l.woken = false
	l.mu.Unlock()
	for i := range l.taken {
		m := l.taken[i]
		l.taken[i] = loopMsg{}
		r := m.r
		switch m.kind {
		case msgAdd:
			l.relays[r] = struct{}{}
			if w := r.s.window(); w > 0 && (l.window == 0 || w < l.window) {
				l.window = w
				l.file.SetReadDeadline(l.now.Add(w))
			}
			if err := l.register(&r.c); err != nil {
				l.close(r, err)
				continue
			}
			if err := l.register(&r.b); err != nil {
				l.close(r, err)
				continue
			}
		case msgAbort:
			if r.dialing {
				r.aborted = true // closed when the dial returns
			} else if !r.done {
				l.close(r, nil)
			}
		case msgRedialed:
			r.dialing = false
			s := r.s
			if m.err != nil || r.aborted {
				if m.err != nil {
					l.p.Logger.Debug("no target left after reset", zap.Error(m.err))
				}
				r.b = end{r: r, conn: s.backend, fd: -1}
				l.close(r, m.err)
				continue
			}
			fd, _ := sockFD(s.backend) // the dialer makes TCP connections, as before
			r.b = end{r: r, conn: s.backend, fd: fd, shut: s.clientEOF}
			if err := l.register(&r.b); err != nil {
				l.close(r, err)
				continue
			}
			l.step(r)
		}
	}
}

func (l *loop) register(e *end) error {
	if e.fd >= len(l.ends) {
		ends := make([]*end, max(2*len(l.ends), e.fd+1, 1024))
		copy(ends, l.ends)
		l.ends = ends
	}
	l.ends[e.fd] = e
	err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, e.fd, &unix.EpollEvent{
		Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET,
		Fd:     int32(e.fd),
	})
	if err != nil {
		l.ends[e.fd] = nil
		return fmt.Errorf("epoll_ctl: %w", err)
	}
	return nil
}

// sweep cuts connections idle for their idle timeout or longer.
func (l *loop) sweep() {
	for r := range l.relays {
		if t := r.s.set.IdleTimeout; t > 0 && !r.dialing && l.now.Sub(r.last) >= t {
			l.close(r, nil)
		}
	}
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
	resetSeen bool
	dialing   bool // a goroutine is connecting the next target
	aborted   bool // Shutdown asked while dialing
	queued    bool // in loop.again
	done      bool
}

// end is one side of a relay.
type end struct {
	r    *relay
	conn net.Conn
	fd   int
	in   bool    // readable: edge seen and not yet read to the end
	hup  bool    // peer closed or errored: read until EOF, not just a short read
	eof  bool    // read EOF from this side
	shut bool    // sent FIN to this side (shutdown SHUT_WR)
	pend *[]byte // bytes waiting to be written to this side
	off  int     // first unwritten byte of pend
}

// step moves whatever can move in both directions of r.
func (l *loop) step(r *relay) {
	if r.done || r.dialing {
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
		if src.eof {
			if !dst.shut {
				dst.shut = true
				if err := unix.Shutdown(dst.fd, unix.SHUT_WR); err != nil && err != unix.ENOTCONN {
					l.close(r, err)
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
		if !l.read(r, src, dst) {
			return false
		}
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
		if !toBackend && isResetErrno(err) {
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
	t := s.target
	if toBackend {
		s.p.Stats.BytesOut.Add(uint64(n))
		t.BytesOut.Add(uint64(n))
		if replaying {
			*s.replay = (*s.replay)[:len(*s.replay)+n]
			if !r.resetSeen {
				if err := l.write(dst, data); err != nil && isResetErrno(err) {
					r.resetSeen = true
				}
			}
			if len(*s.replay) == cap(*s.replay) {
				r.commit()
			}
			return true
		}
	} else {
		s.p.Stats.BytesIn.Add(uint64(n))
		t.BytesIn.Add(uint64(n))
		if !s.committed {
			r.commit()
		}
	}
	if err := l.write(dst, data); err != nil {
		l.close(r, err)
		return false
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
				if isResetErrno(err) {
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

// retry dials the next target after the current one reset before its first
// byte, in a goroutine: the loop must not wait on a dial. The client is not
// read meanwhile; its bytes so far are replayed by the dial.
func (l *loop) retry(r *relay, cause error) bool {
	s := r.s
	if s.committed || r.aborted {
		l.close(r, cause)
		return false
	}
	s.fail(s.target, fmt.Errorf("reset before first byte: %w", cause))
	l.forget(&r.b) // s.backend stays open until the dial replaces and closes it
	r.b = end{r: r, fd: -1}
	r.resetSeen = false
	r.dialing = true
	go func() {
		s.mu.Lock()
		err := s.connectLocked()
		s.mu.Unlock()
		l.post(loopMsg{r: r, kind: msgRedialed, err: err})
	}()
	return false
}

// forget takes e out of the loop's table; closing its descriptor (which the
// caller does next, or the dialer later) takes it out of epoll.
func (l *loop) forget(e *end) {
	if e.fd >= 0 && e.fd < len(l.ends) && l.ends[e.fd] == e {
		l.ends[e.fd] = nil
	}
	putPend(e)
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
	l.forget(&r.b)
	delete(l.relays, r)
	s := r.s
	s.mu.Lock()
	s.aborted = true
	s.backend.Close()
	s.target.Active.Add(-1)
	s.releaseReplayLocked()
	s.mu.Unlock()
	s.client.Close()
	s.p.untrack(s)
	r.release()
}

// The loop's descriptors are non-blocking, so its system calls never
// wait: they are made raw, without telling the scheduler. A call announced
// as possibly blocking lets the runtime hand the thread's P to another
// thread after 20µs, and a loop making hundreds of thousands of calls a
// second then pays for those hand-offs and for a monitor waking every 20µs.

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

func isResetErrno(err error) bool {
	return err == unix.ECONNRESET || err == unix.EPIPE || err == unix.ECONNREFUSED
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
