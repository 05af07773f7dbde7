package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/balancer"
)

// replayLimit bounds the client bytes kept until a target first answers. A
// target that resets the connection before sending anything has not
// processed those bytes, so they can be replayed to the next target: this is
// what makes a backend killed under load cost its queued clients nothing.
const replayLimit = 16 << 10

// bufPool holds replay and first-read buffers. Connections take one only
// while they have data in hand, so idle connections hold none.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, replayLimit); return &b }}

// session is one proxied client connection. Until it is committed (the
// target has sent a byte, or the replay buffer is full) the backend may be
// swapped for another target; fields below mu are guarded by it.
type session struct {
	p      *Proxy
	set    *Settings
	client net.Conn
	cursor balancer.Cursor
	tries  int // attempts left, including the first
	start  time.Time

	lastIn, lastOut atomic.Int64 // activity, as nanoseconds since start
	src, dst        net.Addr     // from an accepted PROXY header; nil: the socket's
	// A client accepted inside a relay loop has no net.Conn (client is
	// nil): its descriptor and address are these.
	cfd  int
	peer netip.AddrPort

	mu        sync.Mutex
	backend   net.Conn
	target    *balancer.Target
	committed bool
	replay    *[]byte // client bytes sent to the current target, until commit
	clientEOF bool
	aborted   bool
	// resetSeen is the backend whose reset a write consumed: Linux reports
	// a reset once, so the backend's next read sees a plain EOF.
	resetSeen net.Conn
	// relay is set when a relay loop owns the connections (Linux).
	relay *relay
}

func (s *session) writeReset() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.resetSeen != nil && s.resetSeen == s.backend
}

// open registers client as a session of p, so that Shutdown waits for it
// from the moment it is accepted. It returns nil, having closed client and
// called release, when p is closed.
func (p *Proxy) open(client net.Conn, release func()) *session {
	s := &session{p: p, set: p.currentSettings(), client: client, start: time.Now()}
	if !p.track(s) {
		client.Close()
		release()
		return nil
	}
	return s
}

// handle proxies s. It returns once the connection is handed to a relay
// loop or its copy goroutines are started; release runs when the
// connection is finished and everything is closed.
//
// The two copy directions run in fresh goroutines, and the goroutine that
// accepted and dialled exits: dialling grows a goroutine's stack, and a
// stack never shrinks while its goroutine sits idle, so an idle proxied
// connection would otherwise keep that larger stack for its lifetime.
func (s *session) handle(release func()) {
	p, client := s.p, s.client
	if s.set.AcceptProxyFrom != nil {
		timeout := s.set.ProxyHeaderTimeout
		if timeout <= 0 {
			timeout = 5 * time.Second
		}
		src, dst, rest, err := readProxyHeader(client, s.set.AcceptProxyFrom, timeout)
		if err != nil {
			p.Stats.HeaderErrors.Add(1)
			p.Logger.Debug("client closed", zap.Error(err))
			client.Close()
			p.untrack(s)
			release()
			return
		}
		s.src, s.dst = src, dst
		if len(rest) > 0 {
			// Bytes that came with the header start the stream: they are
			// sent to the target like replayed bytes.
			bp := bufPool.Get().(*[]byte)
			*bp = append((*bp)[:0], rest...)
			s.replay = bp
		}
	}
	s.cursor = p.Picker.Pick()
	s.tries = min(1+max(s.set.Retries, 0), s.cursor.Len())
	s.mu.Lock()
	err := s.connectLocked()
	s.mu.Unlock()
	if err != nil {
		p.refuse(client.RemoteAddr(), err)
		client.Close()
		p.untrack(s)
		release()
		return
	}
	p.served()
	if p.loops.adoptConnected(s, release) {
		return
	}

	var left atomic.Int32
	left.Store(2)
	finish := func() {
		if left.Add(-1) != 0 {
			return
		}
		s.mu.Lock()
		s.backend.Close()
		s.target.Active.Add(-1)
		s.releaseReplayLocked()
		s.mu.Unlock()
		client.Close()
		p.untrack(s)
		release()
	}
	go func() {
		defer finish()
		s.backendToClient()
	}()
	go func() {
		defer finish()
		s.clientToBackend()
	}()
}

// refuse counts a client for which no target could be reached, and logs
// the first of a run of them.
func (p *Proxy) refuse(client net.Addr, err error) {
	p.Stats.NoTarget.Add(1)
	if !p.refusing.Swap(true) {
		p.Logger.Warn("refusing clients: no target could be reached", zap.Stringer("client", client), zap.Error(err))
	}
}

// clientAddrs are the client's address and the one it connected to, as a
// PROXY header names them.
func (s *session) clientAddrs() (src, dst net.Addr) {
	switch {
	case s.src != nil:
		return s.src, s.dst
	case s.client != nil:
		return s.client.RemoteAddr(), s.client.LocalAddr()
	}
	return net.TCPAddrFromAddrPort(s.peer), localAddr(s.cfd)
}

