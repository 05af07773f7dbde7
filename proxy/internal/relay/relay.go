// Package relay is the life of one proxied connection as a state machine
// without I/O: reading a prelude the client sends first (a PROXY header),
// picking targets and retrying the next one on a failed dial, the window in
// which a target may still be swapped (and the client's bytes replayed to
// the next), half-close in each direction, deadlines, and the counting.
//
// A driver owns the sockets and tells a Conn what happened ("the client sent
// these bytes", "the target connected", "the target reset"); the Conn
// answers with an Action for the driver to carry out. Two drivers exist in
// package proxy: the Linux relay loops and a portable goroutine driver. The
// decisions are all made here, once, so the two cannot differ.
package relay

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/proxy/internal/sni"
)

// Picker yields the targets to try for one connection, best first.
type Picker interface {
	Pick() balancer.Cursor
}

// Config is what a connection takes from its listener when it is accepted:
// the listener's Settings and what is derived from them once. A Config is
// shared by many connections and never modified.
type Config struct {
	Settings
	// AcceptProxy, if set, makes every client start with a PROXY protocol
	// header, accepted only from sources it approves.
	AcceptProxy func(src netip.Addr) bool
	// Inspect, if set, sees every chunk a client sends (tests inject
	// panics through it).
	Inspect func(data []byte)
	// Access, if set, says whether a client may connect, by its address
	// (the one a PROXY header named, when one is read). It is asked before
	// anything else is read from the client and before any target is
	// dialled.
	Access func(src netip.Addr) Denial
	// Clients counts the connections open from each client address, for
	// MaxConnsPerClient.
	Clients *ClientLimit
	// Picker yields the targets of a listener without routes; nil when
	// Route chooses.
	Picker Picker
	// Route, if set, chooses the picker by the TLS server name (SNI) in
	// the ClientHello the client sends first; "" when the client sends
	// none, no TLS, or nothing within SNITimeout. nil: no route, the
	// client is closed and counted. Every byte read is forwarded to the
	// target unchanged.
	Route func(serverName string) Picker
}

// Denial says why a client was refused before anything was read from it.
type Denial uint8

// Denials, as the label of rota_connections_denied_total.
const (
	Admitted   Denial = iota
	Denied            // in deny
	NotAllowed        // allow is set and does not list it
	PerClient         // max_conns_per_client reached
	numDenials
)

var denialNames = [...]string{"", "deny", "not_allowed", "per_client"}

func (d Denial) String() string { return denialNames[d] }

// Denials lists the reasons a client is refused for.
func Denials() []Denial { return []Denial{Denied, NotAllowed, PerClient} }

// WindLinger bounds a wind-down: after the FIN to both sides, the peers
// are given this long to close their ends (what they send meanwhile is
// read and dropped, so that closing resets nothing in flight); then the
// connection is closed regardless.
const WindLinger = 10 * time.Second

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

// maxPrelude bounds a PROXY header (v2 with TLVs; go-proxyproto's limit).
const maxPrelude = 16 + 4096

// Stats are a listener's counters, updated atomically by its connections.
type Stats struct {
	Accepted   atomic.Uint64 // client connections accepted
	Rejected   atomic.Uint64 // closed at once because MaxConns was reached
	NoTarget   atomic.Uint64 // closed because no target could be reached
	DialErrors atomic.Uint64 // failed attempts to reach a target
	Active     atomic.Int64  // client connections open now
	BytesIn    atomic.Uint64 // bytes from targets to clients
	BytesOut   atomic.Uint64 // bytes from clients to targets
	// HeaderErrors counts clients closed for a PROXY protocol header that
	// was missing, malformed, late, or from an untrusted source.
	HeaderErrors atomic.Uint64
	// Closed counts connections wound down, by Reason.
	Closed [balancer.NumReasons]atomic.Uint64
	// Denied counts clients refused, by Denial.
	Denied [numDenials]atomic.Uint64
	// NoRoute counts clients closed because no route matched their
	// server name.
	NoRoute atomic.Uint64
	// Replays counts connections whose bytes went to a second target
	// after the first reset (replay_on_reset).
	Replays atomic.Uint64
}

