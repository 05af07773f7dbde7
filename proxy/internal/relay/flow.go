package relay

import "github.com/rota-proxy/rota/accesslog"

// The bytes: what the target must be sent first (Pending), the client's
// bytes held for replay, and the counting of what moves either way.

// Pending is what the target must be sent next, before any new client
// bytes: the PROXY header, then bytes held. The driver writes it and
// reports what was written to Wrote.
func (c *Conn) Pending() []byte {
	if c.state != Open && c.state != Committed {
		return nil
	}
	if x := c.x; x != nil && x.hdrSent < len(x.hdr) {
		return x.hdr[x.hdrSent:]
	}
	return c.held[c.sent:]
}

// TakeHeld hands the driver the client bytes held for a target that has
// not been dialled yet, and forgets them: a routed client's ClientHello
// when its route terminates TLS is the handshake's, not the target's. It
// returns nil once a byte was written to a target.
func (c *Conn) TakeHeld() []byte {
	if c.sent != 0 || c.spoke {
		return nil
	}
	h := c.held
	c.held = nil
	return h
}

// Wrote reports that n bytes of Pending() were written to the target.
func (c *Conn) Wrote(n int) {
	if x := c.x; x != nil && len(x.hdr) > x.hdrSent {
		d := min(n, len(x.hdr)-x.hdrSent)
		x.hdrSent += d
		n -= d
	}
	if n == 0 {
		return
	}
	c.spoke = true
	c.sent += n
	if !c.keeping() {
		// With replay off the first client byte to reach the target
		// closes the window: a later reset is the client's to see.
		if c.state == Open {
			c.state = Committed
		}
		c.dropSent()
	}
}

// keeping reports whether bytes written to the target are kept for replay.
func (c *Conn) keeping() bool {
	return c.state == Open && c.cfg.ReplayOnReset
}

// dropSent forgets the held bytes the target has taken.
func (c *Conn) dropSent() {
	if c.sent == len(c.held) {
		c.held, c.sent = nil, 0 // an idle connection keeps no buffer
		return
	}
	if c.sent > 0 {
		n := copy(c.held, c.held[c.sent:])
		c.held, c.sent = c.held[:n], 0
	}
}

// commit ends the window: the target is final.
func (c *Conn) commit() {
	if c.state == Open {
		c.state = Committed
		c.dropSent()
	}
}

// FromClient takes bytes read from the client. Forward: write them to the
// target. Flush: they are queued; write Pending().
func (c *Conn) FromClient(data []byte, now int64) Action {
	if c.cfg.Inspect != nil {
		c.cfg.Inspect(data)
	}
	n := len(data)
	c.last = now
	c.stats.BytesOut.Add(uint64(n))
	if c.state == Committed && c.sent == len(c.held) {
		c.target.BytesOut.Add(uint64(n))
		return Forward
	}
	if c.state == Open && !c.cfg.ReplayOnReset && len(c.Pending()) == 0 {
		c.state = Committed
		c.spoke = true
		c.target.BytesOut.Add(uint64(n))
		return Forward
	}
	if c.target != nil && (c.state == Open || c.state == Committed) {
		c.target.BytesOut.Add(uint64(n))
	}
	c.held = append(c.held, data...)
	if c.state == Open && c.cfg.ReplayOnReset && len(c.held) > ReplayLimit {
		c.commit() // too much to keep: the target is final
	}
	return Flush
}

// Spliced counts n bytes a committed connection moved without reading
// them (splice(2)), from the client when fromClient.
func (c *Conn) Spliced(fromClient bool, n int, now int64) {
	c.last = now
	if fromClient {
		c.stats.BytesOut.Add(uint64(n))
		c.target.BytesOut.Add(uint64(n))
	} else {
		c.stats.BytesIn.Add(uint64(n))
		c.target.BytesIn.Add(uint64(n))
	}
}

// ClientEOF reports the client's FIN. ShutTarget: pass it on once the
// target's queue is written (after Dialed when still dialling).
func (c *Conn) ClientEOF() Action {
	c.clientEOF = true
	c.ended(accesslog.ClientClosed)
	if c.state == Open || c.state == Committed {
		return ShutTarget
	}
	return Continue
}

// FromTarget takes n bytes read from the target, to be forwarded to the
// client. The first one commits.
func (c *Conn) FromTarget(n int, now int64) Action {
	c.commit()
	c.last = now
	c.stats.BytesIn.Add(uint64(n))
	c.target.BytesIn.Add(uint64(n))
	return Forward
}
