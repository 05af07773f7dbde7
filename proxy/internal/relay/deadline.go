package relay

// Deadlines: the prelude's, the dial's, the idle timeout, max_conn_age and
// the wind-downs that retire a connection.

import (
	"fmt"
	"time"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/balancer"
)

// WindLinger bounds a wind-down: after the FIN to both sides, the peers
// are given this long to close their ends (what they send meanwhile is
// read and dropped, so that closing resets nothing in flight); then the
// connection is closed regardless.
const WindLinger = 10 * time.Second

// deadline is the clock reading d after now; 0 (none) when d is 0.
func deadline(now int64, d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return now + int64(d)
}

// Deadline is when Expired must be called next (a reading of the clock), 0
// for never. It may be early: Expired then does nothing.
func (c *Conn) Deadline() int64 {
	switch c.state {
	case Prelude:
		if !c.header {
			return c.due
		}
		return deadline(c.start, c.cfg.ProxyHeaderTimeout)
	case Dialing, Queued:
		return c.due
	case Open, Committed:
		if c.lingering {
			return c.lingerUntil
		}
		if c.winding {
			return c.windUntil
		}
		d := c.expireAt
		if c.retireAt != 0 && (d == 0 || c.retireAt < d) {
			d = c.retireAt
		}
		if t := c.cfg.IdleTimeout; t > 0 && (d == 0 || c.last+int64(t) < d) {
			d = c.last + int64(t)
		}
		return d
	}
	return 0
}

// Expired is called at or after Deadline: a late prelude or dial, an idle
// connection, a wind-down due or overdue. Continue when nothing is due yet.
func (c *Conn) Expired(now int64) Action {
	d := c.Deadline()
	if d == 0 || now < d {
		return Continue
	}
	switch c.state {
	case Prelude:
		if !c.header {
			return c.hello(now, ErrHelloLate) // what came is all there is: route on it
		}
		return c.headerError(fmt.Errorf("%w (%s, %v)", ErrPreludeLate, c.Src, c.cfg.ProxyHeaderTimeout))
	case Dialing:
		return c.DialFailed(fmt.Errorf("%w after %v", errDialTimeout, c.cfg.DialTimeout), now)
	case Queued:
		g := c.cursor.Gate()
		g.Leave(&c.x.waiter)
		g.Wait.Observe(time.Duration(now - c.x.queuedAt))
		c.state = New // out of the queue
		c.ended(accesslog.QueueTimeout)
		c.Err = fmt.Errorf("%w within %v", ErrQueueTimeout, g.Timeout())
		return c.end(Close)
	}
	switch {
	case c.lingering:
		return Settle
	case c.winding:
		return c.close(fmt.Errorf("%w: the peers did not close within %v", ErrWound, WindLinger))
	case c.retireAt != 0 && now >= c.retireAt:
		return c.windDown(c.retireWhy, now)
	case c.expireAt != 0 && now >= c.expireAt:
		return c.windDown(balancer.MaxAge, now)
	}
	c.ended(accesslog.IdleTimeout)
	return c.close(ErrIdle)
}

// Retire schedules a wind-down at at (a clock reading) because of why, or
// with balancer.Kept, cancels one not yet begun. An earlier retirement
// stands. The driver then re-arms its timer from Deadline.
func (c *Conn) Retire(at int64, why balancer.Reason) {
	switch {
	case c.winding:
	case why == balancer.Kept:
		c.retireAt, c.retireWhy = 0, balancer.Kept
	case c.retireAt == 0 || at < c.retireAt:
		c.retireAt, c.retireWhy = at, why
	}
}

// windDown begins closing a connection that is in use: its target is final.
func (c *Conn) windDown(why balancer.Reason, now int64) Action {
	c.ended(retiredTermination[why])
	c.commit()
	c.winding = true
	c.windUntil = now + int64(WindLinger)
	c.stats.Closed[why].Add(1)
	c.Err = fmt.Errorf("%w: %s", ErrWound, why)
	return WindDown
}

// Winding reports whether c is winding down.
func (c *Conn) Winding() bool { return c.winding }

// retiredTermination is a wind-down's termination, by its reason.
var retiredTermination = [balancer.NumReasons]accesslog.Termination{
	balancer.Removed: accesslog.Removed, balancer.Down: accesslog.Down,
	balancer.Drained: accesslog.Drained, balancer.MaxAge: accesslog.MaxAge,
}