// State is where a connection stands.
type State uint8

const (
	New       State = iota // not started
	Prelude                // reading what the client sends first
	Dialing                // connecting to Target()
	Open                   // connected; the target has not answered: it may still be replaced
	Committed              // the target is final
	Closed
)

var stateNames = [...]string{"new", "prelude", "dialing", "open", "committed", "closed"}

func (s State) String() string { return stateNames[s] }

// Action is what the driver does next.
type Action uint8

const (
	// Continue relaying; nothing else to do.
	Continue Action = iota
	// ReadPrelude: read more from the client and pass it to Prelude.
	ReadPrelude
	// Dial: connect to Target(), then call Dialed or DialFailed.
	Dial
	// Forward: write the bytes just passed in to the other side.
	Forward
	// Flush: write Pending() to the target, reporting each write to Wrote.
	Flush
	// ShutTarget: send the target a FIN once everything queued for it
	// (Pending first) is written. ShutClient: the same toward the client.
	ShutTarget
	ShutClient
	// Close both sides, gracefully. Refused is Close after no target could
	// be reached (the driver reports it once per episode).
	Close
	Refused
	// Reset: close both sides, the client's abortively, so that it sees the
	// reset the target sent.
	Reset
	// Linger: the target closed after taking client bytes it may not have
	// read. Stop relaying; at Deadline, Expired says Settle.
	Linger
	// Settle: look whether the target reset (its pending socket error) and
	// tell Settled.
	Settle
	// WindDown: close the connection without losing a byte either side
	// sent: read each side until it has nothing more and write it on,
	// send each side a FIN, then read and drop until each side closes (or
	// Deadline, when Expired says Close). Winding() is true from here on.
	WindDown
)

var actionNames = [...]string{"continue", "read-prelude", "dial", "forward", "flush", "shut-target", "shut-client", "close", "refused", "reset", "linger", "settle", "wind-down"}

func (a Action) String() string { return actionNames[a] }

// Errors a connection closes with (Err).
var (
	ErrNoTarget     = errors.New("no live target")
	ErrIdle         = errors.New("idle timeout")
	ErrPreludeLate  = errors.New("PROXY protocol: no header within the timeout")
	ErrUntrusted    = errors.New("PROXY protocol: source is not in accept_proxy_protocol")
	ErrPreludeShort = errors.New("PROXY protocol: client closed before the header ended")
	ErrWound        = errors.New("wound down")
	ErrNoRoute      = errors.New("no route for the server name")
	ErrDenied       = errors.New("client refused")
)

// Conn is one client connection. The zero Conn is not ready: call Init. A
// Conn is not safe for concurrent use; a driver gives it one owner (a loop)
// or a lock.
type Conn struct {
	cfg    *Config
	stats  *Stats
	picker Picker
	report func(addr string, err error)

	cursor balancer.Cursor
	target *balancer.Target
	// Src is the client, Dst the address it connected to: the socket's, or
	// those a PROXY header named.
	Src, Dst netip.AddrPort

	// held is the client's bytes the target has yet to take (sent marks
	// those written to the current target); with replay on, until the
	// target answers, also those it took.
	held []byte
	sent int
	// x holds what only some connections need (a PROXY header to send, a
	// ClientHello read): an idle connection is mostly this struct.
	x *extra
	// lingerUntil: while lingering (below), until when the target, closed
	// after taking bytes, may still turn out to have reset.
	lingerUntil int64
	// Winding down: when it is due (0: not), and once begun (winding), the
	// bound on the peers' closing; retireWhy says why.
	expireAt  int64 // max_conn_age, jittered
	retireAt  int64
	windUntil int64

	// The flags sit together: an idle connection is mostly this struct,
	// and a bool between two words costs a word.
	state     State
	retireWhy balancer.Reason
	// resetOnWrite: a write to the target found it reset. Linux reports a
	// reset once, so the target's next read sees a plain EOF.
	resetOnWrite bool
	spoke        bool // a client byte reached the current target
	lingering    bool
	clientEOF    bool
	closing      bool // the driver's proxy is shutting down: failures are not the target's
	winding      bool
	replayed     bool // the client's bytes went to a second target once: never again
	// header: the PROXY header is still to be read (in Prelude; else the
	// ClientHello is). slot: the client holds a place in cfg.Clients.
	header bool
	slot   bool
	tries  int32 // targets still to try

	// Clock readings, nanoseconds. due is the deadline of the phase: the
	// ClientHello's in Prelude, the dial's in Dialing, the end of the
	// DyingWindow once connected.
	start, last, due int64
	// Err says why the connection closed, or why the last attempt failed.
	Err error
}

