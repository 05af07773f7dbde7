//go:build linux

package proxy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"sync"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/internal/neterr"
	"github.com/rota-proxy/rota/internal/poller"
	"github.com/rota-proxy/rota/internal/sock"
	"github.com/rota-proxy/rota/proxy/internal/relay"
)

// Registration tags: which socket of a conn an event is for.
const (
	tagClient uint8 = iota
	tagTarget
)

const connEvents = poller.In | poller.Out | poller.RdHup | poller.Edge

// conn is one client connection relayed by a loop: the client's socket, the
// target's, and the relay state machine that decides what happens to them.
// Everything in it belongs to its loop's goroutine; it owns both
// descriptors (closed only by finish) and any pipe and write buffer it
// holds.
type conn struct {
	m     relay.Conn
	p     *Proxy
	set   *settings
	l     *loop
	conns *sync.WaitGroup // its Serve's
	c, t  side            // client, target
	timer poller.Timer
	// Until start registers it, the client's descriptor. (Its addresses
	// wait in m.Src and m.Dst: an idle connection is this struct, so every
	// word counts.)
	cfd int
	// cancel stops the dial in flight; attempt numbers the dials, so that
	// a late name resolution for an attempt given up is dropped.
	cancel  context.CancelFunc
	attempt uint32
	// The machine asked to pass on a FIN, once the queue is written.
	shutT, shutC bool
	queued       bool // the timer is set to now: more to move after others had a turn
	done         bool
	prev, next   *conn // the loop's list
}

// side is one socket of a conn and the state of reading from it and
// writing to it.
type side struct {
	fd   poller.FD
	in   bool // readable: an edge seen and not yet read to the end
	hup  bool // the peer closed or errored: read until EOF, not just a short read
	eof  bool // read EOF from this side
	shut bool // sent this side a FIN
	// dropping: winding down, this side had nothing more to send when it
	// was sent a FIN (eof is set as if it had sent one); what it sends
	// from here on is read and dropped until it closes, so that closing
	// our end resets nothing it still has in flight.
	dropping bool
	// windMark: winding down, the count of bytes read from this side
	// (moved) by which it has sent everything it had sent when the
	// wind-down began.
	windMark uint64
	pend     *[]byte // bytes waiting to be written to this side
	off      int     // first unwritten byte of pend
	// A pipe from the loop's pool while this side sends a bulk transfer:
	// its bytes go to the other side by splice(2), never through user
	// space. Returned when the transfer pauses.
	pipe  *pipe
	moved uint64 // bytes read from this side
}

func (l *loop) link(c *conn) {
	c.next = l.conns.next
	if c.next != nil {
		c.next.prev = c
	}
	c.prev = &l.conns
	l.conns.next = c
}

func (l *loop) unlink(c *conn) {
	c.prev.next = c.next
	if c.next != nil {
		c.next.prev = c.prev
	}
	c.prev, c.next = nil, nil
}

// start takes on c, an admitted client, on loop l. A panic in it is c's:
// c is aborted and l goes on (whether it accepted c or was posted it).
func (l *loop) start(c *conn) {
	c.l = l
	l.link(c)
	l.p.Within(c, func() { l.startLinked(c) })
}

func (l *loop) startLinked(c *conn) {
	now := l.p.Clock()
	c.m.Init(&c.set.relay, &c.p.Stats.Stats, c.p.ReportFailure, c.m.Src, c.m.Dst, now)
	if c.p.aborting.Load() {
		sock.Close(c.cfd)
		c.finish(false, errors.New("shutting down"))
		return
	}
	if err := l.p.Add(&c.c.fd, c.cfd, connEvents, c, tagClient); err != nil {
		c.finish(false, err)
		return
	}
	c.run(c.m.Start(now))
	c.arm()
}

