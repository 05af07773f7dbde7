// Package health decides which discovered targets are live.
//
// A Checker probes every target from one scheduler (a heap of jittered
// deadlines, at most maxInflight probes at once). On Linux, TCP checks of IP
// addresses run on one event loop (probe_linux.go); HTTP checks, names and
// other systems' probes run in short-lived goroutines.
// A new target is probed at once and becomes live on its first success; until
// then, failed probes are repeated after 100 ms, doubling up to Interval (a
// new instance is most likely still starting). A live target goes down after
// Fall consecutive failed probes, or at once when the proxy reports a failed
// dial; a down target is re-probed on exponential backoff with jitter (from
// Interval up to BackoffMax, forever) and comes back after Rise consecutive
// successes. A down target that answers, with a status, body or reply
// other than expected, is re-probed at Interval instead: it is alive, and
// its verdict may flip any moment (a database replica promoted). State is kept by address, so re-announcing a target (discovery
// churn, config reloads) keeps what the checker knows about it. With
// check: none a target is trusted as the registry reports it: live at once,
// down only after a failed dial, and then back after a successful
// (trivial) probe on backoff.
package health

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v5"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/internal/neterr"
)

// Check kinds.
const (
	CheckTCP        = "tcp"         // a TCP connect succeeds
	CheckHTTP       = "http"        // GET Path answers an expected status (and body)
	CheckHTTPS      = "https"       // the same over TLS
	CheckTLS        = "tls"         // a TLS handshake succeeds
	CheckSendExpect = "send_expect" // Steps: bytes sent, substrings expected
	CheckGRPC       = "grpc"        // grpc.health.v1 Check answers SERVING
	CheckNone       = "none"        // no active probe: only failed dials take a target down
)

// Checks lists the check kinds, for the configuration's errors.
var Checks = []string{CheckTCP, CheckHTTP, CheckHTTPS, CheckSendExpect, CheckTLS, CheckGRPC, CheckNone}

// Config tunes a Checker: a listener's (or route's) health key in rota's
// configuration, whose keys are the yaml tags. Values are taken as given,
// the defaults are the configuration's: Interval and Timeout must be
// positive unless Check is none; Rise and Fall count at least one probe,
// and BackoffMax is at least Interval.
type Config struct {
	Check        string        `yaml:"check"`         // one of Checks
	Port         int           `yaml:"port"`          // probe this port of the target's host (0: the target's own)
	Path         string        `yaml:"path"`          // http, https
	Host         string        `yaml:"host"`          // http, https: the Host header (default: the target's address)
	ExpectStatus []string      `yaml:"expect_status"` // http, https: codes and ranges (default DefaultExpectStatus)
	ExpectBody   string        `yaml:"expect_body"`   // http, https: a substring the body must contain
	Steps        []Step        `yaml:"steps"`         // send_expect
	TLS          TLS           `yaml:"tls"`           // https, tls, grpc
	GRPCService  string        `yaml:"grpc_service"`  // grpc: the service asked about ("": the server)
	Interval     time.Duration `yaml:"interval"`      // between probes of a target that is up
	Timeout      time.Duration `yaml:"timeout"`       // one probe's; may exceed the interval
	Rise         int           `yaml:"rise"`          // successes that bring a target up
	Fall         int           `yaml:"fall"`          // failures that take it down
	BackoffMax   time.Duration `yaml:"backoff_max"`   // the longest wait between probes of a target that is down
}

// bounded is c with its bounds applied (no defaults: those are the
// configuration's): no check is "none"; intervals and timeouts under a
// millisecond, which would spin, are a millisecond; Rise and Fall count at
// least one probe; BackoffMax is at least Interval.
func (c Config) bounded() Config {
	if c.Check == "" {
		c.Check = CheckNone
	}
	c.Interval = max(c.Interval, time.Millisecond)
	c.Timeout = max(c.Timeout, time.Millisecond)
	c.Rise, c.Fall = max(c.Rise, 1), max(c.Fall, 1)
	c.BackoffMax = max(c.BackoffMax, c.Interval)
	return c
}

// State is a target's health.
type State int

// States, as reported by the admin API.
const (
	Checking State = iota // discovered, no probe result yet
	Up
	Down
)

