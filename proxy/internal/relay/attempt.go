package relay

// Attempts: the targets tried in turn, the dial, and the window in which a
// target that closes or resets is replaced by the next one.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/balancer"
)

// ReplayLimit bounds the client bytes kept for replay: past it, the window
// closes as if the target had answered.
const ReplayLimit = 16 << 10

// DyingWindow is how soon after its connect a target that closes or resets
// before any client byte reached it is taken for a dying instance: the
// kernel resetting its accept queue as the process exits, or the process
// killed between accept and read. Such a target is reported to health
// checking and the next one is tried. Later, the same close is the
// target's own answer to a client that stayed silent (a server's header or
// idle timeout: nginx client_header_timeout, Go's ReadHeaderTimeout, Redis
// timeout, PostgreSQL authentication_timeout, the shortest of which is 1 s):
// it is passed to the client and health checks alone judge the target.
const DyingWindow = 250 * time.Millisecond

// ResetGrace is how long a target that closed cleanly after taking client
// bytes is watched for the reset its kernel sends when those bytes arrived
// after it closed unread (a process killed between accept and read), with
// ReplayOnReset on. A reset means the bytes were never read: they go to the
// next target. No reset: the close was the target's answer.
const ResetGrace = 50 * time.Millisecond

// pick starts the attempts: the picker's cursor, 1 + Retries targets at most.
// While connections queue for a place, a newcomer queues behind them.
func (c *Conn) pick(now int64) Action {
	c.cursor = c.picker.PickFor(c.Src.Addr(), c.Hello())
	if g := c.cursor.Gate(); g != nil {
		c.seen = g.Seq()
		if g.Queueing() && (c.x == nil || !c.x.woken) {
			return c.queue(now)
		}
	}
	// (Retries is bounded by the config; min first, so no value wraps.)
	c.tries = int32(min(max(c.cfg.Retries, 0), c.cursor.Len()-1) + 1)
	return c.next(now, nil)
}

// queue makes c wait for a place (see Queue).
func (c *Conn) queue(now int64) Action {
	x := c.more()
	if c.state != Queued && !x.woken {
		x.queuedAt = now
	}
	c.state = Queued
	c.due = deadline(x.queuedAt, c.cursor.Gate().Timeout())
	return Queue
}

// Enqueue puts c in its pool's queue, to be woken by wake (which must not
// block, and must not call c: it tells c's owner to call Dequeued). A
// full queue refuses c.
func (c *Conn) Enqueue(wake func()) Action {
	if c.state != Queued {
		panic("relay: Enqueue in state " + c.state.String())
	}
	if !c.cursor.Gate().Enter(&c.x.waiter, wake, c.x.queuedAt, c.x.woken, c.seen) {
		c.state = New // out of the queue: close settles nothing of it
		c.ended(accesslog.MaxConns)
		c.Err = ErrQueueFull
		return c.end(Close)
	}
	return Continue
}

// Dequeued is c's wake-up from the queue: it picks again, ahead of any
// newcomer, and queues again (first) if every target is still at its cap.
func (c *Conn) Dequeued(now int64) Action {
	if c.state != Queued {
		return Continue
	}
	g := c.cursor.Gate()
	if !g.Woke(&c.x.waiter) {
		return Continue // a wake-up for a wait that ended
	}
	c.x.woken = true
	c.state = New
	a := c.pick(now)
	g.Picked(&c.x.waiter)
	if a != Queue {
		g.Wait.Observe(time.Duration(now - c.x.queuedAt))
	}
	return a
}

// next moves to the next target of the cursor, or gives up.
func (c *Conn) next(now int64, lastErr error) Action {
	if c.target != nil {
		c.cursor.Release(c.target) // its attempt is over
		if c.cursor.Gate() != nil {
			c.seen++ // that release was c's own: not a place to wait for
		}
	}
	c.target, c.connected = nil, false
	if c.closing {
		c.ended(accesslog.Shutdown)
		c.Err = lastErr
		return c.end(Close)
	}
	if c.tries > 0 {
		if t := c.cursor.Next(); t != nil {
			c.tries--
			c.target = t
			c.state = Dialing
			c.due = deadline(now, c.cfg.DialTimeout)
			c.sent = 0
			if c.x != nil {
				c.x.hdrSent = 0
			}
			c.resetOnWrite, c.spoke, c.lingering = false, false, false
			c.retireAt, c.retireWhy = 0, balancer.Kept // that was the last target's
			return Dial
		}
		if c.cursor.Full() {
			return c.queue(now)
		}
	}
	c.stats.NoTarget.Add(1)
	if lastErr == nil {
		c.ended(accesslog.NoLiveTarget)
		c.Err = ErrNoTarget
	} else {
		c.ended(accesslog.DialFailed)
		c.Err = fmt.Errorf("all attempts failed, last: %w", lastErr)
	}
	return c.end(Refused)
}

// DialTimeout is the time an attempt may take; 0: no bound.
func (c *Conn) DialTimeout() time.Duration { return c.cfg.DialTimeout }

// Dialed reports that the connection to Target() is established. The driver
// then writes Pending() (the PROXY header and any bytes held) before
// anything else.
func (c *Conn) Dialed(now int64) Action {
	if c.state != Dialing {
		panic("relay: Dialed in state " + c.state.String())
	}
	t := c.target
	t.AddActive(1)
	t.Total.Add(1)
	c.state, c.connected = Open, true
	c.last = now
	c.due = now + int64(DyingWindow)
	if c.cfg.ProxyProtocol != 0 && (c.x == nil || c.x.hdr == nil) {
		h := proxyproto.HeaderProxyFromAddrs(byte(c.cfg.ProxyProtocol), net.TCPAddrFromAddrPort(c.Src), net.TCPAddrFromAddrPort(c.Dst))
		b, err := h.Format()
		if err != nil {
			return c.close(fmt.Errorf("PROXY header: %w", err))
		}
		c.more().hdr = b
	}
	if c.clientEOF {
		return ShutTarget // after Pending, like every FIN
	}
	return Flush
}

