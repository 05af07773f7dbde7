// Package health decides which discovered targets are live.
//
// A Checker owns one goroutine per target address. A new target is probed at
// once and becomes live on its first success. A live target goes down after
// Fall consecutive failed probes, or at once when the proxy reports a failed
// dial; a down target is re-probed on exponential backoff with jitter (from
// Interval up to BackoffMax, forever) and comes back after Rise consecutive
// successes. State is kept by address, so re-announcing a target (discovery
// churn, config reloads) keeps what the checker knows about it.
package health

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/internal/neterr"
)

// Check kinds.
const (
	CheckTCP  = "tcp"  // a TCP connect succeeds
	CheckHTTP = "http" // GET Path answers 2xx or 3xx
	CheckNone = "none" // no active probe: only failed dials take a target down
)

// Config tunes a Checker. Zero fields take the defaults of DefaultConfig.
type Config struct {
	Check      string
	Path       string
	Interval   time.Duration
	Timeout    time.Duration
	Rise       int
	Fall       int
	BackoffMax time.Duration
}

// DefaultConfig is the contract's default health configuration.
func DefaultConfig() Config {
	return Config{Check: CheckTCP, Path: "/healthz", Interval: 2 * time.Second,
		Timeout: time.Second, Rise: 2, Fall: 3, BackoffMax: 30 * time.Second}
}

func (c Config) withDefaults() Config {
	d := DefaultConfig()
	if c.Check == "" {
		c.Check = d.Check
	}
	if c.Path == "" {
		c.Path = d.Path
	}
	if c.Interval <= 0 {
		c.Interval = d.Interval
	}
	if c.Timeout <= 0 {
		c.Timeout = d.Timeout
	}
	if c.Rise < 1 {
		c.Rise = d.Rise
	}
	if c.Fall < 1 {
		c.Fall = d.Fall
	}
	if c.BackoffMax < c.Interval {
		c.BackoffMax = max(d.BackoffMax, c.Interval)
	}
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

// Checker tracks the health of a changing set of targets. Create it with New;
// Close stops every goroutine it started.
type Checker struct {
	logger   *zap.Logger
	onChange func(live []string)
	client   *http.Client

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// pubMu serialises onChange so a stale live set never overtakes a newer one.
	pubMu sync.Mutex

	mu      sync.Mutex
	cfg     Config
	targets map[string]*target
	closed  bool

	// observe, when set (by tests), sees every probe result and the delay
	// chosen before the next probe.
	observe func(addr string, err error, next time.Duration)
}

// target is the state of one address. Fields below mu in Checker are guarded
// by Checker.mu; the rise/fall counters sit next to the state they decide.
type target struct {
	addr   string
	cancel context.CancelFunc
	wake   chan struct{} // buffered(1): reschedule the next probe now

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
}

// New returns a Checker with no targets. onChange is called with the sorted
// addresses of the live targets whenever that set changes; calls never
// overlap. logger may be nil.
func New(cfg Config, logger *zap.Logger, onChange func(live []string)) *Checker {
	if logger == nil {
		logger = zap.NewNop()
	}
	if onChange == nil {
		onChange = func([]string) {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Checker{
		logger:   logger,
		onChange: onChange,
		client: &http.Client{
			// No keep-alive: a probe must prove a fresh connection works, and
			// pooled connections would outlive the checker.
			Transport:     &http.Transport{DisableKeepAlives: true, Proxy: nil},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		ctx:     ctx,
		cancel:  cancel,
		cfg:     cfg.withDefaults(),
		targets: make(map[string]*target),
	}
}

// Update replaces the set of targets with addrs. Known addresses keep their
// state; new ones start in Checking and are probed at once; missing ones stop
// being probed and are forgotten.
func (c *Checker) Update(addrs []string) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	want := make(map[string]bool, len(addrs))
	for _, a := range addrs {
		want[a] = true
		if _, ok := c.targets[a]; ok {
			continue
		}
		ctx, cancel := context.WithCancel(c.ctx)
		t := &target{addr: a, cancel: cancel, wake: make(chan struct{}, 1),
			state: Checking, since: time.Now(), bo: c.newBackoff()}
		c.targets[a] = t
		c.wg.Go(func() { c.run(ctx, t) })
	}
	changed := false
	for a, t := range c.targets {
		if !want[a] {
			t.cancel()
			delete(c.targets, a)
			changed = changed || t.state == Up
		}
	}
	c.mu.Unlock()
	if changed {
		c.publish()
	}
}

// ReportFailure takes a live target down at once: the proxy could not dial
// it. It is then re-probed on backoff like any down target. Unknown addresses
// are ignored.
func (c *Checker) ReportFailure(addr string, err error) {
	if localFailure(err) {
		return // this process is out of resources; the target may be fine
	}
	c.mu.Lock()
	t, ok := c.targets[addr]
	if !ok || c.closed {
		c.mu.Unlock()
		return
	}
	wasUp := t.state == Up
	t.fail++
	t.succ = 0
	if err != nil {
		t.lastErr = "dial: " + err.Error()
	}
	if t.state != Down {
		c.setState(t, Down, t.lastErr)
		t.bo.Reset()
		t.next = c.backoffDelay(t)
		t.nextAt = time.Now().Add(t.next)
		select {
		case t.wake <- struct{}{}:
		default:
		}
	}
	c.mu.Unlock()
	if wasUp {
		c.publish()
	}
}

// SetConfig applies a new configuration to every target, keeping their
// states and counters. Zero fields take defaults.
func (c *Checker) SetConfig(cfg Config) {
	c.mu.Lock()
	c.cfg = cfg.withDefaults()
	for _, t := range c.targets {
		c.tune(t.bo)
		if t.state == Up && t.fail >= c.cfg.Fall {
			t.fail = c.cfg.Fall - 1 // the next failure decides, not a stale count
		}
		if soon := time.Now().Add(c.cfg.Interval); t.nextAt.After(soon) {
			t.nextAt = soon
		}
		select {
		case t.wake <- struct{}{}:
		default:
		}
	}
	c.mu.Unlock()
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
		out = append(out, Status{
			Addr: t.addr, State: t.state,
			ConsecutiveSuccesses: t.succ, ConsecutiveFailures: t.fail,
			LastCheck: t.lastCheck, LastError: t.lastErr, Since: t.since,
			ChecksOK: t.ok, ChecksFailed: t.bad,
			NextCheckIn: max(0, t.nextAt.Sub(now)),
		})
	}
	c.mu.Unlock()
	slices.SortFunc(out, func(a, b Status) int {
		switch {
		case a.Addr < b.Addr:
			return -1
		case a.Addr > b.Addr:
			return 1
		}
		return 0
	})
	return out
}

// Live returns the sorted addresses of the live targets.
func (c *Checker) Live() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.liveLocked()
}

// Close stops every probe goroutine and waits for them. Updates after Close
// are ignored.
func (c *Checker) Close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
	c.client.CloseIdleConnections()
}

