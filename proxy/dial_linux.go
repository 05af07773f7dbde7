package proxy

// Reaching a target from the relay loops: the prelude read first, a
// non-blocking connect (a name resolved in a goroutine first), and its end.

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strconv"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/internal/poller"
	"github.com/rota-proxy/rota/internal/sock"
	"github.com/rota-proxy/rota/proxy/internal/relay"
)

// readPrelude reads what the client sends first until the machine has it.
func (c *conn) readPrelude() {
	for !c.done && c.m.State() == relay.Prelude && c.c.in {
		n, err := poller.Read(c.c.fd.Num(), c.l.buf)
		switch {
		case err == errEAGAIN:
			c.c.in = false
		case err != nil:
			c.finish(false, accesslog.ClientReset, err)
		case n == 0:
			c.c.in = false
			c.run(c.m.PreludeEOF())
		default:
			c.c.moved += uint64(n)
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
		c.t.out, c.t.nagle = true, nagleFresh
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
	now := c.l.p.Now()
	a := c.m.Dialed(now)
	c.p.connected(c.set, &c.m, now, c.l.id, nil)
	c.run(a)
}
