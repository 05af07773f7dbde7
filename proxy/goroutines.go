package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/internal/neterr"
	"github.com/rota-proxy/rota/proxy/internal/relay"
)

// The portable driver: a connection is relayed by two goroutines, one per
// direction (inetaf/tcpproxy's shape). It is the driver off Linux, and for
// listeners that are not a *Listener.

// gbufPool holds the goroutines' read buffers.
var gbufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// gconn is a connection relayed by goroutines. The client-side goroutine
// owns its read buffer and the target-side goroutine its own; the machine,
// the bytes it holds and the current target are guarded by mu, and the
// machine's bytes are written to a target only under mu. So a retry on one
// goroutine and a read on the other never touch the same buffer, and bytes
// reach each target in order.
type gconn struct {
	p      *Proxy
	set    *settings // in force when it was accepted
	conns  *sync.WaitGroup
	client net.Conn
	tls    *accesslog.TLSInfo // what its terminated handshake negotiated; nil: none
	ctx    context.Context    // cancelled by abort: ends a dial in flight
	cancel context.CancelFunc

	mu      sync.Mutex
	m       relay.Conn
	target  net.Conn
	in, out uint64 // bytes from the client, and from the target

	// cur is the target for abort, which must not wait for mu (a write
	// under it may block).
	cur     atomic.Pointer[net.Conn]
	aborted atomic.Bool
	left    atomic.Int32 // goroutines still running
	reset   atomic.Bool  // close the client abortively

	// rets are Retire requests for the goroutines to apply to the machine
	// under mu (the caller must not wait for mu: a write under it may
	// block). retMu guards rets alone and is never held across anything.
	retMu sync.Mutex
	rets  []retireReq
	// wound: the machine began winding down; each goroutine checks it
	// after every read (a side that never pauses sets no deadline off).
	wound atomic.Bool
}

// retireReq is a Proxy.Retire for one gconn.
type retireReq struct {
	t     *balancer.Target
	why   balancer.Reason
	grace time.Duration
}

// relayWithGoroutines relays c, an admitted client of Serve's.
func (p *Proxy) relayWithGoroutines(c net.Conn, set *settings, conns *sync.WaitGroup) {
	if set.router.terminatesSome() {
		c = &routedConn{Conn: c}
	}
	g := &gconn{p: p, set: set, conns: conns, client: c}
	g.ctx, g.cancel = context.WithCancel(context.Background())
	g.m.Init(&set.relay, &p.Stats.Stats, p.ReportFailure, addrPort(c.RemoteAddr()), addrPort(c.LocalAddr()), p.clock())
	p.mu.Lock()
	p.gconns[g] = struct{}{}
	p.mu.Unlock()
	if p.aborting.Load() {
		g.abort()
	}
	g.left.Store(1)
	go g.clientSide()
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// clock is the portable driver's reading of the machine's clock.
func (p *Proxy) clock() int64 { return int64(time.Since(p.epoch)) }

// deadline converts a machine deadline to a read deadline.
func (p *Proxy) deadline(d int64) time.Time {
	if d == 0 {
		return time.Time{}
	}
	return p.epoch.Add(time.Duration(d))
}

// clientSide reads the client: the prelude, then the dials, then the
// client-to-target direction.
func (g *gconn) clientSide() {
	defer g.exit()
	bp := gbufPool.Get().(*[]byte)
	defer gbufPool.Put(bp)
	buf := *bp
	p := g.p

	a := g.locked(func() relay.Action { return g.m.Start(p.clock()) })
	for a == relay.ReadPrelude {
		g.setDeadline(g.client)
		n, err := g.client.Read(buf)
		a = g.locked(func() relay.Action {
			switch {
			case n > 0:
				g.in += uint64(n)
				return g.m.Prelude(buf[:n], p.clock())
			case errors.Is(err, os.ErrDeadlineExceeded):
				return g.m.Expired(p.clock())
			case err == io.EOF:
				return g.m.PreludeEOF()
			case err != nil:
				g.m.End(accesslog.ClientReset, err)
				return relay.Close
			}
			return relay.ReadPrelude
		})
	}
	if a == relay.Dial || a == relay.Queue {
		if tc := g.set.router.terminates(g.m.RouteIndex()); tc != nil && !g.terminateRoute(tc) {
			return
		}
	}
	if !g.act(g.connect(a)) {
		return
	}
	g.left.Add(1)
	go g.targetSide()

	for {
		g.setDeadline(g.client)
		n, err := g.client.Read(buf)
		if n > 0 && !g.act(g.fromClient(buf[:n])) {
			return
		}
		if g.wound.Load() {
			g.windClient(buf)
			return
		}
		switch {
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded):
			a := g.expired()
			if g.winding(a) {
				g.windClient(buf)
				return
			}
			if !g.act(a) {
				return
			}
		case err == io.EOF:
			var t net.Conn
			a := g.locked(func() relay.Action { t = g.target; return g.m.ClientEOF() })
			if a == relay.ShutTarget {
				closeWrite(t)
			}
			return
		default:
			g.ending(accesslog.ClientReset, err)
			g.abort()
			return
		}
	}
}

