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
//
// One file a concern: relay.go the types (Config, Conn, the states and
// actions, the counters), settings.go a listener's Settings, prelude.go
// what the client sends first, attempt.go the targets tried and the window
// in which one may be replaced, flow.go the bytes, deadline.go the timers
// and wind-downs, clients.go the per-client count.
package relay

import (
	"errors"
	"golang.org/x/time/rate"
	"math/rand/v2"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/proxy/internal/sni"
)

// Picker yields the targets to try for one connection, best first.
type Picker interface {
	// PickFor starts the selection for a connection from client that
	// asked for serverName ("" for none): the hash policy hashes one of
	// them.
	PickFor(client netip.Addr, serverName string) balancer.Cursor
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
	// Rate and ClientRates are MaxConnRate's bucket and
	// MaxConnRatePerClient's buckets; nil when unlimited.
	Rate        *rate.Limiter
	ClientRates *ClientRates
	// Picker yields the targets of a listener without routes; nil when
	// Route chooses.
	Picker Picker
	// Route, if set, chooses the route by the TLS server name (SNI) in
	// the ClientHello the client sends first ("" when the client sends
	// none, no TLS, or nothing within SNITimeout): its picker and index.
	// A nil picker: no route, the client is closed and counted. Every
	// byte read is forwarded to the target unchanged.
	Route func(serverName string) (Picker, int)
}

// Denial says why a client was refused before anything was read from it.
type Denial uint8

// Denials, as the label of rota_connections_denied_total.
const (
	Admitted      Denial = iota
	Denied               // in deny
	NotAllowed           // allow is set and does not list it
	PerClient            // max_conns_per_client reached
	RateLimited          // over max_conn_rate
	PerClientRate        // over max_conn_rate_per_client
	numDenials
)

var denialNames = [...]string{"", "deny", "not_allowed", "per_client", "rate", "per_client_rate"}

func (d Denial) String() string { return denialNames[d] }

func (d Denial) termination() accesslog.Termination {
	return [...]accesslog.Termination{accesslog.NotEnded, accesslog.DeniedDeny, accesslog.DeniedNotAllowed,
		accesslog.DeniedPerClient, accesslog.DeniedRate, accesslog.DeniedRate}[d]
}

// Denials lists the reasons a client is refused for.
func Denials() []Denial { return []Denial{Denied, NotAllowed, PerClient, RateLimited, PerClientRate} }

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
	Queued                 // every target is at its cap: waiting for a place
	Dialing                // connecting to Target()
	Open                   // connected; the target has not answered: it may still be replaced
	Committed              // the target is final
	Closed
)

var stateNames = [...]string{"new", "prelude", "queued", "dialing", "open", "committed", "closed"}

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
	// Queue: every target is at its cap (max_conns_per_target). Call
	// Enqueue with a function that wakes the connection; when it is
	// called, Dequeued (on the connection's owner, not in the function),
	// and at Deadline, Expired. The client is not read meanwhile.
	Queue
)

var actionNames = [...]string{"continue", "read-prelude", "dial", "forward", "flush", "shut-target", "shut-client", "close", "refused", "reset", "linger", "settle", "wind-down", "queue"}

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
	ErrQueueFull    = errors.New("every target is at max_conns_per_target and the queue is full")
	ErrQueueTimeout = errors.New("queue timeout: no target had a place")
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
	connected    bool // Target() connected (it is the one that carried the bytes)
	// header: the PROXY header is still to be read (in Prelude; else the
	// ClientHello is). slot: the client holds a place in cfg.Clients.
	header bool
	slot   bool
	tries  int32 // targets still to try
	// term is how the connection ended (or, before, how it is ending:
	// who closed first); see ended.
	term accesslog.Termination
	// seen is the gate's Seq before the last pick, for Enqueue (it fits
	// in the padding after term).
	seen uint32

	// Clock readings, nanoseconds. due is the deadline of the phase: the
	// ClientHello's in Prelude, the dial's in Dialing, the end of the
	// DyingWindow once connected.
	start, last, due int64
	// Err says why the connection closed, or why the last attempt failed.
	Err error
}

// extra is the part of a Conn that only some connections need.
type extra struct {
	// peer is the socket's client when a PROXY header named another.
	peer netip.AddrPort
	// route is 1 + the index of the route the ClientHello chose; 0 none.
	route int
	// tried are the targets tried before Target() and why each failed.
	tried  [accesslog.MaxTries]accesslog.Try
	ntried int
	// hdr is the PROXY header for targets; hdrSent of it went to the
	// current one.
	hdr      []byte
	hdrSent  int
	hello    string     // the server name the client asked for, once read
	helloErr error      // why none was read (not TLS, too large, late)
	helloR   sni.Reader // the ClientHello read so far
	// The queue (Queued): the place in it, when the connection first
	// queued (the timeout counts from there), and whether it was woken
	// (queued again, it goes first).
	waiter   balancer.Waiter
	queuedAt int64
	woken    bool
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

// Shutdown says the driver's proxy is closing: failures from now on are not
// the targets', and no further target is tried.
func (c *Conn) Shutdown() { c.closing = true }

// Close ends c for a reason of the driver's (an I/O error, Shutdown) and
// settles the accounting. It is idempotent.
func (c *Conn) Close(err error) {
	c.close(err)
}

// ended notes how the connection ends: the first cause stands, except
// that a reset or any other cause outranks a clean close seen first (the
// client got the reset), and a panic outranks all.
func (c *Conn) ended(t accesslog.Termination) {
	if t == accesslog.NotEnded {
		return
	}
	clean := c.term == accesslog.ClientClosed || c.term == accesslog.TargetClosed
	if c.term == accesslog.NotEnded || clean && t != accesslog.ClientClosed && t != accesslog.TargetClosed || t == accesslog.Panic {
		c.term = t
	}
}

// End notes a cause of the driver's (a side's I/O error, shutdown, a
// panic) as ended does, then closes c (Close).
func (c *Conn) End(t accesslog.Termination, err error) {
	c.ended(t)
	c.close(err)
}

// Record fills in what the machine knows of the connection for the access
// log, now (a clock reading): the client and the peer a PROXY header
// replaced, the server name, the target that carried the bytes and those
// tried before, the replay, the durations and the termination. The
// driver adds the times, the names and the bytes.
func (c *Conn) Record(r *accesslog.Record, now int64) {
	r.Client, r.Replayed, r.Termination = c.Src, c.replayed, c.term
	r.Duration = time.Duration(max(now-c.start, 0))
	if c.connected {
		r.Target = c.target.Addr
		r.Connect = time.Duration(c.due - int64(DyingWindow) - c.start)
	}
	if x := c.x; x != nil {
		r.Peer, r.SNI, r.NTries = x.peer, x.hello, x.ntried
		r.Tries = x.tried
	}
}

// RouteIndex is the index of the route the ClientHello chose; -1 none.
func (c *Conn) RouteIndex() int {
	if c.x == nil {
		return -1
	}
	return c.x.route - 1
}

// Termination is how the connection ended (NotEnded while it runs).
func (c *Conn) Termination() accesslog.Termination { return c.term }

func (c *Conn) close(err error) Action {
	if c.state == Closed {
		return Close
	}
	if c.target != nil && (c.state == Open || c.state == Committed) {
		c.target.AddActive(-1)
	}
	switch {
	case c.state == Queued:
		c.cursor.Gate().Leave(&c.x.waiter)
	case c.target != nil:
		c.cursor.Release(c.target)
	}
	if c.Err == nil {
		c.Err = err
	}
	return c.end(Close)
}

// Last is when a byte last moved either way.
func (c *Conn) Last() int64 { return c.last }