// DialFailed reports that the attempt on Target() failed; the next target
// is tried.
func (c *Conn) DialFailed(err error, now int64) Action {
	t := c.target
	err = fmt.Errorf("%s: %w", t.Addr, err)
	c.fail(t, err)
	return c.next(now, err)
}

// fail counts a failed attempt on t and reports it to health checking,
// unless the failure is the proxy's own (shutting down).
func (c *Conn) fail(t *balancer.Target, err error) {
	if c.closing {
		return
	}
	c.tried(t, err)
	t.DialErrors.Add(1)
	c.stats.DialErrors.Add(1)
	if c.report != nil {
		c.report(t.Addr, err)
	}
}

// TargetEOF reports the target's FIN. A clean close is an answer (the
// target may have acted on the request), so the client gets it; but a
// target that closed within DyingWindow of its connect, before any client
// byte reached it, is a dying instance: the next one is tried. With replay
// on, one that took bytes is watched for a reset first (Linger). After a
// write found the target reset, the FIN is that reset, which Linux reports
// once.
func (c *Conn) TargetEOF(now int64) Action {
	if c.state == Open {
		switch {
		case c.resetOnWrite:
			return c.TargetReset(errEOFAfterReset, now)
		case c.dying(now):
			return c.TargetReset(errClosedUnasked, now)
		case c.spoke && c.mayReplay():
			c.lingering = true
			c.lingerUntil = now + int64(ResetGrace)
			return Linger
		}
	}
	c.commit()
	c.ended(accesslog.TargetClosed)
	return ShutClient
}

// dying reports whether the target's close or reset, now, is a dying
// instance's rather than an answer: it came within DyingWindow of the
// connect, and nothing of the client's reached the target: no byte, and no
// FIN (a FIN goes after everything pending; a close in answer to it is the
// target's answer to a client that left without a word).
func (c *Conn) dying(now int64) bool {
	finSent := c.clientEOF && len(c.Pending()) == 0
	return c.state == Open && !c.spoke && !finSent && now < c.due
}

// mayReplay reports whether the client's bytes may go to another target
// should this one reset: replay is on and has not been used. One replay a
// connection: a request that makes every target reset (a query of death)
// reaches two targets, not the whole fleet.
func (c *Conn) mayReplay() bool { return c.cfg.ReplayOnReset && !c.replayed }

// Lingering reports whether c waits to learn whether its target reset.
func (c *Conn) Lingering() bool { return c.lingering }

// Settled ends a Linger: reset says the target's socket reported a reset.
func (c *Conn) Settled(reset bool, now int64) Action {
	if !c.lingering {
		return Continue
	}
	c.lingering = false
	if reset {
		return c.TargetReset(errResetAfterFIN, now)
	}
	c.commit()
	c.ended(accesslog.TargetClosed)
	return ShutClient
}

// WriteReset reports that a write to the target found it reset. Before
// the window closes the driver keeps reading the target, which ends the
// attempt (TargetEOF or TargetReset); after, the client sees the reset.
func (c *Conn) WriteReset(err error) Action {
	if c.state == Open {
		c.resetOnWrite = true
		return Continue
	}
	return c.reset(err)
}

// TargetReset reports that the target reset the connection. A dying
// instance's reset (see dying) is reported and the next target dialled
// (the bytes held are sent to it); with replay on, a reset after the target
// took client bytes but before its first byte replays them to the next
// target once, reporting nothing: the data path cannot tell a dead target
// from a request it refused, so only health checks judge it. Otherwise the
// client sees the reset.
func (c *Conn) TargetReset(err error, now int64) Action {
	c.lingering = false
	t := c.target
	switch {
	case c.dying(now):
		err = fmt.Errorf("%s: reset before it was asked anything: %w", t.Addr, err)
		t.AddActive(-1)
		c.fail(t, err)
		return c.next(now, err)
	case c.state == Open && c.spoke && c.mayReplay():
		c.replayed = true
		c.tried(t, err)
		err = fmt.Errorf("%s: reset before its first byte: %w", t.Addr, err)
		t.AddActive(-1)
		c.stats.Replays.Add(1)
		return c.next(now, err)
	}
	c.commit()
	return c.reset(err)
}

func (c *Conn) reset(err error) Action {
	c.ended(accesslog.TargetReset)
	c.close(err)
	return Reset
}

// The failures the machine names itself.
var (
	errEOFAfterReset = errors.New("EOF after a reset")
	errClosedUnasked = errors.New("closed before it was asked anything")
	errResetAfterFIN = errors.New("reset after its FIN")
	errDialTimeout   = errors.New("dial timeout")
)

// tried notes that t was tried and why it failed, for the access log.
func (c *Conn) tried(t *balancer.Target, err error) {
	x := c.more()
	if x.ntried < accesslog.MaxTries {
		x.tried[x.ntried] = accesslog.Try{Target: t.Addr, Why: why(err)}
	}
	x.ntried++
}

// why names the failure of an attempt in a word.
func why(err error) string {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, errDialTimeout), errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return "unreachable"
	case errors.Is(err, errClosedUnasked):
		return "closed"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), errors.Is(err, errResetAfterFIN), errors.Is(err, errEOFAfterReset):
		return "reset"
	}
	return "error"
}