// fromClient sends the target what the client sent.
func (g *gconn) fromClient(data []byte) relay.Action {
	var t net.Conn
	a := g.locked(func() relay.Action {
		g.in += uint64(len(data))
		a := g.m.FromClient(data, g.p.clock())
		t = g.target
		if a == relay.Flush {
			a = g.flushLocked()
		}
		return a
	})
	if a == relay.Forward {
		if _, werr := t.Write(data); werr != nil {
			a = g.writeFailed(werr)
		}
	}
	return a
}

// expired asks the machine what is due, once the Retire requests queued
// are applied.
func (g *gconn) expired() relay.Action {
	return g.locked(func() relay.Action {
		g.takeRetiresLocked()
		return g.m.Expired(g.p.clock())
	})
}

// winding reports whether a, the machine's answer to Expired, begins or
// continues a wind-down.
func (g *gconn) winding(a relay.Action) bool {
	if a == relay.WindDown {
		g.wound.Store(true)
		return true
	}
	return a == relay.Continue && g.locked(func() relay.Action {
		if g.m.Winding() {
			return relay.WindDown
		}
		return relay.Continue
	}) == relay.WindDown
}

// windPeek bounds each read of what a winding-down side has sent already:
// those bytes have arrived, so a read returns them at once.
const windPeek = 5 * time.Millisecond

// windRead reads from c, winding down, what it had sent when the wind-down
// began, handing each chunk to fwd; it reports false if the connection is
// over. Where the socket cannot say how much waits, it reads until a read
// finds nothing within windPeek, at most windPeekMax bytes.
func (g *gconn) windRead(c net.Conn, buf []byte, fwd func([]byte) bool) (eof, ok bool) {
	left := unread(c)
	if left < 0 {
		left = windPeekMax
	}
	for left > 0 {
		c.SetReadDeadline(time.Now().Add(windPeek))
		n, err := c.Read(buf[:min(len(buf), left)])
		left -= n
		if n > 0 && !fwd(buf[:n]) {
			return false, false
		}
		switch {
		case err == io.EOF:
			return true, true
		case err != nil:
			return false, true
		}
	}
	return false, true
}

const windPeekMax = 1 << 20

// windClient winds the client-to-target direction down: what the client
// had sent goes to the target, the target gets a FIN, and the client's
// later bytes are dropped until it closes or the wind-down's deadline.
func (g *gconn) windClient(buf []byte) {
	var t net.Conn
	g.locked(func() relay.Action { t = g.target; return relay.Continue })
	t.SetReadDeadline(time.Now()) // the target side winds down its direction
	eof, ok := g.windRead(g.client, buf, func(b []byte) bool { return g.act(g.fromClient(b)) })
	if !ok {
		return
	}
	closeWrite(t)
	if eof {
		g.locked(func() relay.Action { return g.m.ClientEOF() })
		return
	}
	g.dropUntilClosed(g.client, buf)
}