func (s State) String() string {
	switch s {
	case Checking:
		return "checking"
	case Up:
		return "up"
	case Down:
		return "down"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// MarshalText makes State render as its name in JSON.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText reads a State's name (an upgrade hands states over).
func (s *State) UnmarshalText(b []byte) error {
	for _, st := range []State{Checking, Up, Down} {
		if st.String() == string(b) {
			*s = st
			return nil
		}
	}
	return fmt.Errorf("health state %q: want checking, up or down", b)
}

// Status is what the checker knows about one target.
type Status struct {
	Addr                 string
	State                State
	ConsecutiveSuccesses int
	ConsecutiveFailures  int
	LastCheck            time.Time // zero before the first probe
	LastError            string    // of the latest failure; cleared by a success
	Since                time.Time // when State was entered
	ChecksOK             uint64    // probes that succeeded
	ChecksFailed         uint64    // probes that failed
	NextCheckIn          time.Duration
}

// maxInflight bounds the probes running at once: 10,000 targets probed every
// 2 s are 5,000 probes a second, each a few milliseconds at most.
const maxInflight = 512

// Checker tracks the health of a changing set of targets. One scheduler
// goroutine keeps every target's next probe in a heap of deadlines (spread
// by jitter) and starts each probe in a short-lived goroutine when it is
// due, at most maxInflight at once: an idle target costs a heap entry, not a
// goroutine and a timer. Create it with New; Close stops everything it
// started.
type Checker struct {
	logger   *zap.Logger
	onChange func(addr string, up bool)

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	wake   chan struct{} // buffered(1): the heap's head or the in-flight count changed

	mu       sync.Mutex
	cfg      Config
	spec     *spec // cfg parsed, for the probes: replaced, never changed
	targets  map[string]*target
	due      targetHeap // targets waiting for their next probe
	inflight int
	closed   bool
	rand     *rand.Rand

	// observe, when set (by tests), sees every probe result and the delay
	// chosen before the next probe.
	observe func(addr string, err error, next time.Duration)
	// probeFn, when set (by tests), replaces the network probe, so that
	// timing tests run in a synctest bubble on virtual time.
	probeFn func(ctx context.Context, addr string) error
	// tcp runs the TCP checks of IP addresses on a poller (Linux). The
	// scheduler starts it for its first such probe (a checker that never
	// makes one, or whose tests probe on virtual time, runs no loop);
	// noTCP: it could not start, and every probe runs in a goroutine.
	tcp   *tcpProber
	noTCP bool
	// seed are states handed over by the process this one upgraded from,
	// by address: a target discovered with one starts there instead of
	// checking (Seed).
	seed map[string]Status
}

// target is the state of one address, guarded by Checker.mu; the rise/fall
// counters sit next to the state they decide.
type target struct {
	addr string
	ap   netip.AddrPort // addr parsed once; not valid unless an IP literal
	// done records a probe's result (c.finish), made once so that a
	// probe on the loop allocates nothing.
	done    func(err error, sp *spec, kept *keptConn)
	idx     int  // position in Checker.due + 1; 0 while probing or removed
	probing bool // a probe is running
	redial  bool // a failure was reported while it ran: its connection is not kept
	removed bool // no longer discovered: a probe in flight is discarded

	state     State
	succ      int
	fail      int
	everUp    bool
	lastCheck time.Time
	lastErr   string
	since     time.Time
	ok, bad   uint64
	bo        *backoff.ExponentialBackOff
	next      time.Duration // delay before the next probe, set by the last event
	nextAt    time.Time
	// kept is the connection the last probe left open for the next (HTTP
	// keep-alive, a send_expect exchange asked again); nil while a probe
	// has it, after a failure, and for other kinds. The checker owns it under mu; a probe owns it
	// while it runs.
	kept *keptConn
	// req is the http check's request for this target under reqSpec,
	// made once a spec; the prober reads it (immutable once made).
	req     []byte
	reqSpec *spec
}

// New returns a Checker with no targets. onChange is told of every target
// that turns up or stops being up (goes down, or is removed while up). It
// is called with the checker's lock held, in the order the changes happen,
// so it must not block or call the checker. logger may be nil.
func New(cfg Config, logger *zap.Logger, onChange func(addr string, up bool)) *Checker {
	if logger == nil {
		logger = zap.NewNop()
	}
	if onChange == nil {
		onChange = func(string, bool) {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Checker{
		logger:   logger,
		onChange: onChange,
		ctx:      ctx,
		cancel:   cancel,
		wake:     make(chan struct{}, 1),
		targets:  make(map[string]*target),
		rand:     rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())),
	}
	c.configure(cfg)
	c.wg.Go(c.schedule)
	return c
}

// Update replaces the set of targets with addrs. Known addresses keep their
// state; new ones start in Checking and are probed at once (with
// check: none, they are up at once); missing ones stop being probed and
// are forgotten.
func (c *Checker) Update(addrs []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	want := make(map[string]struct{}, len(addrs))
	now := time.Now()
	for _, a := range addrs {
		want[a] = struct{}{}
		if _, ok := c.targets[a]; ok {
			continue
		}
		t := &target{addr: a, state: Checking, since: now, bo: c.newBackoff(), nextAt: now}
		t.ap, _ = netip.ParseAddrPort(a)
		t.done = func(err error, sp *spec, kept *keptConn) { c.finish(t, err, sp, kept) }
		c.targets[a] = t
		if st, ok := c.seed[a]; ok && c.cfg.Check != CheckNone && (st.State == Up || st.State == Down) {
			delete(c.seed, a)
			c.restore(t, st, now)
			c.due.push(t)
			continue
		}
		if c.cfg.Check == CheckNone {
			// The registry's word is enough: no probe. (Not logged one by
			// one: the pool logs what discovery changed.)
			t.state, t.everUp = Up, true
			c.onChange(a, true)
			continue
		}
		c.due.push(t)
	}
	for a, t := range c.targets {
		if _, ok := want[a]; ok {
			continue
		}
		t.removed = true
		t.forget()
		if t.idx > 0 {
			c.due.remove(t.idx - 1)
		}
		delete(c.targets, a)
		if t.state == Up {
			c.onChange(a, false)
		}
	}
	c.poke()
}

// Seed hands the checker states another process had (an upgrade): a target
// discovered later with one of these addresses starts in that state, with
// its counters, and is probed when its next probe was due, instead of
// starting in Checking. Call it before the targets are discovered.
func (c *Checker) Seed(states []Status) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.seed == nil {
		c.seed = make(map[string]Status, len(states))
	}
	for _, st := range states {
		c.seed[st.Addr] = st
	}
}

// restore puts t in the state st describes. Caller holds c.mu.
func (c *Checker) restore(t *target, st Status, now time.Time) {
	t.state, t.succ, t.fail = st.State, st.ConsecutiveSuccesses, st.ConsecutiveFailures
	t.ok, t.bad, t.lastCheck, t.lastErr = st.ChecksOK, st.ChecksFailed, st.LastCheck, st.LastError
	t.everUp = st.State == Up || st.ChecksOK > 0
	if !st.Since.IsZero() {
		t.since = st.Since
	}
	// The next probe when the other process would have made it (a down
	// target's backoff included), but no later than this checker's
	// longest wait.
	t.next = min(max(st.NextCheckIn, 0), max(c.cfg.Interval, c.cfg.BackoffMax))
	t.nextAt = now.Add(t.next)
	if t.state == Down {
		// The backoff goes on from about where the other process's was:
		// stepped until its delay reaches the wait that was due.
		for range 64 {
			if d := t.bo.NextBackOff(); d == backoff.Stop || d >= t.next {
				break
			}
		}
	}
	if t.state == Up {
		c.onChange(t.addr, true)
	}
}

// ReportFailure takes a live target down at once: the proxy could not dial
// it. It is then re-probed on backoff like any down target. Unknown addresses
// are ignored. It never blocks.
func (c *Checker) ReportFailure(addr string, err error) {
	if localFailure(err) {
		return // this process is out of resources; the target may be fine
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.targets[addr]
	if !ok || c.closed {
		return
	}
	t.fail++
	t.succ = 0
	// The next probe dials, as the proxy did: a kept connection would say
	// nothing about new ones. One in flight hands its connection to
	// finish, which then closes it.
	t.forget()
	t.redial = t.probing
	if err != nil {
		t.lastErr = "dial: " + err.Error()
	}
	if t.state != Down {
		c.setState(t, Down, t.lastErr)
		t.bo.Reset()
		t.next = c.backoffDelay(t)
		t.nextAt = time.Now().Add(t.next)
		c.reschedule(t)
	}
}

// SetConfig applies a new configuration to every target, keeping their
// states and counters. Zero fields take defaults.
func (c *Checker) SetConfig(cfg Config) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.configure(cfg)
	soon := time.Now().Add(c.cfg.Interval)
	for _, t := range c.targets {
		t.forget() // made for the old check's port, TLS or kind
		c.tune(t.bo)
		if t.state == Up && t.fail >= c.cfg.Fall {
			t.fail = c.cfg.Fall - 1 // the next failure decides, not a stale count
		}
		if t.nextAt.After(soon) {
			t.nextAt = soon
		}
		if c.cfg.Check == CheckNone && t.state != Up && !t.probing {
			t.nextAt = time.Now()
		}
		c.reschedule(t)
	}
	c.poke()
}

// configure sets the configuration and its parsed spec together (New, and
// SetConfig with c.mu held).
func (c *Checker) configure(cfg Config) {
	c.cfg = cfg.bounded()
	c.spec = compile(c.cfg)
	if c.spec.err != nil {
		// Validation reports it with its position first; a file that went
		// away since makes every probe fail with this.
		c.logger.Error("health check configuration", zap.Error(c.spec.err))
	}
}

// Config returns the configuration in force, defaults filled in.
func (c *Checker) Config() Config {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cfg
}

// Status returns every target's status, sorted by address.
func (c *Checker) Status() []Status {
	c.mu.Lock()
	out := make([]Status, 0, len(c.targets))
	now := time.Now()
	for _, t := range c.targets {
		out = append(out, t.status(now))
	}
	c.mu.Unlock()
	slices.SortFunc(out, func(a, b Status) int { return strings.Compare(a.Addr, b.Addr) })
	return out
}

func (t *target) status(now time.Time) Status {
	return Status{
		Addr: t.addr, State: t.state,
		ConsecutiveSuccesses: t.succ, ConsecutiveFailures: t.fail,
		LastCheck: t.lastCheck, LastError: t.lastErr, Since: t.since,
		ChecksOK: t.ok, ChecksFailed: t.bad,
		NextCheckIn: max(0, t.nextAt.Sub(now)),
	}
}

// Live returns the sorted addresses of the live targets.
func (c *Checker) Live() []string {
	c.mu.Lock()
	live := make([]string, 0, len(c.targets))
	for a, t := range c.targets {
		if t.state == Up {
			live = append(live, a)
		}
	}
	c.mu.Unlock()
	slices.Sort(live)
	return live
}

// Close stops the scheduler and every probe, and waits for them. Updates
// after Close are ignored.
func (c *Checker) Close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
	if c.tcp != nil {
		c.tcp.close() // after the scheduler: nothing starts probes now
	}
	c.mu.Lock()
	for _, t := range c.targets {
		t.forget()
	}
	c.mu.Unlock()
}