// Ready handles events on one of c's sockets.
func (c *conn) Ready(tag uint8, ev uint32) {
	if c.done {
		return
	}
	s := &c.c
	if tag == tagTarget {
		s = &c.t
	}
	if ev&(poller.In|poller.RdHup|poller.Hup|poller.Err) != 0 {
		s.in = true
	}
	if ev&(poller.RdHup|poller.Hup|poller.Err) != 0 {
		s.hup = true
	}
	switch {
	case c.m.Lingering():
		// Waiting to learn whether the target closed or reset.
		if tag == tagTarget && ev&(poller.Err|poller.Hup) != 0 && c.targetReset() {
			c.run(c.m.Settled(true, c.l.p.Now()))
		}
	case c.m.State() == relay.Prelude:
		if tag == tagClient {
			c.readPrelude()
		}
	case c.m.State() == relay.Dialing:
		if tag == tagTarget {
			c.connected(ev)
		}
	default:
		c.step()
	}
	c.arm()
}

// targetReset reports whether the target's socket has a reset pending.
func (c *conn) targetReset() bool {
	return c.t.fd.Valid() && neterr.IsReset(sock.Error(c.t.fd.Num()))
}

// Expired runs when c's timer comes due: a deadline of the machine's, or
// a turn after others when c stopped at the spin limit.
func (c *conn) Expired() {
	if c.done {
		return
	}
	c.queued = false
	if a := c.m.Expired(c.l.p.Now()); a != relay.Continue {
		c.run(a)
	} else {
		c.step()
	}
	c.arm()
}

// Abort closes c after relaying it panicked. Its state is not trusted:
// the descriptors are closed and the connection released first.
func (c *conn) Abort(cause any) {
	if c.done {
		return
	}
	c.done = true
	c.p.Stats.Panics.Add(1)
	l := c.l
	l.p.Cancel(&c.timer)
	if c.cancel != nil {
		c.cancel()
	}
	l.p.Close(&c.t.fd)
	if c.c.fd.Valid() {
		l.p.Close(&c.c.fd)
	} else {
		sock.Close(c.cfd) // not registered yet: start panicked first
	}
	for _, s := range []*side{&c.c, &c.t} {
		if s.pipe != nil {
			l.closePipe(s.pipe)
			s.pipe = nil
		}
	}
	l.unlink(c)
	c.p.release(c.conns)
	c.m.Close(errors.New("relay panicked")) // settles the target's count, if it can
}

// arm sets c's timer for the machine's next deadline. A deadline that moved
// later (traffic on an idle timeout) leaves the timer early: Expired then
// finds nothing due and arms it again.
func (c *conn) arm() {
	if c.done || c.queued {
		return
	}
	d := c.m.Deadline()
	when, armed := c.timer.Armed()
	switch {
	case d == 0:
		if armed {
			c.l.p.Cancel(&c.timer)
		}
	case !armed || d < when:
		c.l.p.Set(&c.timer, d, c)
	}
}

// run carries out a, then relays whatever can move.
func (c *conn) run(a relay.Action) {
	if c.act(a) {
		c.step()
	}
}

// act carries out a and reports whether relaying goes on.
func (c *conn) act(a relay.Action) bool {
	switch a {
	case relay.Dial:
		c.dial()
		return false
	case relay.Refused:
		c.p.refuse(c.m.Src, c.m.Err)
		c.finish(false, nil)
		return false
	case relay.Close:
		c.finish(false, nil)
		return false
	case relay.Reset:
		c.finish(true, nil)
		return false
	case relay.ReadPrelude, relay.Linger:
		return false
	case relay.Settle:
		c.run(c.m.Settled(c.targetReset(), c.l.p.Now()))
		return false
	case relay.ShutTarget:
		c.shutT = true
	case relay.ShutClient:
		c.shutC = true
	case relay.WindDown:
		// Read each side to the end of what it has sent so far (flow
		// then sends the other a FIN once it has it all). Not further:
		// a side that never stops sending would never be wound down.
		for _, s := range []*side{&c.c, &c.t} {
			if !s.eof {
				s.in = true
				s.windMark = s.moved + uint64(unreadFD(s.fd.Num()))
			}
		}
	}
	return !c.done
}

// readPrelude reads what the client sends first until the machine has it.
func (c *conn) readPrelude() {
	for !c.done && c.m.State() == relay.Prelude && c.c.in {
		n, err := poller.Read(c.c.fd.Num(), c.l.buf)
		switch {
		case err == errEAGAIN:
			c.c.in = false
		case err != nil:
			c.finish(false, err)
		case n == 0:
			c.c.in = false
			c.run(c.m.PreludeEOF())
		default:
			c.run(c.m.Prelude(c.l.buf[:n], c.l.p.Now()))
		}
	}
}

