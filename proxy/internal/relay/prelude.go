package relay

// What the client sends first: a PROXY header from a trusted balancer, the
// access rules, and the ClientHello a routed listener chooses its route by.

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/proxy/internal/sni"
)

// maxPrelude bounds a PROXY header (v2 with TLVs; go-proxyproto's limit).
const maxPrelude = 16 + 4096

// more is c's extra part, made on first use.
func (c *Conn) more() *extra {
	if c.x == nil {
		c.x = new(extra)
	}
	return c.x
}

// Hello is the server name the client asked for, once read.
func (c *Conn) Hello() string {
	if c.x == nil {
		return ""
	}
	return c.x.hello
}

// HelloErr is why no server name was read (not TLS, too large, late).
func (c *Conn) HelloErr() error {
	if c.x == nil {
		return nil
	}
	return c.x.helloErr
}

// Start begins: the prelude is read, or a target is picked.
func (c *Conn) Start(now int64) Action {
	if c.cfg.AcceptProxy != nil {
		if !c.cfg.AcceptProxy(c.Src.Addr()) {
			return c.headerError(fmt.Errorf("%w: %s", ErrUntrusted, c.Src))
		}
		c.state = Prelude
		c.header = true
		return ReadPrelude
	}
	return c.client(now)
}

// client goes on once the client's address is known: it is admitted or
// refused, then its ClientHello is read when routes need it, and a target
// picked.
func (c *Conn) client(now int64) Action {
	if d := c.admit(); d != Admitted {
		c.stats.Denied[d].Add(1)
		c.ended(d.termination())
		c.Err = fmt.Errorf("%w: %s: %s", ErrDenied, c.Src.Addr(), d)
		return c.end(Close)
	}
	if c.cfg.Route == nil {
		return c.pick(now)
	}
	c.state = Prelude
	c.due = deadline(now, c.cfg.SNITimeout)
	if len(c.held) > 0 {
		return c.hello(now, nil)
	}
	return ReadPrelude
}

// admit applies the listener's access rules to the client.
func (c *Conn) admit() Denial {
	a := c.Src.Addr().Unmap()
	if c.cfg.Access != nil {
		if d := c.cfg.Access(a); d != Admitted {
			return d
		}
	}
	// Rates: time.Now, not the loop's clock, since a listener's bucket is
	// shared by every loop and each loop's clock has its own origin.
	if c.cfg.Rate != nil && !c.cfg.Rate.Allow() {
		return RateLimited
	}
	if c.cfg.ClientRates != nil && !c.cfg.ClientRates.allow(a, time.Now()) {
		return PerClientRate
	}
	if c.cfg.Clients != nil && c.cfg.MaxConnsPerClient > 0 {
		if !c.cfg.Clients.acquire(a, c.cfg.MaxConnsPerClient) {
			return PerClient
		}
		c.slot = true
	}
	return Admitted
}

// hello looks for the ClientHello in the bytes held, and routes once it is
// read, or cannot be: not TLS, or final, why no more will be read (too
// large, late); nil while more may come.
func (c *Conn) hello(now int64, final error) Action {
	name, done, err := c.more().helloR.Parse(c.held)
	switch {
	case err != nil:
		c.more().helloErr = err
	case done:
		c.more().hello = name
	case final != nil:
		c.more().helloErr = final
	default:
		return ReadPrelude
	}
	p, i := c.cfg.Route(c.Hello())
	if p == nil {
		c.stats.NoRoute.Add(1)
		c.ended(accesslog.NoRoute)
		c.Err = fmt.Errorf("%w %q (from %s)", ErrNoRoute, c.Hello(), c.Src)
		return c.end(Close)
	}
	c.picker, c.x.route = p, i+1
	return c.pick(now)
}

// ErrHelloLate is HelloErr when sni_timeout passed before the ClientHello
// was complete.
var ErrHelloLate = errors.New("no ClientHello within sni_timeout")

