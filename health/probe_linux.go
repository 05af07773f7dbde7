//go:build linux

package health

import (
	"bytes"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/internal/poller"
	"github.com/rota-proxy/rota/internal/sock"
)

// tcpProber runs tcp, send_expect and http checks on one poller, as HAProxy runs
// its checks in its event loop: a probe is a non-blocking connect and a
// deadline (and for send_expect and http, the writes and reads of the
// exchange as the socket is ready), not a goroutine, a netpoller registration, a context and a
// timer. At 10,000
// targets every 2 s that halves what a probe costs the proxy beyond the
// kernel's own work (bench/README.md). It takes addresses that are IP
// literals; names go through the resolver on the goroutine path.
//
// The loop is paced (poller.NewPaced): it handles what the sockets report
// in rounds, one every batchWindow while probes are in flight, not as each
// answer comes. A result is up to batchWindow late, and a wake-up per
// answer, which at 10,000 send_expect targets cost as much as the rest of
// the prober, is gone (bench/README.md).
//
// A probe's socket, and its registration in the poller, serve the next
// probe: when a probe ends, connect(2) to AF_UNSPEC resets the connection
// as closing would, and the socket waits for the next probe of its family,
// which then needs no socket(2) and no epoll_ctl(2), and the last no
// close(2) (bench/README.md).
type tcpProber struct {
	p    *poller.Poller
	idle [2][]*probeSocket // the loop's: disconnected sockets, IPv4 and IPv6
	buf  [4096]byte        // the loop's: what a send_expect or http read lands in first
	ar   answerReader      // the loop's: what an http answer is parsed through
}

// maxIdleSockets bounds the sockets kept per family: probes in flight at
// once are bounded by the scheduler, and a burst beyond this many closes
// the surplus.
const maxIdleSockets = 256

// newTCPProber starts a prober whose loop runs until close, in rounds
// batchWindow apart.
func newTCPProber(log *zap.Logger) (*tcpProber, error) {
	p, err := poller.NewPaced(log, batchWindow)
	if err != nil {
		return nil, err
	}
	go p.Run()
	return &tcpProber{p: p}, nil
}

// start hands jobs to the loop. It never blocks; false means the prober
// is closed and no done will be called.
func (pr *tcpProber) start(jobs []tcpJob) bool {
	return pr.p.Post(func() {
		// The kept connections give up what the last answers left first,
		// so that the requests then go out back to back: the kernel passes
		// a burst of packets on with fewer interrupts than the same
		// packets spread out (bench/README.md). The paced loop runs this
		// after every event that came before it: a connection that no
		// event said is readable holds nothing, and is not read.
		for i := range jobs {
			if s := jobs[i].kept; s != nil && s.unread && !s.discardStale() {
				s.drop() // closed by the server while idle: this probe dials
				jobs[i].kept = nil
			}
		}
		for _, j := range jobs {
			pr.connect(j)
		}
	})
}

// close stops the loop and waits for it: probes still in flight end with
// an error (their owner is closing and ignores it), and every socket, idle
// or not, is closed as the loop aborts its registrations.
func (pr *tcpProber) close() {
	pr.p.Stop()
	pr.p.Wait()
	pr.idle = [2][]*probeSocket{}
}

// socket is an idle socket of the family, or a new one, registered.
func (pr *tcpProber) socket(v6 bool) (*probeSocket, error) {
	f := pr.family(v6)
	if n := len(*f); n > 0 {
		s := (*f)[n-1]
		(*f)[n-1] = nil
		*f = (*f)[:n-1]
		return s, nil
	}
	fd, err := sock.Socket(v6)
	if err != nil {
		return nil, err
	}
	s := &probeSocket{pr: pr, v6: v6}
	// Registered once, for the socket's life: every connect it makes
	// ends in an edge of Out (or Err, Hup). Events that come while it is
	// idle, or that an earlier probe left, are told from a probe's end
	// by asking the socket (Ready).
	if err := pr.p.Add(&s.fd, fd, poller.Out|poller.In|poller.RdHup|poller.Edge, s, 0); err != nil {
		return nil, err // Add closed fd
	}
	return s, nil
}