// forget closes t's kept connection, if any. Caller holds c.mu (closing
// a socket with a reset does not wait).
func (t *target) forget() {
	if t.kept != nil {
		t.kept.close()
		t.kept = nil
	}
}

// poke wakes the scheduler. It never blocks.
func (c *Checker) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// reschedule puts t back in the heap at its nextAt, unless a probe of it
// is running (whose result schedules it). Caller holds c.mu.
func (c *Checker) reschedule(t *target) {
	switch {
	case t.probing || t.removed:
	case t.idx > 0:
		c.due.fix(t.idx - 1)
	default:
		c.due.push(t)
	}
	c.poke()
}

// batchWindow is the least the scheduler sleeps, so that it wakes once for
// all the probes that came due meanwhile: 10,000 targets every 2 s would
// otherwise wake it 5,000 times a second, and a wake-up costs about what a
// probe's own work does. A probe is never early, and late by at most this.
const batchWindow = 5 * time.Millisecond

// schedule is the scheduler goroutine: it starts the probes that are due
// and sleeps until the next one is.
func (c *Checker) schedule() {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var jobs []tcpJob
	for {
		c.mu.Lock()
		now := time.Now()
		for c.due.len() > 0 && c.inflight < maxInflight && c.due.untilTop(now) <= 0 {
			t := c.due.pop()
			t.probing = true
			c.inflight++
			if c.onLoop(t.ap) {
				ap := t.ap
				if c.cfg.Port != 0 {
					ap = netip.AddrPortFrom(ap.Addr(), uint16(c.cfg.Port))
				}
				j := tcpJob{addr: ap, timeout: c.cfg.Timeout, sp: c.spec, done: t.done}
				switch c.cfg.Check {
				case CheckSendExpect:
					j.steps = c.spec.steps
				case CheckHTTP:
					if t.reqSpec != c.spec {
						t.req, t.reqSpec = []byte(c.spec.request(ap.String())), c.spec
					}
					j.req = t.req
				}
				if t.kept != nil {
					j.kept, t.kept = t.kept.loop, nil
				}
				jobs = append(jobs, j)
				continue
			}
			sp, kept := c.spec, t.kept
			t.kept = nil
			if kept != nil && kept.loop != nil {
				kept.close() // the loop's: not this path's
				kept = nil
			}
			c.wg.Go(func() {
				kept, err := c.probe(c.ctx, sp, t.addr, kept)
				c.finish(t, err, sp, kept)
			})
		}
		wait := time.Hour
		if c.due.len() > 0 && c.inflight < maxInflight {
			wait = max(c.due.untilTop(now), batchWindow)
		}
		c.mu.Unlock()
		if len(jobs) > 0 {
			// Started outside the lock: the prober's loop takes it to
			// record results.
			if !c.tcp.start(jobs) {
				for _, j := range jobs {
					j.done(errors.New("tcp check: prober closed"), j.sp, nil)
				}
			}
			jobs = nil
		}
		timer.Reset(wait)
		select {
		case <-c.ctx.Done():
			return
		case <-c.wake:
		case <-timer.C:
		}
	}
}