// windTarget winds the target-to-client direction down, like windClient.
func (g *gconn) windTarget(t net.Conn, buf []byte) {
	g.client.SetReadDeadline(time.Now()) // the client side winds down its direction
	eof, ok := g.windRead(t, buf, func(b []byte) bool {
		g.locked(func() relay.Action { g.out += uint64(len(b)); return g.m.FromTarget(len(b), g.p.clock()) })
		if _, err := g.client.Write(b); err != nil {
			g.ending(accesslog.ClientReset, err)
			g.abort()
			return false
		}
		return true
	})
	if !ok {
		return
	}
	closeWrite(g.client)
	if !eof {
		g.dropUntilClosed(t, buf)
	}
}

// dropUntilClosed reads and drops what c sends after its FIN until it
// closes (closing our end on unread bytes would reset it); at the
// wind-down's deadline the connection is cut.
func (g *gconn) dropUntilClosed(c net.Conn, buf []byte) {
	for {
		g.setDeadline(c)
		_, err := c.Read(buf)
		switch {
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded):
			if a := g.expired(); a != relay.Continue {
				g.act(a)
				return
			}
		default: // EOF, or the other side's abort
			return
		}
	}
}

// retire queues a Retire for the goroutines and wakes their reads, which
// apply it and set their deadlines again. It takes no lock but retMu.
func (g *gconn) retire(t *balancer.Target, why balancer.Reason, grace time.Duration) {
	g.retMu.Lock()
	g.rets = append(g.rets, retireReq{t: t, why: why, grace: grace})
	g.retMu.Unlock()
	now := time.Now()
	g.client.SetReadDeadline(now)
	if c := g.cur.Load(); c != nil {
		(*c).SetReadDeadline(now)
	}
}

// takeRetiresLocked applies the queued Retire requests for this
// connection's target (under mu).
func (g *gconn) takeRetiresLocked() {
	g.retMu.Lock()
	rs := g.rets
	g.rets = nil
	g.retMu.Unlock()
	for _, r := range rs {
		if g.m.Target() == r.t {
			g.m.Retire(g.p.clock()+int64(r.grace), r.why)
		}
	}
}

func (g *gconn) retiresQueued() bool {
	g.retMu.Lock()
	defer g.retMu.Unlock()
	return len(g.rets) > 0
}

// connect dials while the machine says so, and sends a connected target
// what it must get first. It runs on either goroutine (the target side
// after a reset), never on both at once: the client side dials only before
// it starts the target side.
func (g *gconn) connect(a relay.Action) relay.Action {
	for a == relay.Dial || a == relay.Queue {
		if a == relay.Queue {
			a = g.queue()
			continue
		}
		var addr string
		var timeout time.Duration
		g.locked(func() relay.Action {
			if old := g.target; old != nil {
				old.Close()
				g.target = nil
			}
			addr, timeout = g.m.Target().Addr, g.m.DialTimeout()
			return relay.Continue
		})
		ctx, cancel := context.WithCancel(g.ctx)
		if timeout > 0 { // 0: no bound
			ctx, cancel = context.WithTimeout(g.ctx, timeout)
		}
		d := net.Dialer{KeepAlive: -1}
		c, err := d.DialContext(ctx, "tcp", addr)
		if tc := g.set.router.targetTLS(g.m.RouteIndex()); err == nil && tc != nil {
			c, err = originate(ctx, c, tc, addr) // within the dial's timeout
		}
		cancel()
		a = g.locked(func() relay.Action {
			switch {
			case g.aborted.Load():
				if c != nil {
					c.Close()
				}
				g.m.Shutdown()
				g.m.End(accesslog.Shutdown, errors.New("shutting down"))
				return relay.Close
			case err != nil:
				return g.m.DialFailed(err, g.p.clock())
			}
			g.target = c
			g.cur.Store(&c)
			if g.aborted.Load() { // abort ran between the check and the Store
				c.Close()
			}
			now := g.p.clock()
			a := g.m.Dialed(now)
			g.p.connected(g.set, &g.m, now, -1, g.tls)
			if fa := g.flushLocked(); fa != relay.Flush {
				a = fa
			}
			if a == relay.ShutTarget {
				closeWrite(c)
			}
			g.p.served()
			return a
		})
	}
	return a
}