func (c *Checker) liveLocked() []string {
	live := make([]string, 0, len(c.targets))
	for a, t := range c.targets {
		if t.state == Up {
			live = append(live, a)
		}
	}
	slices.Sort(live)
	return live
}

func (c *Checker) publish() {
	c.pubMu.Lock()
	defer c.pubMu.Unlock()
	c.onChange(c.Live())
}

// run is the probe loop of one target; it exits when ctx is done.
func (c *Checker) run(ctx context.Context, t *target) {
	timer := time.NewTimer(0) // a new target is probed at once
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.wake:
			c.mu.Lock()
			d := time.Until(t.nextAt)
			c.mu.Unlock()
			timer.Reset(max(d, 0))
			continue
		case <-timer.C:
		}
		cfg := c.Config()
		err := c.probe(ctx, cfg, t.addr)
		if ctx.Err() != nil {
			return // removed or closed mid-probe: the result means nothing
		}
		if localFailure(err) {
			// Out of descriptors or memory here says nothing about the
			// target; taking every target down would make it worse.
			timer.Reset(cfg.Interval)
			continue
		}
		next, changed := c.record(t, err)
		if c.observe != nil {
			c.observe(t.addr, err, next)
		}
		if changed {
			c.publish()
		}
		timer.Reset(next)
	}
}

// record applies one probe result and returns the delay before the next
// probe and whether the live set changed.
func (c *Checker) record(t *target, err error) (time.Duration, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cfg := c.cfg
	t.lastCheck = time.Now()
	changed := false
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
			changed = true
		}
		t.next = cfg.Interval
	} else {
		t.bad++
		t.fail++
		t.succ = 0
		t.lastErr = err.Error()
		switch {
		case t.state == Checking,
			t.state == Up && t.fail >= cfg.Fall:
			changed = t.state == Up
			c.setState(t, Down, t.lastErr)
			t.bo.Reset()
			t.next = c.backoffDelay(t)
		case t.state == Down:
			t.next = c.backoffDelay(t)
		default: // up, fewer than Fall failures: keep the normal pace
			t.next = cfg.Interval
		}
	}
	t.nextAt = t.lastCheck.Add(t.next)
	return t.next, changed
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
		return
	}
	c.logger.Warn("target down", zap.String("target", t.addr), zap.Stringer("from", from),
		zap.Int("consecutive_failures", t.fail), zap.String("reason", reason))
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
	b.MaxElapsedTime = 0 // never give up on a target that is still discovered
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

func (c *Checker) probe(ctx context.Context, cfg Config, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	switch cfg.Check {
	case CheckNone:
		return nil
	case CheckHTTP:
		return c.probeHTTP(ctx, cfg, addr)
	default:
		return probeTCP(ctx, addr)
	}
}

func probeTCP(ctx context.Context, addr string) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("tcp check: %w", unwrapOp(err))
	}
	return conn.Close()
}

func (c *Checker) probeHTTP(ctx context.Context, cfg Config, addr string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+cfg.Path, nil)
	if err != nil {
		return fmt.Errorf("http check: %w", err)
	}
	req.Header.Set("User-Agent", "rota-health-check")
	resp, err := c.client.Do(req)
	if err != nil {
		return fmt.Errorf("http check: %w", unwrapOp(err))
	}
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode >= 400 {
		return fmt.Errorf("http check: GET %s: status %d", cfg.Path, resp.StatusCode)
	}
	return nil
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