func (pr *tcpProber) family(v6 bool) *[]*probeSocket {
	if v6 {
		return &pr.idle[1]
	}
	return &pr.idle[0]
}

func (pr *tcpProber) connect(j tcpJob) {
	if s := j.kept; s != nil {
		j.kept = nil
		s.resume(j)
		return
	}
	s, err := pr.socket(sock.IPv6(j.addr))
	if err == nil {
		s.unread, s.hup = false, false // a new connection (a late event of the last one's sets them again: a read more)
		if err = sock.ConnectOn(s.fd.Num(), j.addr); err != nil {
			s.drop()
		}
	}
	if err != nil {
		j.done(fmt.Errorf("%s check: dial: %w", j.kind(), err), j.sp, nil)
		return
	}
	// Even a connect that the kernel completed inside connect(2) (a
	// loopback target) ends in an event: the socket is registered.
	s.job, s.steps = j, j.steps
	pr.p.Set(&s.timer, pr.p.Now()+int64(j.timeout), s)
}

// keeps reports whether a probe's connection serves the target's next
// probe, as an http check's does (and Envoy's tcp checks' by default): a
// send_expect exchange the prober opens with a send and closes with an
// expect can be asked again on the same connection. One that starts with
// an expect waits for a greeting, which a server sends once a connection.
func (j *tcpJob) keeps() bool {
	return len(j.steps) > 0 && j.steps[0].send != nil && j.steps[len(j.steps)-1].expect != nil
}

// maxStale bounds what discardStale drops of a kept connection's unread
// bytes (the rest of the last answer) before it asks again.
const maxStale = maxAnswer

// discardStale reads and drops what s, a connection a target's last probe
// kept, holds from before (an event said it is readable): the rest of the
// last answer. It reports false if s is no use: the server closed it while
// it was idle, or sent more than an answer's remainder.
func (s *probeSocket) discardStale() bool {
	for stale := 0; ; {
		n, err := poller.Read(s.fd.Num(), s.pr.buf[:])
		if err == unix.EAGAIN {
			s.unread = false
			return true
		}
		if stale += n; err != nil || n == 0 || stale > maxStale {
			return false
		}
	}
}

// resume runs j on s, the connection the target's last probe kept, once
// discardStale has emptied it.
func (s *probeSocket) resume(j tcpJob) {
	s.job, s.steps, s.connected, s.reused = j, j.steps, true, true
	s.pr.p.Set(&s.timer, s.pr.p.Now()+int64(j.timeout), s)
	s.exchange()
}

// probeSocket is one socket of the prober and the probe it runs, if any.
// It owns its descriptor and registration (closed by drop) and its timer.
// Between two probes it is idle in the prober, or kept by a target
// (kept, which the checker owns and closes through closeKept).
type probeSocket struct {
	pr    *tcpProber
	fd    poller.FD
	timer poller.Timer
	v6    bool
	job   tcpJob // the probe in flight; job.done is nil while idle
	kept  keptConn
	// A send_expect probe's exchange, once connected: the steps left, the
	// bytes of the current send written, what arrived since the last
	// match; whether the connection is a kept one, and whether anything
	// arrived on it in this probe.
	steps     []step
	connected bool
	reused    bool
	answered  bool
	sent      int
	got       []byte
	// What the socket may hold that no edge will announce again: bytes
	// (an event said readable and no read has since found it drained), or
	// the end of the stream (the peer's FIN or an error has been seen on
	// this connection). A probe's reads are made only when unread says
	// there may be something to read, so a probe on a kept connection is
	// a write and the answer's read (bench/README.md).
	unread bool
	hup    bool
}

var errProbeTimeout = fmt.Errorf("dial: %w", os.ErrDeadlineExceeded) // "dial: i/o timeout", as net.Dial says

