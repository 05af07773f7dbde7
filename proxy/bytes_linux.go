package proxy

// A connection's bytes in the relay loops: read and write through the
// loop's buffer, splice through a lent pipe for bulk, the FIN passed on
// once everything before it went, and what a winding-down side still sends.

import (
	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/internal/neterr"
	"github.com/rota-proxy/rota/internal/poller"
	"github.com/rota-proxy/rota/internal/sock"
	"github.com/rota-proxy/rota/proxy/internal/relay"
)

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
		c.finish(false, accesslog.NotEnded, nil)
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
	more := c.move(src, dst, toTarget)
	if dst.held {
		// The machine asks for the FIN at src's EOF once it forwarded
		// src's bytes, and move takes a drained side's EOF in the same
		// call; should that ever change, the held bytes go now rather
		// than wait for an ACK that nothing in flight would bring.
		dst.held = false
		if !c.done {
			sock.SetNoDelay(dst.fd.Num()) // pushes what the socket holds
			dst.nagle = nagleSet
		}
	}
	return more
}

// move is flow's loop.
func (c *conn) move(src, dst *side, toTarget bool) bool {
	for start := src.moved; ; {
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
		if src.moved-start >= turnBytes && !src.drained {
			return true // (a drained side's EOF costs no read: take it now)
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
			c.finish(false, c.resetOf(s), err)
		case n == 0:
			s.in, s.dropping = false, false
		}
	}
}

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
	dst.held = false // the FIN takes the held bytes with it
	if dst.eof && src.shut && !c.m.Winding() {
		return // both directions are done: closing sends the FIN
	}
	if err := shutdownWrite(dst.fd.Num()); err != nil && err != errENOTCONN {
		c.finish(false, c.resetOf(dst), err)
	}
}

// flush writes what is queued for dst: toward the target, the machine's
// pending bytes first. It reports whether the queue is empty.
func (c *conn) flush(dst *side, toTarget bool) bool {
	if toTarget {
		for p := c.m.Pending(); len(p) > 0; p = c.m.Pending() {
			c.noDelayBefore(dst, len(p))
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
		c.noDelayBefore(dst, len(p)-dst.off)
		n, err := poller.Write(dst.fd.Num(), p[dst.off:])
		if err == errEAGAIN {
			c.wantOut(dst)
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
	c.finish(false, c.resetOf(sideTo(c, toTarget)), err)
	return false
}

// write writes data to dst, keeping what the socket does not take. last
// says src's FIN follows data: the socket may hold data back for it (held).
func (c *conn) write(dst *side, data []byte, toTarget, last bool) bool {
	for len(data) > 0 {
		c.noDelayBefore(dst, len(data))
		var n int
		var err error
		if last {
			n, err = poller.WriteMore(dst.fd.Num(), data)
		} else {
			n, err = poller.Write(dst.fd.Num(), data)
		}
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
		c.wantOut(dst)
		return !c.done
	}
	dst.held = last
	return true
}

// A target's socket gets TCP_NODELAY only before a write that Nagle's
// algorithm could hold back: one while data may be unacknowledged (a
// second write), or a first one longer than the smallest segment (its
// tail would wait for the ACK of its head). The first write of a socket
// with nothing in flight goes out at once either way, so a connection
// that writes its target once (a request, then the answer and the close)
// saves the setsockopt, one of its 15 system calls (bench/README.md).
const (
	nagleSet   = iota // TCP_NODELAY set, or inherited (a client's)
	nagleFresh        // nothing written yet
	nagleOnce         // one small write made
)

// minSegment is the smallest MSS a path may have (IPv4's default, RFC
// 1122): a write no longer is one segment.
const minSegment = 536

// noDelayBefore sets TCP_NODELAY on dst before a write of n bytes that
// Nagle's algorithm could delay.
func (c *conn) noDelayBefore(dst *side, n int) {
	switch {
	case dst.nagle == nagleSet:
	case dst.nagle == nagleFresh && n <= minSegment:
		dst.nagle = nagleOnce
	default:
		sock.SetNoDelay(dst.fd.Num())
		dst.nagle = nagleSet
	}
}

// wantOut registers dst for Out, once: a write to it blocked, and only its
// Out edge says when it takes more. When it cannot, it ends c.
func (c *conn) wantOut(dst *side) {
	if dst.out {
		return
	}
	dst.out = true
	if err := c.l.p.Modify(&dst.fd, connEvents); err != nil {
		c.finish(false, c.resetOf(dst), err)
	}
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
	var n int
	var err error
	if !src.drained {
		n, err = poller.Read(src.fd.Num(), buf)
	} // else at its FIN: the read would return 0
	now := c.l.p.Now()
	if stop, ok := c.took(src, n, err, toTarget, now); stop {
		return ok
	}
	src.moved += uint64(n)
	switch {
	case n == len(buf):
	case src.fin:
		// The FIN came before this read, which took everything before
		// it: the next read would return 0, and needs no system call.
		src.drained = true
	case !src.hup:
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
		// src.drained: src's FIN is next, and passing it on follows this
		// write (one segment for both, as HAProxy sends them).
		if !c.write(dst, data, toTarget, src.drained) {
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
	// (EAGAIN: the pipe was empty, so it is the socket that is.)
	n, err := splice(src.fd.Num(), src.pipe.w, turnBytes)
	now := c.l.p.Now()
	if stop, ok := c.took(src, n, err, toTarget, now); stop {
		return ok
	}
	src.pipe.n = n
	src.moved += uint64(n)
	c.m.Spliced(toTarget, n, now)
	return true
}

// took handles what a read or a splice from src said besides bytes: the
// socket has none now (EAGAIN), an error (a target's reset is the
// machine's to judge), or the side's FIN. stop: it was one of those, and
// ok says whether the flow goes on.
func (c *conn) took(src *side, n int, err error, toTarget bool, now int64) (stop, ok bool) {
	switch {
	case err == errEAGAIN:
		src.in = false
		return true, true
	case err != nil:
		if !toTarget && neterr.IsReset(err) {
			c.run(c.m.TargetReset(err, now))
			return true, false
		}
		c.finish(false, c.resetOf(src), err)
		return true, false
	case n == 0:
		src.in, src.eof = false, true
		if toTarget {
			return true, c.act(c.m.ClientEOF())
		}
		return true, c.act(c.m.TargetEOF(now))
	}
	return false, true
}

// pump splices src's pipe into dst and reports whether it emptied.
func (c *conn) pump(src, dst *side, toTarget bool) bool {
	for src.pipe.n > 0 {
		c.noDelayBefore(dst, src.pipe.n)
		n, err := splice(src.pipe.r, dst.fd.Num(), src.pipe.n)
		switch {
		case err == errEAGAIN:
			c.wantOut(dst) // dst is full; its Out edge resumes
			return false
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

// resetOf is the termination of an I/O failure on side s.
func (c *conn) resetOf(s *side) accesslog.Termination {
	if s == &c.c {
		return accesslog.ClientReset
	}
	return accesslog.TargetReset
}

// sideTo is the side bytes go to: the target's when toTarget.
func sideTo(c *conn, toTarget bool) *side {
	if toTarget {
		return &c.t
	}
	return &c.c
}