// queue waits in the pool's queue for a place, until woken (Dequeued),
// the queue's timeout (Expired) or abort.
func (g *gconn) queue() relay.Action {
	woke := make(chan struct{}, 1)
	a := g.locked(func() relay.Action {
		return g.m.Enqueue(func() {
			select {
			case woke <- struct{}{}:
			default:
			}
		})
	})
	for a == relay.Continue {
		var d int64
		g.locked(func() relay.Action { d = g.m.Deadline(); return relay.Continue })
		var due <-chan time.Time // none: no timeout
		if d != 0 {
			timer := time.NewTimer(time.Until(g.p.deadline(d)))
			defer timer.Stop()
			due = timer.C
		}
		select {
		case <-woke:
			a = g.locked(func() relay.Action { return g.m.Dequeued(g.p.clock()) })
		case <-due:
			a = g.locked(func() relay.Action { return g.m.Expired(g.p.clock()) })
		case <-g.ctx.Done():
			a = g.locked(func() relay.Action {
				g.m.Shutdown()
				g.m.End(accesslog.Shutdown, errors.New("shutting down"))
				return relay.Close
			})
		}
	}
	return a
}

// locked runs f under mu. A panic in f unlocks mu on its way out, so the
// other goroutine is not left waiting for ever.
func (g *gconn) locked(f func() relay.Action) relay.Action {
	g.mu.Lock()
	defer g.mu.Unlock()
	return f()
}

// setDeadline sets c's read deadline to the machine's next deadline. A
// Retire queued meanwhile is applied and the deadline set again, so that
// its wake-up (which may have come before this) is not lost.
func (g *gconn) setDeadline(c net.Conn) {
	for {
		var d int64
		g.locked(func() relay.Action { g.takeRetiresLocked(); d = g.m.Deadline(); return relay.Continue })
		c.SetReadDeadline(g.p.deadline(d))
		if !g.retiresQueued() {
			return
		}
	}
}

// flushLocked writes the machine's pending bytes to the target. It returns
// Flush when all went, else what the machine says of the failure.
func (g *gconn) flushLocked() relay.Action {
	for p := g.m.Pending(); len(p) > 0; p = g.m.Pending() {
		n, err := g.target.Write(p)
		g.m.Wrote(n)
		if err != nil {
			if neterr.IsReset(err) {
				return g.m.WriteReset(err)
			}
			g.m.End(accesslog.TargetReset, err)
			return relay.Close
		}
	}
	return relay.Flush
}

func (g *gconn) writeFailed(err error) relay.Action {
	if neterr.IsReset(err) {
		return g.locked(func() relay.Action { return g.m.WriteReset(err) })
	}
	return g.ending(accesslog.TargetReset, err)
}

// ending notes a failure of the driver's (see relay.Conn.End) and says
// Close.
func (g *gconn) ending(t accesslog.Termination, err error) relay.Action {
	return g.locked(func() relay.Action { g.m.End(t, err); return relay.Close })
}