// dial connects to the machine's target: by the loop (a non-blocking
// connect whose completion is an epoll event) for an address, after a
// goroutine resolved it for a name.
func (c *conn) dial() {
	c.dropTarget()
	c.attempt++
	t := c.m.Target()
	ap := t.AddrPort
	if !ap.IsValid() {
		c.resolve(t.Addr)
		return
	}
	c.connect(ap)
}

func (c *conn) connect(ap netip.AddrPort) {
	fd, err := startConnect(ap)
	if err == nil {
		err = c.l.p.Add(&c.t.fd, fd, connEvents, c, tagTarget)
	}
	if err != nil {
		c.run(c.m.DialFailed(err, c.l.p.Now()))
	}
}

// resolve looks a target's name up in a goroutine (the resolver may block),
// which then hands the address to the loop. It holds no descriptor.
func (c *conn) resolve(addr string) {
	host, portStr, err := net.SplitHostPort(addr)
	port, perr := strconv.ParseUint(portStr, 10, 16)
	if err != nil || perr != nil {
		c.run(c.m.DialFailed(errors.Join(err, perr), c.l.p.Now()))
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	if d := c.m.DialTimeout(); d > 0 { // 0: no bound
		ctx, cancel = context.WithTimeout(context.Background(), d)
	}
	c.cancel = cancel
	attempt, l := c.attempt, c.l
	go func() {
		ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		cancel()
		l.p.Post(func() { c.resolved(attempt, ips, uint16(port), err) })
	}()
}

func (c *conn) resolved(attempt uint32, ips []netip.Addr, port uint16, err error) {
	if c.done || attempt != c.attempt || c.m.State() != relay.Dialing {
		return
	}
	c.cancel = nil
	if err == nil && len(ips) == 0 {
		err = errors.New("no address")
	}
	if err != nil {
		c.run(c.m.DialFailed(err, c.l.p.Now()))
	} else {
		c.connect(netip.AddrPortFrom(ips[0].Unmap(), port))
	}
	c.arm()
}

// connected handles an event on a connecting target: the connect finished,
// one way or the other.
func (c *conn) connected(ev uint32) {
	if !c.t.fd.Valid() {
		return // resolving
	}
	if ev&(poller.Err|poller.Hup) != 0 {
		if err := sock.Error(c.t.fd.Num()); err != nil {
			c.run(c.m.DialFailed(err, c.l.p.Now()))
			return
		}
	}
	if ev&(poller.Out|poller.Err|poller.Hup) == 0 {
		return
	}
	c.p.served()
	c.run(c.m.Dialed(c.l.p.Now()))
}

// step moves whatever can move in both directions.
func (c *conn) step() {
	if c.done || !c.m.Connected() || c.m.Lingering() {
		return
	}
	more := c.flow(&c.c, &c.t, true)
	if c.done || !c.m.Connected() || c.m.Lingering() {
		return
	}
	more = c.flow(&c.t, &c.c, false) || more
	if c.done || !c.m.Connected() || c.m.Lingering() {
		return
	}
	if c.m.Winding() {
		c.drop(&c.c)
		c.drop(&c.t)
		if c.done {
			return
		}
	}
	if c.c.eof && c.t.eof && c.c.shut && c.t.shut && !c.c.dropping && !c.t.dropping {
		c.finish(false, nil)
		return
	}
	if more && !c.queued {
		c.queued = true
		c.l.p.Set(&c.timer, c.l.p.Now(), c)
	}
}

// flow copies src to dst until src has nothing more, dst takes no more, or
// the spin limit; it reports whether it stopped at the limit. toTarget says
// src is the client.
func (c *conn) flow(src, dst *side, toTarget bool) bool {
	for start := c.moved(src); ; {
		if !c.flush(dst, toTarget) {
			return false
		}
		if src.pipe != nil && src.pipe.n > 0 && !c.pump(src, dst, toTarget) {
			return false
		}
		if src.eof {
			c.passEOF(src, dst, toTarget)
			return false
		}
		if c.m.Winding() && (!src.in || src.moved >= src.windMark) {
			// Winding down, and dst has all src had sent: pass dst a
			// FIN as if src had sent one.
			c.putPipe(src)
			src.eof, src.dropping = true, true
			if toTarget {
				c.shutT = true
			} else {
				c.shutC = true
			}
			c.passEOF(src, dst, toTarget)
			return false
		}
		if !src.in {
			c.putPipe(src)
			return false
		}
		if c.moved(src)-start >= turnBytes {
			return true
		}
		if src.pipe != nil {
			if !c.drain(src, toTarget) {
				return false
			}
			continue
		}
		if !c.read(src, dst, toTarget) {
			return false
		}
	}
}

// drop reads and discards what s sends after its wind-down FIN, until it
// closes.
func (c *conn) drop(s *side) {
	for s.dropping && s.in && !c.done {
		n, err := poller.Read(s.fd.Num(), c.l.buf)
		switch {
		case err == errEAGAIN:
			s.in = false
		case err != nil:
			c.finish(false, err)
		case n == 0:
			s.in, s.dropping = false, false
		}
	}
}

// moved is how many bytes have come from src, for turn budgets.
func (c *conn) moved(src *side) uint64 { return src.moved }

// passEOF sends dst the FIN the machine asked for, once dst has everything.
func (c *conn) passEOF(src, dst *side, toTarget bool) {
	due := c.shutC
	if toTarget {
		due = c.shutT
	}
	if !due || dst.shut {
		return
	}
	dst.shut = true
	if dst.eof && src.shut && !c.m.Winding() {
		return // both directions are done: closing sends the FIN
	}
	if err := shutdownWrite(dst.fd.Num()); err != nil && err != errENOTCONN {
		c.finish(false, err)
	}
}

// flush writes what is queued for dst: toward the target, the machine's
// pending bytes first. It reports whether the queue is empty.
func (c *conn) flush(dst *side, toTarget bool) bool {
	if toTarget {
		for p := c.m.Pending(); len(p) > 0; p = c.m.Pending() {
			n, err := poller.Write(dst.fd.Num(), p)
			if err == errEAGAIN {
				return false
			}
			if err != nil {
				return c.writeFailed(err, toTarget)
			}
			c.m.Wrote(n)
		}
	}
	if dst.pend == nil {
		return true
	}
	p := *dst.pend
	for dst.off < len(p) {
		n, err := poller.Write(dst.fd.Num(), p[dst.off:])
		if err == errEAGAIN {
			return false
		}
		if err != nil {
			return c.writeFailed(err, toTarget)
		}
		dst.off += n
	}
	putPend(dst)
	return true
}

// writeFailed handles a failed write; it returns false (stop this
// direction).
func (c *conn) writeFailed(err error, toTarget bool) bool {
	if toTarget && neterr.IsReset(err) {
		// Inside the window the target's read decides what follows.
		c.act(c.m.WriteReset(err))
		return false
	}
	c.finish(false, err)
	return false
}

// write writes data to dst, keeping what the socket does not take.
func (c *conn) write(dst *side, data []byte, toTarget bool) bool {
	for len(data) > 0 {
		n, err := poller.Write(dst.fd.Num(), data)
		if err == errEAGAIN {
			break
		}
		if err != nil {
			return c.writeFailed(err, toTarget)
		}
		data = data[n:]
	}
	if len(data) > 0 {
		bp := pendPool.Get().(*[]byte)
		*bp = append((*bp)[:0], data...)
		dst.pend, dst.off = bp, 0
	}
	return true
}

func putPend(s *side) {
	if s.pend != nil {
		*s.pend = (*s.pend)[:0]
		pendPool.Put(s.pend)
		s.pend, s.off = nil, 0
	}
}

// read reads src once and hands the bytes on as the machine says. It
// reports whether the flow goes on.
func (c *conn) read(src, dst *side, toTarget bool) bool {
	buf := c.l.buf
	n, err := poller.Read(src.fd.Num(), buf)
	now := c.l.p.Now()
	switch {
	case err == errEAGAIN:
		src.in = false
		return true
	case err != nil:
		if !toTarget && neterr.IsReset(err) {
			c.run(c.m.TargetReset(err, now))
			return false
		}
		c.finish(false, err)
		return false
	case n == 0:
		src.in, src.eof = false, true
		if toTarget {
			return c.act(c.m.ClientEOF())
		}
		return c.act(c.m.TargetEOF(now))
	}
	src.moved += uint64(n)
	if n < len(buf) && !src.hup {
		// Edge-triggered: bytes arriving after this read raise a new edge.
		src.in = false
	}
	data := buf[:n]
	var a relay.Action
	if toTarget {
		a = c.m.FromClient(data, now)
	} else {
		a = c.m.FromTarget(n, now)
	}
	switch a {
	case relay.Forward:
		if !c.write(dst, data, toTarget) {
			return false
		}
		if n == len(buf) && c.m.Committed() {
			// A full read: a bulk transfer. The rest goes by splice.
			// (Small messages stay with read and write, which beat a
			// pipe's round trip.)
			src.pipe = c.l.getPipe()
		}
		return true
	case relay.Flush:
		return true // queued in the machine: flush writes it
	}
	return c.act(a)
}

// drain splices what src has into its empty pipe.
func (c *conn) drain(src *side, toTarget bool) bool {
	n, err := splice(src.fd.Num(), src.pipe.w, turnBytes)
	switch {
	case err == errEAGAIN:
		src.in = false // the pipe was empty, so it is the socket
		return true
	case err != nil:
		if !toTarget && neterr.IsReset(err) {
			c.run(c.m.TargetReset(err, c.l.p.Now()))
			return false
		}
		c.finish(false, err)
		return false
	case n == 0:
		src.in, src.eof = false, true
		if toTarget {
			return c.act(c.m.ClientEOF())
		}
		return c.act(c.m.TargetEOF(c.l.p.Now()))
	}
	src.pipe.n = n
	src.moved += uint64(n)
	c.m.Spliced(toTarget, n, c.l.p.Now())
	return true
}

// pump splices src's pipe into dst and reports whether it emptied.
func (c *conn) pump(src, dst *side, toTarget bool) bool {
	for src.pipe.n > 0 {
		n, err := splice(src.pipe.r, dst.fd.Num(), src.pipe.n)
		switch {
		case err == errEAGAIN:
			return false // dst is full; its EPOLLOUT edge resumes
		case err != nil:
			return c.writeFailed(err, toTarget)
		}
		src.pipe.n -= n
	}
	return true
}

// putPipe returns src's pipe to the loop once the transfer pauses.
func (c *conn) putPipe(src *side) {
	if src.pipe != nil && src.pipe.n == 0 {
		c.l.putPipe(src.pipe)
		src.pipe = nil
	}
}

// dropSide closes s and lets go of what it holds.
func (c *conn) dropSide(s *side) {
	c.l.p.Close(&s.fd)
	putPend(s)
	if s.pipe != nil {
		if s.pipe.n == 0 {
			c.l.putPipe(s.pipe)
		} else {
			c.l.closePipe(s.pipe)
		}
	}
	*s = side{}
}

// dropTarget closes the target socket, before a retry or at the end.
func (c *conn) dropTarget() {
	if c.cancel != nil {
		c.cancel()
		c.cancel = nil
	}
	c.dropSide(&c.t)
	c.shutT = false
}

// finish closes c: both sockets (the client's abortively with reset, so
// that it sees the reset its target sent), and releases the connection.
func (c *conn) finish(reset bool, err error) {
	if c.done {
		return
	}
	c.done = true
	c.m.Close(err)
	if c.m.Err != nil {
		c.p.Logger.Debug("connection closed", zap.Stringer("client", c.m.Src), zap.Error(c.m.Err))
	}
	l := c.l
	l.p.Cancel(&c.timer)
	c.queued = false
	c.dropTarget()
	if reset && c.c.fd.Valid() {
		sock.ResetOnClose(c.c.fd.Num())
	}
	c.dropSide(&c.c)
	l.unlink(c)
	c.p.release(c.conns)
}