// served ends a run of refused clients.
func (p *Proxy) served() {
	if p.refusing.Load() && p.refusing.Swap(false) {
		p.Logger.Info("clients are served again")
	}
}

// connectLocked dials targets from the cursor until one answers or the
// attempts run out; the connected target becomes s.backend. Anything already
// in the replay buffer is sent to it. Caller holds s.mu.
func (s *session) connectLocked() error {
	var lastErr error
	for s.tries > 0 {
		t := s.cursor.Next()
		if t == nil {
			break
		}
		s.tries--
		c, err := s.dial(t)
		if err == nil && s.clientEOF {
			err = closeWrite(c)
		}
		if err != nil {
			lastErr = fmt.Errorf("%s: %w", t.Addr, err)
			if s.p.ctx.Err() != nil {
				return lastErr // shutting down: not the target's fault
			}
			s.fail(t, err)
			continue
		}
		if s.target != nil {
			s.target.Active.Add(-1)
			s.backend.Close()
		}
		s.backend, s.target = c, t
		t.Active.Add(1)
		t.Total.Add(1)
		return nil
	}
	if lastErr == nil {
		return errors.New("no live target")
	}
	return fmt.Errorf("all attempts failed, last: %w", lastErr)
}

// dial connects to t and sends the prelude and replayed bytes, if any.
func (s *session) dial(t *balancer.Target) (net.Conn, error) {
	timeout := dialTimeout(s.set)
	ctx, cancel := context.WithTimeout(s.p.ctx, timeout)
	defer cancel()
	dial := s.set.Dial
	if dial == nil {
		// No TCP keep-alive probes: idle_timeout already ends dead
		// connections, and the four setsockopt calls per dial show in
		// new-connection profiles.
		d := net.Dialer{KeepAlive: -1}
		dial = d.DialContext
	}
	c, err := dial(ctx, "tcp", t.Addr)
	if err != nil {
		return nil, err
	}
	if b, err := s.proxyHeader(); err != nil || b != nil {
		if err == nil {
			_, err = c.Write(b)
		}
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("PROXY header: %w", err)
		}
	}
	if s.replay != nil && len(*s.replay) > 0 {
		if _, err := c.Write(*s.replay); err != nil {
			c.Close()
			return nil, fmt.Errorf("replay: %w", err)
		}
		t.BytesOut.Add(uint64(len(*s.replay)))
	}
	return c, nil
}

func dialTimeout(set *Settings) time.Duration {
	if set.DialTimeout > 0 {
		return set.DialTimeout
	}
	return 2 * time.Second
}

// proxyHeader is the PROXY protocol header to send a target first, naming
// the client; nil when the listener sends none.
func (s *session) proxyHeader() ([]byte, error) {
	v := s.set.SendProxy
	if v == 0 {
		return nil, nil
	}
	src, dst := s.clientAddrs()
	return proxyHeader(v, src, dst)
}

func (s *session) fail(t *balancer.Target, err error) {
	t.DialErrors.Add(1)
	s.p.Stats.DialErrors.Add(1)
	s.p.Logger.Debug("target failed, trying next", zap.String("target", t.Addr), zap.Error(err))
	if s.p.ReportFailure != nil {
		s.p.ReportFailure(t.Addr, err)
	}
}

// commitLocked ends the replay window: from now on the backend is final.
func (s *session) commitLocked() {
	s.committed = true
	s.releaseReplayLocked()
}

func (s *session) releaseReplayLocked() {
	if s.replay != nil {
		*s.replay = (*s.replay)[:0]
		bufPool.Put(s.replay)
		s.replay = nil
	}
}

// abort cuts both sides at once; blocked reads and writes return.
func (s *session) abort() {
	s.mu.Lock()
	if r := s.relay; r != nil {
		s.mu.Unlock()
		r.abort() // the loop owns the descriptors; it closes them
		return
	}
	s.aborted = true
	b := s.backend
	s.mu.Unlock()
	s.client.Close()
	if b != nil {
		b.Close()
	}
}