// extra is the part of a Conn that only some connections need.
type extra struct {
	// hdr is the PROXY header for targets; hdrSent of it went to the
	// current one.
	hdr      []byte
	hdrSent  int
	hello    string     // the server name the client asked for, once read
	helloErr error      // why none was read (not TLS, too large, late)
	helloR   sni.Reader // the ClientHello read so far
}

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

// Init prepares c for a client from src that connected to dst, at now.
func (c *Conn) Init(cfg *Config, stats *Stats, report func(string, error), src, dst netip.AddrPort, now int64) {
	*c = Conn{cfg: cfg, stats: stats, picker: cfg.Picker, report: report, Src: src, Dst: dst, start: now, last: now}
	if age := cfg.MaxConnAge; age > 0 {
		c.expireAt = now + int64(float64(age)*(0.9+0.2*rand.Float64()))
	}
}

// State is where c stands.
func (c *Conn) State() State { return c.state }

// Target is the target being dialled or relayed to; nil before the first.
func (c *Conn) Target() *balancer.Target { return c.target }

// Committed reports whether the target is final.
func (c *Conn) Committed() bool { return c.state == Committed }

// Connected reports whether a target is connected (open or committed).
func (c *Conn) Connected() bool { return c.state == Open || c.state == Committed }

// Config is the configuration c was started with.
func (c *Conn) Config() *Config { return c.cfg }

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
		c.Err = fmt.Errorf("%w: %s: %s", ErrDenied, c.Src.Addr(), d)
		return c.end(Close)
	}
	if c.cfg.Route == nil {
		return c.pick(now)
	}
	c.state = Prelude
	c.due = deadline(now, c.cfg.SNITimeout)
	if len(c.held) > 0 {
		return c.hello(now, false)
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
	if c.cfg.Clients != nil && c.cfg.MaxConnsPerClient > 0 {
		if !c.cfg.Clients.acquire(a, c.cfg.MaxConnsPerClient) {
			return PerClient
		}
		c.slot = true
	}
	return Admitted
}

// hello looks for the ClientHello in the bytes held, and routes once it is
// read, or cannot be (not TLS, too large, late: final).
func (c *Conn) hello(now int64, final bool) Action {
	name, done, err := c.more().helloR.Parse(c.held)
	switch {
	case err != nil:
		c.more().helloErr = err
	case done:
		c.more().hello = name
	case final:
		c.more().helloErr = errHelloLate
	default:
		return ReadPrelude
	}
	p := c.cfg.Route(c.Hello())
	if p == nil {
		c.stats.NoRoute.Add(1)
		c.Err = fmt.Errorf("%w %q (from %s)", ErrNoRoute, c.Hello(), c.Src)
		return c.end(Close)
	}
	c.picker = p
	return c.pick(now)
}

var errHelloLate = errors.New("no ClientHello within sni_timeout")

// deadline is the clock reading d after now; 0 (none) when d is 0.
func deadline(now int64, d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return now + int64(d)
}

// end settles what a closing connection holds outside itself (its place in
// the per-client count), once, and returns a.
func (c *Conn) end(a Action) Action {
	c.state = Closed
	c.held = nil
	if c.slot {
		c.slot = false
		c.cfg.Clients.release(c.Src.Addr().Unmap())
	}
	return a
}