// targetSide copies the target to the client; after a reset inside the
// window it dials the next target and goes on with that one.
func (g *gconn) targetSide() {
	defer g.exit()
	bp := gbufPool.Get().(*[]byte)
	defer gbufPool.Put(bp)
	buf := *bp
	p := g.p
	for {
		var t net.Conn
		g.locked(func() relay.Action { t = g.target; return relay.Continue })
		g.setDeadline(t)
		n, err := t.Read(buf)
		if n > 0 {
			g.locked(func() relay.Action { g.out += uint64(n); return g.m.FromTarget(n, p.clock()) })
			if _, werr := g.client.Write(buf[:n]); werr != nil {
				g.ending(accesslog.ClientReset, werr)
				g.abort()
				return
			}
		}
		if g.wound.Load() && (err == nil || errors.Is(err, os.ErrDeadlineExceeded)) {
			g.windTarget(t, buf)
			return
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			if a := g.expired(); g.winding(a) {
				g.windTarget(t, buf)
				return
			} else if !g.act(a) {
				return
			}
			continue
		}
		a := g.locked(func() relay.Action {
			switch {
			case err == nil:
				return relay.Continue
			case err == io.EOF:
				return g.m.TargetEOF(p.clock())
			case neterr.IsReset(err):
				return g.m.TargetReset(err, p.clock())
			}
			g.m.End(accesslog.TargetReset, err)
			return relay.Close
		})
		if a == relay.Linger {
			a = g.linger(t)
		}
		switch a {
		case relay.ShutClient:
			closeWrite(g.client)
			return
		case relay.Dial:
			a = g.connect(a)
		}
		if !g.act(a) {
			return
		}
	}
}

// linger waits out the machine's grace for a reset from t, which closed
// after taking bytes, and reports what it found.
func (g *gconn) linger(t net.Conn) relay.Action {
	var d int64
	g.locked(func() relay.Action { d = g.m.Deadline(); return relay.Continue })
	timer := time.NewTimer(time.Until(g.p.deadline(d)))
	select {
	case <-timer.C:
	case <-g.ctx.Done():
		timer.Stop()
		return relay.Close
	}
	reset := pendingReset(t)
	return g.locked(func() relay.Action { return g.m.Settled(reset, g.p.clock()) })
}

// act carries out a terminal action; it reports whether relaying goes on.
func (g *gconn) act(a relay.Action) bool {
	switch a {
	case relay.Refused:
		g.p.refuse(g.m.Src, g.m.Err)
	case relay.Reset:
		g.reset.Store(true)
	case relay.Close:
	default:
		return !g.aborted.Load()
	}
	g.abort()
	return false
}

// abort cuts both sides at once; blocked reads, writes and dials return.
// It takes no lock.
func (g *gconn) abort() {
	g.aborted.Store(true)
	g.cancel()
	if g.reset.Load() {
		if tc := tcpOf(g.client); tc != nil {
			tc.SetLinger(0)
		}
	}
	g.client.Close()
	if t := g.cur.Load(); t != nil {
		(*t).Close()
	}
}

// exit ends one of the goroutines; the last one out closes everything and
// releases the connection. A panic closes this connection only.
func (g *gconn) exit() {
	panicked := false
	if v := recover(); v != nil {
		panicked = true
		g.p.Stats.Panics.Add(1)
		g.p.Logger.Error("relay panicked; closing its connection", zap.Any("panic", v), zap.ByteString("stack", debug.Stack()))
		g.abort()
	}
	if g.left.Add(-1) != 0 {
		return
	}
	g.abort()
	g.p.mu.Lock()
	delete(g.p.gconns, g)
	g.p.mu.Unlock()
	g.p.release(g.conns)
	// Last, as the machine may be in any state after a panic.
	defer func() {
		if v := recover(); v != nil {
			g.p.Logger.Error("relay: closing a panicked connection panicked", zap.Any("panic", v))
		}
	}()
	var err error
	g.locked(func() relay.Action {
		t := accesslog.NotEnded
		switch {
		case panicked:
			t = accesslog.Panic
		case g.p.aborting.Load():
			t = accesslog.Shutdown
		}
		g.m.End(t, nil)
		g.p.ended(g.set, &g.m, g.in, g.out, g.p.clock(), -1, g.tls)
		err = g.m.Err
		return relay.Close
	})
	if err != nil && !panicked {
		g.p.Logger.Debug("connection closed", zap.Stringer("client", g.m.Src), zap.Error(err))
	}
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

// isTemporary reports accept errors worth waiting out.
func isTemporary(err error) bool { return neterr.IsTemporaryAccept(err) }
