//go:build linux

package proxy

import (
	"context"
	"errors"
	"sync"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/accesslog"
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

// A client's socket is registered without Out: its send buffer has room
// for what a connection usually writes, and each change of the socket's
// state (our shutdown, the client's ACK of that FIN) makes the kernel poll
// it again, find it writable and, with Out registered, raise an edge that
// wakes the loop for nothing (bench/README.md). Out is added the first
// time a write to it would block (wantOut). A target's registration has
// Out from the start, which tells its connect is done.
const (
	connEvents   = poller.In | poller.Out | poller.RdHup | poller.Edge
	clientEvents = connEvents &^ poller.Out
)

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
	fd  poller.FD
	in  bool // readable: an edge seen and not yet read to the end
	hup bool // the peer closed or errored: read until EOF, not just a short read
	// fin: the peer's FIN was reported (RdHup) and no error: a short read
	// took everything before it, so the side is at its end without
	// another read to say so (fin then drained).
	fin, drained bool
	eof          bool // read EOF from this side
	shut         bool // sent this side a FIN
	out          bool // registered for Out: a write to it blocked once (wantOut), or the target's
	// held: the last bytes written to this side went with MSG_MORE, the
	// other side's FIN being known to follow them: the socket holds them
	// back until that FIN goes (passEOF), so both leave in one segment.
	held bool
	// nagle: how far a target's socket is from needing TCP_NODELAY
	// (noDelayBefore); a client's inherits it from the listener.
	nagle uint8
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
		c.finish(false, accesslog.Shutdown, errors.New("shutting down"))
		return
	}
	if err := l.p.Add(&c.c.fd, c.cfd, clientEvents, c, tagClient); err != nil {
		c.finish(false, accesslog.ClientReset, err)
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
	if ev&poller.RdHup != 0 {
		s.fin = true
	}
	if ev&poller.Err != 0 {
		s.fin = false // a reset: reading says which
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
	c.m.End(accesslog.Panic, errors.New("relay panicked")) // settles the target's count, if it can
	c.p.ended(c.set, &c.m, c.c.moved, c.t.moved, l.p.Clock(), l.id, nil)
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
	case relay.Queue:
		c.enqueue()
		return false
	case relay.Refused:
		c.p.refuse(c.m.Src, c.m.Err)
		c.finish(false, accesslog.NotEnded, nil)
		return false
	case relay.Close:
		c.finish(false, accesslog.NotEnded, nil)
		return false
	case relay.Reset:
		c.finish(true, accesslog.NotEnded, nil)
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

// enqueue puts c in its pool's queue. The wake-up may come from any
// goroutine (a connection of another loop giving back its place, the pool
// publishing a picker): it is posted to c's loop, where Dequeued runs.
func (c *conn) enqueue() {
	l := c.l
	wake := func() {
		l.p.Post(func() {
			l.p.Within(c, func() {
				if !c.done {
					c.run(c.m.Dequeued(l.p.Clock()))
					c.arm()
				}
			})
		})
	}
	if a := c.m.Enqueue(wake); a != relay.Continue {
		c.act(a)
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
func (c *conn) finish(reset bool, t accesslog.Termination, err error) {
	if c.done {
		return
	}
	c.done = true
	c.m.End(t, err)
	c.p.ended(c.set, &c.m, c.c.moved, c.t.moved, c.l.p.Clock(), c.l.id, nil)
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