// Prelude takes bytes the client sent while its prelude is read.
func (c *Conn) Prelude(data []byte, now int64) Action {
	if c.state != Prelude {
		panic("relay: Prelude in state " + c.state.String())
	}
	c.held = append(c.held, data...)
	if !c.header {
		if len(c.held) > sni.MaxHello {
			// More than a ClientHello can be: it is not one.
			return c.hello(now, true)
		}
		return c.hello(now, false)
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
		c.Err = fmt.Errorf("client closed before its ClientHello ended (%d bytes)", len(c.held))
		return c.end(Close)
	}
	return c.headerError(fmt.Errorf("%w (%s)", ErrPreludeShort, c.Src))
}

func (c *Conn) headerError(err error) Action {
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

// pick starts the attempts: the picker's cursor, 1 + Retries targets at most.
func (c *Conn) pick(now int64) Action {
	c.cursor = c.picker.Pick()
	// (Retries is bounded by the config; min first, so no value wraps.)
	c.tries = int32(min(max(c.cfg.Retries, 0), c.cursor.Len()-1) + 1)
	return c.next(now, nil)
}

// next moves to the next target of the cursor, or gives up.
func (c *Conn) next(now int64, lastErr error) Action {
	c.target = nil
	if c.closing {
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
	}
	c.stats.NoTarget.Add(1)
	if lastErr == nil {
		c.Err = ErrNoTarget
	} else {
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
	t.Active.Add(1)
	t.Total.Add(1)
	c.state = Open
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
	t.DialErrors.Add(1)
	c.stats.DialErrors.Add(1)
	if c.report != nil {
		c.report(t.Addr, err)
	}
}

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
			return c.TargetReset(errors.New("EOF after a reset"), now)
		case c.dying(now):
			return c.TargetReset(errors.New("closed before it was asked anything"), now)
		case c.spoke && c.mayReplay():
			c.lingering = true
			c.lingerUntil = now + int64(ResetGrace)
			return Linger
		}
	}
	c.commit()
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
		return c.TargetReset(errors.New("reset after its FIN"), now)
	}
	c.commit()
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
		t.Active.Add(-1)
		c.fail(t, err)
		return c.next(now, err)
	case c.state == Open && c.spoke && c.mayReplay():
		c.replayed = true
		err = fmt.Errorf("%s: reset before its first byte: %w", t.Addr, err)
		t.Active.Add(-1)
		c.stats.Replays.Add(1)
		return c.next(now, err)
	}
	c.commit()
	return c.reset(err)
}

func (c *Conn) reset(err error) Action {
	c.close(err)
	return Reset
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
	case Dialing:
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
			return c.hello(now, true) // what came is all there is: route on it
		}
		return c.headerError(fmt.Errorf("%w (%s, %v)", ErrPreludeLate, c.Src, c.cfg.ProxyHeaderTimeout))
	case Dialing:
		return c.DialFailed(fmt.Errorf("dial timeout after %v", c.cfg.DialTimeout), now)
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
	c.commit()
	c.winding = true
	c.windUntil = now + int64(WindLinger)
	c.stats.Closed[why].Add(1)
	c.Err = fmt.Errorf("%w: %s", ErrWound, why)
	return WindDown
}

// Winding reports whether c is winding down.
func (c *Conn) Winding() bool { return c.winding }

// Shutdown says the driver's proxy is closing: failures from now on are not
// the targets', and no further target is tried.
func (c *Conn) Shutdown() { c.closing = true }

// Close ends c for a reason of the driver's (an I/O error, Shutdown) and
// settles the accounting. It is idempotent.
func (c *Conn) Close(err error) {
	c.close(err)
}

func (c *Conn) close(err error) Action {
	if c.state == Closed {
		return Close
	}
	if c.target != nil && (c.state == Open || c.state == Committed) {
		c.target.Active.Add(-1)
	}
	if c.Err == nil {
		c.Err = err
	}
	return c.end(Close)
}

// Last is when a byte last moved either way.
func (c *Conn) Last() int64 { return c.last }