var errHelloTooLarge = fmt.Errorf("a ClientHello over %d bytes", sni.MaxHello)

// Prelude takes bytes the client sent while its prelude is read.
func (c *Conn) Prelude(data []byte, now int64) Action {
	if c.state != Prelude {
		panic("relay: Prelude in state " + c.state.String())
	}
	c.held = append(c.held, data...)
	if !c.header {
		if len(c.held) > sni.MaxHello {
			// More than a ClientHello can be: it is not one.
			return c.hello(now, errHelloTooLarge)
		}
		return c.hello(now, nil)
	}
	n, err := proxyHeaderLen(c.held)
	switch {
	case err != nil:
		return c.headerError(fmt.Errorf("PROXY protocol header from %s: %w", c.Src, err))
	case n == 0:
		return ReadPrelude
	}
	h, err := proxyproto.Read(bufio.NewReaderSize(bytes.NewReader(c.held[:n]), max(n, 16)))
	if err != nil {
		return c.headerError(fmt.Errorf("PROXY protocol header from %s: %w", c.Src, err))
	}
	if !h.Command.IsLocal() {
		// A LOCAL header (a balancer's own health check) names nobody:
		// the socket's addresses stand.
		if src, dst, ok := h.TCPAddrs(); ok {
			c.more().peer = c.Src
			c.Src, c.Dst = tcpAddrPort(src), tcpAddrPort(dst)
		}
	}
	// What follows the header starts the stream.
	rest := copy(c.held, c.held[n:])
	c.held = c.held[:rest]
	if rest == 0 {
		c.held = nil
	}
	c.header = false
	return c.client(now)
}

// PreludeEOF reports that the client closed while its prelude was read.
// A client that leaves before its ClientHello is complete is closed: it
// asked nothing a target could answer.
func (c *Conn) PreludeEOF() Action {
	if !c.header {
		c.ended(accesslog.ClientClosed)
		c.Err = fmt.Errorf("client closed before its ClientHello ended (%d bytes)", len(c.held))
		return c.end(Close)
	}
	return c.headerError(fmt.Errorf("%w (%s)", ErrPreludeShort, c.Src))
}

func (c *Conn) headerError(err error) Action {
	c.ended(accesslog.ProxyHeaderError)
	c.stats.HeaderErrors.Add(1)
	c.Err = err
	return c.end(Close)
}

// proxyHeaderLen frames a PROXY header at the start of b: its length once
// b holds all of it, 0 while more is needed, an error when b cannot start
// one. Parsing is go-proxyproto's; this only says when to call it.
func proxyHeaderLen(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	switch {
	case hasPrefixOrIsPrefix(b, proxyproto.SIGV1):
		if len(b) < len(proxyproto.SIGV1) {
			return 0, nil
		}
		if i := bytes.IndexByte(b[:min(len(b), 107)], '\n'); i >= 0 {
			return i + 1, nil
		}
		if len(b) >= 107 {
			return 0, proxyproto.ErrVersion1HeaderTooLong
		}
		return 0, nil
	case hasPrefixOrIsPrefix(b, proxyproto.SIGV2):
		if len(b) < 16 {
			return 0, nil
		}
		n := 16 + int(binary.BigEndian.Uint16(b[14:16]))
		if n > maxPrelude {
			return 0, proxyproto.ErrInvalidLength
		}
		if len(b) < n {
			return 0, nil
		}
		return n, nil
	}
	return 0, proxyproto.ErrNoProxyProtocol
}

// hasPrefixOrIsPrefix reports whether b starts with sig, or is the start of it.
func hasPrefixOrIsPrefix(b, sig []byte) bool {
	n := min(len(b), len(sig))
	return bytes.Equal(b[:n], sig[:n])
}

func tcpAddrPort(a *net.TCPAddr) netip.AddrPort {
	ip, _ := netip.AddrFromSlice(a.IP)
	return netip.AddrPortFrom(ip.Unmap(), uint16(a.Port))
}