func (s *probeSocket) Ready(_ uint8, events uint32) {
	if events&(poller.RdHup|poller.Hup|poller.Err) != 0 {
		s.unread, s.hup = true, true
	} else if events&poller.In != 0 {
		s.unread = true
	}
	if s.job.done == nil {
		return // idle: the reset of the last probe's disconnect, or kept
	}
	if s.connected {
		s.exchange() // readable, writable or closed: the exchange says
		return
	}
	// epoll computes events when it reports them: writable and neither
	// hung up nor failed is only ever a connected socket (connecting
	// reports nothing, disconnected Hup), so the connect succeeded.
	if events&(poller.Out|poller.Hup|poller.Err) == poller.Out {
		s.connectedNow()
		return
	}
	// Else the socket says: a connect ends with the socket connected or
	// with its error; an event with neither is an earlier one's (the
	// disconnect, or the registration of a new socket) reported while
	// this connect goes on.
	err := sock.Error(s.fd.Num())
	if err == nil && !sock.Connected(s.fd.Num()) {
		return
	}
	if err != nil {
		s.end(fmt.Errorf("%s check: dial: %w", s.kind(), os.NewSyscallError("connect", err)))
		return
	}
	s.connectedNow()
}

// kind names the check in errors.
func (s *probeSocket) kind() string { return s.job.kind() }

// connectedNow ends a tcp probe, or starts a send_expect probe's steps.
func (s *probeSocket) connectedNow() {
	if s.steps == nil && s.job.req == nil {
		s.end(nil)
		return
	}
	s.connected = true
	s.exchange()
}

// exchange runs the steps as far as the socket allows: a send writes until
// it is all written, an expect reads until what arrived contains it; each
// waits for the next edge when the socket would block.
func (s *probeSocket) exchange() {
	if s.job.req != nil {
		s.exchangeHTTP()
		return
	}
	fd := s.fd.Num()
	for len(s.steps) > 0 {
		st := s.steps[0]
		if st.send != nil {
			n, err := poller.Write(fd, st.send[s.sent:])
			if err == unix.EAGAIN {
				return
			}
			if err != nil {
				s.fail(fmt.Errorf("send_expect check: send %q: %w", excerpt(st.send), os.NewSyscallError("write", err)))
				return
			}
			if s.sent += n; s.sent == len(st.send) {
				s.steps, s.sent = s.steps[1:], 0
			}
			continue
		}
		if i := bytes.Index(s.got, st.expect); i >= 0 {
			s.got = s.got[i+len(st.expect):] // what follows is the next expect's
			s.steps = s.steps[1:]
			continue
		}
		if len(s.got) >= maxAnswer {
			s.end(answeredf("send_expect check: expected %q, got %d bytes without it (%q)", excerpt(st.expect), len(s.got), excerpt(s.got)))
			return
		}
		n, ok, err := s.read()
		switch {
		case !ok:
			return // nothing to read until the next edge
		case err != nil:
			s.fail(s.expectErr(st.expect, os.NewSyscallError("read", err)))
			return
		case n == 0:
			s.fail(s.expectErr(st.expect, io.EOF))
			return
		}
		s.answered = true
		s.got = append(s.got, s.pr.buf[:n]...)
	}
	s.end(nil)
}

// exchangeHTTP writes an http check's request and reads its answer until
// the answer is whole (or the server closed), then judges it.
func (s *probeSocket) exchangeHTTP() {
	fd, sp := s.fd.Num(), s.job.sp
	for s.sent < len(s.job.req) {
		n, err := poller.Write(fd, s.job.req[s.sent:])
		if err == unix.EAGAIN {
			return
		}
		if err != nil {
			s.fail(sp.httpErr(os.NewSyscallError("write", err)))
			return
		}
		s.sent += n
	}
	for {
		n, ok, err := s.read()
		switch {
		case !ok:
			return // nothing to read until the next edge
		case err != nil:
			s.fail(sp.httpErr(os.NewSyscallError("read", err)))
			return
		case n == 0 && len(s.got) == 0:
			s.fail(sp.httpErr(io.EOF))
			return
		}
		s.answered = true
		s.got = append(s.got, s.pr.buf[:n]...)
		if done, whole, err := sp.httpAnswer(s.got, n == 0, &s.pr.ar); done {
			s.finish(err, err == nil && whole)
			return
		}
	}
}