// tcpJob is one probe for the TCP prober to start: its result goes to
// done, once, on the prober's goroutine, with the spec it ran under and
// the connection it leaves for the next probe (nil: none).
type tcpJob struct {
	addr    netip.AddrPort
	timeout time.Duration
	steps   []step // a send_expect check's; nil for tcp
	req     []byte // an http check's request; nil for others
	sp      *spec
	// kept is the connection the target's last probe left (nil: none);
	// the job owns it, and the prober takes it with the job.
	kept *probeSocket
	done func(err error, sp *spec, kept *keptConn)
}

// kind names the check in errors.
func (j tcpJob) kind() string {
	switch {
	case j.req != nil:
		return CheckHTTP
	case j.steps != nil:
		return CheckSendExpect
	}
	return CheckTCP
}

// onLoop reports whether a probe of ap runs on the prober's loop: a tcp,
// send_expect or http check of an IP address, with the prober running and
// no test hook. Caller holds c.mu.
func (c *Checker) onLoop(ap netip.AddrPort) bool {
	loopable := c.cfg.Check == CheckTCP ||
		c.cfg.Check == CheckSendExpect && c.spec.err == nil && len(c.spec.steps) > 0 ||
		c.cfg.Check == CheckHTTP && c.spec.err == nil
	if c.noTCP || c.probeFn != nil || !loopable || !ap.IsValid() {
		return false
	}
	if c.tcp == nil {
		tcp, err := newTCPProber(c.logger)
		if tcp == nil {
			c.noTCP = true
			if err != nil {
				c.logger.Warn("tcp checks run in goroutines: no event loop", zap.Error(err))
			}
			return false
		}
		c.tcp = tcp
	}
	return true
}