// clientToBackend forwards the client's bytes. While the target has not
// answered, it keeps a copy of what it sent so the bytes can be replayed to
// another target; after that it splices.
func (s *session) clientToBackend() {
	for {
		s.mu.Lock()
		committed := s.committed
		s.mu.Unlock()
		if committed {
			break
		}
		if err := s.waitReadable(s.client); err != nil {
			if s.keepWaiting(err) {
				continue
			}
			s.abort()
			return
		}
		s.mu.Lock()
		if s.committed {
			s.mu.Unlock()
			break
		}
		if s.replay == nil {
			s.replay = bufPool.Get().(*[]byte)
		}
		buf := *s.replay
		s.mu.Unlock()

		// Only this goroutine writes past len(buf), and the backend goroutine
		// reads only up to len under s.mu, so reading here needs no lock.
		n, err := s.client.Read(buf[len(buf):cap(buf)])
		if n > 0 {
			s.touch(&s.lastOut)
			s.p.Stats.BytesOut.Add(uint64(n))
			s.mu.Lock()
			data := buf[len(buf) : len(buf)+n]
			if s.committed {
				_, werr := s.backend.Write(data)
				s.target.BytesOut.Add(uint64(n))
				s.mu.Unlock()
				if werr != nil {
					s.abort()
					return
				}
				break
			}
			*s.replay = buf[:len(buf)+n]
			// A write error means the target went away; the backend
			// goroutine sees it too and either retries elsewhere with the
			// replay buffer or gives up, so it is not handled here.
			if _, werr := s.backend.Write(data); werr != nil && isReset(werr) {
				s.resetSeen = s.backend
			}
			s.target.BytesOut.Add(uint64(n))
			if len(*s.replay) == cap(*s.replay) {
				s.commitLocked()
			}
			s.mu.Unlock()
		}
		if err == io.EOF {
			s.mu.Lock()
			s.clientEOF = true
			closeWrite(s.backend)
			s.mu.Unlock()
			return
		}
		if err != nil {
			s.abort()
			return
		}
	}
	s.mu.Lock()
	b, t := s.backend, s.target
	s.mu.Unlock()
	if err := s.pipe(b, s.client, &s.lastOut, &s.p.Stats.BytesOut, &t.BytesOut); err != nil {
		s.abort()
	}
}

// backendToClient forwards the target's bytes. A reset before the target's
// first byte is a failed attempt: the next target is tried with the client's
// bytes replayed.
func (s *session) backendToClient() {
	for {
		s.mu.Lock()
		b, committed := s.backend, s.committed
		s.mu.Unlock()
		if committed {
			break
		}
		// A reset seen by the peek is consumed by it (the kernel clears the
		// socket error), so it must be handled here, not read again.
		var n int
		err := s.waitReadable(b)
		bp := bufPool.Get().(*[]byte)
		switch {
		case err == nil:
			n, err = b.Read((*bp)[:cap(*bp)])
		case isReset(err):
		case s.keepWaiting(err):
			bufPool.Put(bp)
			continue
		default:
			bufPool.Put(bp)
			s.abort()
			return
		}
		if n > 0 {
			s.touch(&s.lastIn)
			s.mu.Lock()
			s.commitLocked()
			t := s.target
			s.mu.Unlock()
			_, werr := s.client.Write((*bp)[:n])
			bufPool.Put(bp)
			s.p.Stats.BytesIn.Add(uint64(n))
			t.BytesIn.Add(uint64(n))
			if werr != nil {
				s.abort()
				return
			}
			if err == nil {
				break
			}
		} else {
			bufPool.Put(bp)
		}
		switch {
		case err == nil:
			continue
		case err == io.EOF && !s.writeReset():
			// A clean close is an answer: the target may have consumed the
			// request, so it is never replayed elsewhere.
			s.mu.Lock()
			s.commitLocked()
			s.mu.Unlock()
			closeWrite(s.client)
			return
		case err == io.EOF || isReset(err):
			s.mu.Lock()
			if s.committed || s.aborted {
				s.mu.Unlock()
				s.abort()
				return
			}
			s.fail(s.target, fmt.Errorf("reset before first byte: %w", err))
			if cerr := s.connectLocked(); cerr != nil {
				s.mu.Unlock()
				s.p.Logger.Debug("no target left after reset", zap.Error(cerr))
				s.abort()
				return
			}
			s.mu.Unlock()
		default:
			s.abort()
			return
		}
	}
	s.mu.Lock()
	b, t := s.backend, s.target
	s.mu.Unlock()
	if err := s.pipe(s.client, b, &s.lastIn, &s.p.Stats.BytesIn, &t.BytesIn); err != nil {
		s.abort()
	}
}