// read reads what has arrived into the loop's buffer; ok is false when
// nothing has (the socket would block, or no event said it is readable
// since a read drained it). A read shorter than the buffer drained the
// socket, as nginx's recv takes it: what arrives after it is a new edge.
// With the end of the stream seen, the socket is read until it says so.
func (s *probeSocket) read() (n int, ok bool, err error) {
	if !s.unread {
		return 0, false, nil
	}
	n, err = poller.Read(s.fd.Num(), s.pr.buf[:])
	switch {
	case err == unix.EAGAIN:
		s.unread = false
		return 0, false, nil
	case err == nil && n > 0 && n < len(s.pr.buf) && !s.hup:
		s.unread = false
	}
	return n, true, err
}

// fail ends the probe with err, unless the connection was a kept one that
// the server closed or reset before answering (it closes idle connections,
// or the answer before was its last): then the probe asks again on a new
// one, as an http check does.
func (s *probeSocket) fail(err error) {
	if !s.reused || s.answered {
		s.end(err)
		return
	}
	j := s.job
	s.job = tcpJob{}
	s.reset()
	s.drop()
	s.pr.connect(j)
}

// expectErr says what an expect got instead, and why it got no more.
func (s *probeSocket) expectErr(expect []byte, why error) error {
	if len(s.got) == 0 {
		return fmt.Errorf("send_expect check: expected %q: %w", excerpt(expect), why)
	}
	return answeredf("send_expect check: expected %q, got %q (%v)", excerpt(expect), excerpt(s.got), why)
}

func (s *probeSocket) Expired() {
	if s.connected && s.job.req != nil {
		s.end(s.job.sp.httpErr(os.ErrDeadlineExceeded))
		return
	}
	if s.connected && len(s.steps) > 0 && s.steps[0].expect != nil {
		s.end(s.expectErr(s.steps[0].expect, os.ErrDeadlineExceeded))
		return
	}
	s.end(fmt.Errorf("%s check: %w", s.kind(), errProbeTimeout))
}

// Abort closes the socket instead of keeping it: its state is unknown.
func (s *probeSocket) Abort(cause any) {
	j, kind := s.job, s.kind()
	s.job = tcpJob{}
	s.reset()
	s.drop()
	if j.done != nil {
		j.done(fmt.Errorf("%s check: %v", kind, cause), j.sp, nil)
	}
}

// reset forgets the probe's exchange.
func (s *probeSocket) reset() {
	s.steps, s.connected, s.reused, s.answered, s.sent, s.got = nil, false, false, false, 0, nil
}

// end reports the probe's result; a send_expect connection that passed,
// and can ask again, is kept.
func (s *probeSocket) end(err error) {
	s.finish(err, err == nil && s.connected && s.job.keeps())
}

// finish reports the probe's result. A connection to keep is handed to
// the target for its next probe; otherwise the socket is idle again, reset
// and disconnected, or closed if enough are idle.
func (s *probeSocket) finish(err error, keep bool) {
	j := s.job
	s.job = tcpJob{}
	s.reset()
	s.pr.p.Cancel(&s.timer)
	if keep {
		s.kept = keptConn{loop: s}
		j.done(nil, j.sp, &s.kept)
		return
	}
	f := s.pr.family(s.v6)
	if len(*f) < maxIdleSockets && sock.Disconnect(s.fd.Num()) == nil {
		*f = append(*f, s)
	} else {
		s.drop()
	}
	j.done(err, j.sp, nil)
}

// closeKept closes s, kept by a target that no longer wants it: on the
// loop, which owns the descriptor (a prober that stopped closed it).
func (s *probeSocket) closeKept() {
	s.pr.p.Post(s.drop)
}

// drop closes the socket with a reset.
func (s *probeSocket) drop() {
	s.pr.p.Cancel(&s.timer)
	if s.fd.Valid() {
		sock.ResetOnClose(s.fd.Num())
		s.pr.p.Close(&s.fd)
	}
}