// finish records the result of a probe of t, under the configuration in
// force now (a reload during the probe applies to its result). kept is the
// connection the probe, run under spec sp, leaves for the next one (nil:
// none); finish takes ownership of it.
func (c *Checker) finish(t *target, err error, sp *spec, kept *keptConn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if kept != nil {
		if err == nil && !t.removed && !c.closed && sp == c.spec && t.kept == nil && !t.redial {
			t.kept = kept
		} else {
			kept.close()
		}
	}
	t.redial = false
	if c.inflight == maxInflight {
		c.poke() // the scheduler waits for a free place, not a deadline
	}
	c.inflight--
	t.probing = false
	if c.ctx.Err() != nil || t.removed {
		return // removed or closed mid-probe: the result means nothing
	}
	if localFailure(err) {
		// Out of descriptors or memory here says nothing about the
		// target; taking every target down would make it worse.
		t.nextAt = time.Now().Add(c.jitter(c.cfg.Interval))
		c.requeue(t)
		return
	}
	next := c.record(t, err)
	if c.observe != nil {
		c.observe(t.addr, err, next)
	}
	if c.cfg.Check == CheckNone && t.state == Up {
		return // trusted: no routine probes
	}
	c.requeue(t)
}

// requeue puts t back in the heap, and wakes the scheduler only when t is
// due before what it sleeps for: a wake-up per probe would cost as much as
// the probe. Caller holds c.mu.
func (c *Checker) requeue(t *target) {
	c.due.push(t)
	if c.due.top() == t {
		c.poke()
	}
}

// jitter spreads d by up to ±10%, so that targets discovered together are
// not probed together for ever after.
func (c *Checker) jitter(d time.Duration) time.Duration {
	return d + time.Duration((c.rand.Float64()*0.2-0.1)*float64(d))
}