// pipe copies src to dst until src reaches EOF, then half-closes dst so the
// peer sees the end of this direction while the other keeps flowing. It
// returns os.ErrDeadlineExceeded when the connection went idle, nil on EOF.
//
// Small messages (requests, responses, chat) go through a pooled buffer that
// is taken only once data has arrived, so an idle connection holds none and
// each message costs one read and one write. A read that fills the buffer
// means a bulk transfer: the rest goes through io.Copy, which between two
// *net.TCPConn is splice(2) and never copies through user space. (Splicing
// small messages is slower than read/write: the pipe round trip dominates.)
func (s *session) pipe(dst, src net.Conn, last *atomic.Int64, counters ...*atomic.Uint64) error {
	window := s.window()
	var rc syscall.RawConn
	if sc, ok := src.(syscall.Conn); ok {
		rc, _ = sc.SyscallConn()
	}
	for {
		if window > 0 {
			src.SetReadDeadline(time.Now().Add(window))
		}
		n, bp, err := readLazily(src, rc)
		if n > 0 {
			_, werr := dst.Write((*bp)[:n])
			full := n == cap(*bp)
			bufPool.Put(bp)
			s.touch(last)
			for _, c := range counters {
				c.Add(uint64(n))
			}
			if werr != nil {
				return werr
			}
			if full && err == nil {
				return s.bulk(dst, src, window, last, counters)
			}
		} else if bp != nil {
			bufPool.Put(bp)
		}
		switch {
		case err == nil:
		case err == io.EOF:
			return closeWrite(dst)
		case s.keepWaiting(err):
		default:
			return err
		}
	}
}

// bulk copies the rest of a bulk transfer with io.Copy (splice), in idle
// windows like pipe.
func (s *session) bulk(dst, src net.Conn, window time.Duration, last *atomic.Int64, counters []*atomic.Uint64) error {
	for {
		if window > 0 {
			src.SetReadDeadline(time.Now().Add(window))
		}
		n, err := io.Copy(dst, src)
		if n > 0 {
			s.touch(last)
			for _, c := range counters {
				c.Add(uint64(n))
			}
		}
		if err == nil {
			return closeWrite(dst)
		}
		if s.keepWaiting(err) {
			continue
		}
		return err
	}
}

// readLazily reads from src into a pooled buffer taken only when the socket
// is readable. The caller returns the buffer (non-nil when n > 0) to
// bufPool. EOF is io.EOF.
func readLazily(src net.Conn, rc syscall.RawConn) (int, *[]byte, error) {
	if rc == nil {
		bp := bufPool.Get().(*[]byte)
		n, err := src.Read((*bp)[:cap(*bp)])
		return n, bp, err
	}
	var (
		n    int
		bp   *[]byte
		serr error
	)
	err := rc.Read(func(fd uintptr) bool {
		if bp == nil {
			bp = bufPool.Get().(*[]byte)
		}
		for {
			n, serr = syscall.Read(int(fd), (*bp)[:cap(*bp)])
			if serr != syscall.EINTR {
				break
			}
		}
		if serr == syscall.EAGAIN {
			bufPool.Put(bp) // idle again: hold nothing while parked
			bp = nil
			return false
		}
		return true
	})
	switch {
	case err != nil:
		if bp != nil {
			bufPool.Put(bp)
		}
		return 0, nil, err
	case serr != nil:
		bufPool.Put(bp)
		return 0, nil, &net.OpError{Op: "read", Net: "tcp", Source: src.LocalAddr(), Addr: src.RemoteAddr(), Err: os.NewSyscallError("read", serr)}
	case n == 0:
		bufPool.Put(bp)
		return 0, nil, io.EOF
	}
	return n, bp, nil
}

// window is how long one blocking read may last before idleness is judged:
// a quarter of the idle timeout, so a connection is cut between 1 and 1.25
// idle timeouts after its last byte, capped so counters stay fresh.
func (s *session) window() time.Duration {
	if s.set.IdleTimeout <= 0 {
		return 0
	}
	return min(max(s.set.IdleTimeout/4, time.Millisecond), time.Minute)
}

// keepWaiting reports whether err is a window expiring on a connection that
// is not yet idle.
func (s *session) keepWaiting(err error) bool {
	if !errors.Is(err, os.ErrDeadlineExceeded) || s.set.IdleTimeout <= 0 {
		return false
	}
	last := max(s.lastIn.Load(), s.lastOut.Load())
	return time.Since(s.start)-time.Duration(last) < s.set.IdleTimeout
}

func (s *session) touch(last *atomic.Int64) {
	last.Store(int64(time.Since(s.start)))
}

// waitReadable blocks until c has data, EOF or an error, without taking a
// buffer, so that an idle connection holds no memory beyond its goroutines.
// It honours the idle window as a read deadline.
func (s *session) waitReadable(c net.Conn) error {
	if w := s.window(); w > 0 {
		c.SetReadDeadline(time.Now().Add(w))
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	var peek [1]byte
	var serr error
	err = rc.Read(func(fd uintptr) bool {
		_, _, e := syscall.Recvfrom(int(fd), peek[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		if e == syscall.EAGAIN || e == syscall.EINTR {
			return false
		}
		serr = e
		return true
	})
	if err != nil {
		return err
	}
	if serr != nil {
		return &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("recvfrom", serr)}
	}
	return nil
}

func closeWrite(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		if err := cw.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, syscall.ENOTCONN) {
			return err
		}
		return nil
	}
	return nil
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNREFUSED)
}
