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
	conns  *sync.WaitGroup
	client net.Conn
	ctx    context.Context // cancelled by abort: ends a dial in flight
	cancel context.CancelFunc

	mu     sync.Mutex
	m      relay.Conn
	target net.Conn

	// cur is the target for abort, which must not wait for mu (a write
	// under it may block).
	cur     atomic.Pointer[net.Conn]
	aborted atomic.Bool
	left    atomic.Int32 // goroutines still running
	reset   atomic.Bool  // close the client abortively
}

// relayWithGoroutines relays c, an admitted client of Serve's.
func (p *Proxy) relayWithGoroutines(c net.Conn, set *settings, conns *sync.WaitGroup) {
	g := &gconn{p: p, conns: conns, client: c}
	g.ctx, g.cancel = context.WithCancel(context.Background())
	g.m.Init(&set.relay, &p.Stats.Stats, p.Picker, p.ReportFailure, addrPort(c.RemoteAddr()), addrPort(c.LocalAddr()), p.clock())
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
				return g.m.Prelude(buf[:n], p.clock())
			case errors.Is(err, os.ErrDeadlineExceeded):
				return g.m.Expired(p.clock())
			case err == io.EOF:
				return g.m.PreludeEOF()
			case err != nil:
				g.m.Close(err)
				return relay.Close
			}
			return relay.ReadPrelude
		})
	}
	if !g.act(g.connect(a)) {
		return
	}
	g.left.Add(1)
	go g.targetSide()

	for {
		g.setDeadline(g.client)
		n, err := g.client.Read(buf)
		if n > 0 {
			var t net.Conn
			a := g.locked(func() relay.Action {
				a := g.m.FromClient(buf[:n], p.clock())
				t = g.target
				if a == relay.Flush {
					a = g.flushLocked()
				}
				return a
			})
			if a == relay.Forward {
				if _, werr := t.Write(buf[:n]); werr != nil {
					a = g.writeFailed(werr)
				}
			}
			if !g.act(a) {
				return
			}
		}
		switch {
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded):
			if !g.act(g.locked(func() relay.Action { return g.m.Expired(p.clock()) })) {
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
			g.abort()
			return
		}
	}
}

// connect dials while the machine says so, and sends a connected target
// what it must get first. It runs on either goroutine (the target side
// after a reset), never on both at once: the client side dials only before
// it starts the target side.
func (g *gconn) connect(a relay.Action) relay.Action {
	for a == relay.Dial {
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
		ctx, cancel := context.WithTimeout(g.ctx, timeout)
		d := net.Dialer{KeepAlive: -1}
		c, err := d.DialContext(ctx, "tcp", addr)
		cancel()
		a = g.locked(func() relay.Action {
			switch {
			case g.aborted.Load():
				if c != nil {
					c.Close()
				}
				g.m.Shutdown()
				g.m.Close(errors.New("shutting down"))
				return relay.Close
			case err != nil:
				return g.m.DialFailed(err, g.p.clock())
			}
			g.target = c
			g.cur.Store(&c)
			if g.aborted.Load() { // abort ran between the check and the Store
				c.Close()
			}
			a := g.m.Dialed(g.p.clock())
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

// locked runs f under mu. A panic in f unlocks mu on its way out, so the
// other goroutine is not left waiting for ever.
func (g *gconn) locked(f func() relay.Action) relay.Action {
	g.mu.Lock()
	defer g.mu.Unlock()
	return f()
}

// setDeadline sets c's read deadline to the machine's next deadline.
func (g *gconn) setDeadline(c net.Conn) {
	var d int64
	g.locked(func() relay.Action { d = g.m.Deadline(); return relay.Continue })
	c.SetReadDeadline(g.p.deadline(d))
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
			g.m.Close(err)
			return relay.Close
		}
	}
	return relay.Flush
}

func (g *gconn) writeFailed(err error) relay.Action {
	if neterr.IsReset(err) {
		return g.locked(func() relay.Action { return g.m.WriteReset(err) })
	}
	return relay.Close
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
			g.locked(func() relay.Action { return g.m.FromTarget(n, p.clock()) })
			if _, werr := g.client.Write(buf[:n]); werr != nil {
				g.abort()
				return
			}
		}
		a := g.locked(func() relay.Action {
			switch {
			case err == nil:
				return relay.Continue
			case errors.Is(err, os.ErrDeadlineExceeded):
				return g.m.Expired(p.clock())
			case err == io.EOF:
				return g.m.TargetEOF(p.clock())
			case neterr.IsReset(err):
				return g.m.TargetReset(err, p.clock())
			}
			g.m.Close(err)
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
		if tc, ok := g.client.(*net.TCPConn); ok {
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
	g.locked(func() relay.Action { g.m.Close(nil); err = g.m.Err; return relay.Close })
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