// record applies one probe result and returns the delay before the next
// probe. Caller holds c.mu.
func (c *Checker) record(t *target, err error) time.Duration {
	cfg := c.cfg
	t.lastCheck = time.Now()
	if err == nil {
		t.ok++
		t.succ++
		t.fail = 0
		t.lastErr = ""
		switch {
		case t.state == Checking,
			t.state == Down && (!t.everUp || t.succ >= cfg.Rise):
			// A target that was never up is admitted on its first success:
			// it was most likely still starting when first probed.
			c.setState(t, Up, "")
			t.bo.Reset()
		}
		t.next = c.jitter(cfg.Interval)
	} else {
		t.bad++
		t.fail++
		t.succ = 0
		t.lastErr = err.Error()
		// Never up: most likely still starting (a container's start event
		// comes before its app listens). Asked again soon, on a doubling
		// delay up to the interval, then on backoff.
		starting := !t.everUp && startingDelay(t.fail) < cfg.Interval
		switch {
		case t.state == Checking,
			t.state == Up && t.fail >= cfg.Fall:
			c.setState(t, Down, t.lastErr)
			t.bo.Reset()
			t.next = c.downDelay(t, err)
		case t.state == Down && !starting:
			t.next = c.downDelay(t, err)
		default: // up, fewer than Fall failures: keep the normal pace
			t.next = c.jitter(cfg.Interval)
		}
		if starting {
			t.next = c.jitter(startingDelay(t.fail))
		}
	}
	t.nextAt = t.lastCheck.Add(t.next)
	return t.next
}

// setState moves t to s and logs the change. Caller holds c.mu.
func (c *Checker) setState(t *target, s State, reason string) {
	if t.state == s {
		return
	}
	from := t.state
	t.state = s
	t.since = time.Now()
	if s == Up {
		t.everUp = true
		c.logger.Info("target up", zap.String("target", t.addr), zap.Stringer("from", from),
			zap.Int("consecutive_successes", t.succ))
		c.onChange(t.addr, true)
		return
	}
	c.logger.Warn("target down", zap.String("target", t.addr), zap.Stringer("from", from),
		zap.Int("consecutive_failures", t.fail), zap.String("reason", reason))
	if from == Up || from == Checking {
		// Checking -> Down too: the first verdict, whatever it is, is news.
		c.onChange(t.addr, false)
	}
}

func (c *Checker) newBackoff() *backoff.ExponentialBackOff {
	b := backoff.NewExponentialBackOff()
	c.tune(b)
	return b
}

// tune sets b from the config. Caller holds c.mu.
func (c *Checker) tune(b *backoff.ExponentialBackOff) {
	b.InitialInterval = c.cfg.Interval
	b.MaxInterval = c.cfg.BackoffMax
	b.Multiplier = 2
	b.RandomizationFactor = 0.2
}

// startingRetry is the first delay before a target that was never up is
// probed again; it doubles with each failure (see record).
const startingRetry = 100 * time.Millisecond

// startingDelay is the delay after the fails-th consecutive failure of a
// target that was never up.
func startingDelay(fails int) time.Duration {
	if fails > 16 {
		return time.Hour // past any interval
	}
	return startingRetry << max(fails-1, 0)
}

// downDelay is the next delay for a down target after the failure err:
// the interval when the target answered (its verdict may flip at any
// moment: a replica promoted), else on backoff. Caller holds c.mu.
func (c *Checker) downDelay(t *target, err error) time.Duration {
	if answered(err) {
		t.bo.Reset()
		return c.jitter(c.cfg.Interval)
	}
	return c.backoffDelay(t)
}

// backoffDelay is the next delay for a down target. The library's jitter may
// overshoot MaxInterval; clamping keeps BackoffMax a true upper bound.
func (c *Checker) backoffDelay(t *target) time.Duration {
	d := t.bo.NextBackOff()
	if d == backoff.Stop || d > c.cfg.BackoffMax {
		d = c.cfg.BackoffMax
	}
	return d
}

// unwrapOp keeps messages short ("connect: connection refused") by dropping
// the net.OpError prefix that repeats the address already in the log line.
func unwrapOp(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		return fmt.Errorf("%s: %w", op.Op, op.Err)
	}
	return err
}

// localFailure reports errors that are this process's, not the target's:
// out of file descriptors, buffers or memory.
func localFailure(err error) bool { return neterr.IsLocal(err) }
