// Package pool holds the targets of one listener (or one route of a
// listener): what discovery says exists, what health checking says is
// live, and the picker the proxy takes targets from.
//
// Every input (a discovery snapshot, an answer or error from the registry,
// a health change, a new configuration, a timer coming due) is queued and
// applied in order on the pool's one goroutine, as grpc-go's balancer
// applies its inputs on a serializer; a burst of inputs is applied as one
// batch, and the picker is rebuilt once per batch. The picker is immutable
// and published through an atomic pointer: Pick takes no lock and
// allocates nothing. Targets are kept by address, so their counters and
// health survive discovery churn and reloads.
package pool

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/fleet"
	"github.com/rota-proxy/rota/health"
)

// Config tunes a Pool. It may be replaced while the pool runs (Configure).
type Config struct {
	Health health.Config
	// Panic routes over every discovered target when none is live: a
	// wrong health verdict then costs less than refusing everyone.
	Panic bool
	// EmptyHold is how long a zero-instance answer that follows a registry
	// outage, restart or resync is held before it empties the pool; 0
	// believes it at once. A zero-instance answer on a healthy watch
	// always applies at once.
	EmptyHold time.Duration
	// Balance is the picking policy ("" is round-robin).
	Balance balancer.Policy
	// HashKey is what the hash policy hashes: "client_ip" (also "") or
	// "sni"; HashBalanceFactor its bound (0: none). See config.Pool.
	HashKey           string
	HashBalanceFactor float64
	// SlowStart ramps a target that turns live while others serve from a
	// small share to its full weight over this long; 0 disables it.
	SlowStart time.Duration
	// MaxConnsPerTarget caps each target's connections (0: none); over
	// it, a new connection waits in a queue of QueueSize (0: refused) for
	// up to QueueTimeout. See balancer.Gate.
	MaxConnsPerTarget int
	QueueSize         int
	QueueTimeout      time.Duration
	// Retired, if set, is told on the pool's goroutine when a target stops
	// taking new connections (balancer.Removed, Down or Drained) and when
	// it takes them again (balancer.Kept), so that the proxy can close or
	// spare its open connections. It must not block.
	Retired func(t *balancer.Target, why balancer.Reason)
	// Published, if set, is called on the pool's goroutine with every view
	// it publishes (benchmarks time the stages with it).
	Published func(*View)
}

// Pool is the set of targets of one listener or route. Create it with New,
// feed it discovery through a Sink (NewSink), and Close it when done.
type Pool struct {
	log     *zap.Logger
	checker *health.Checker
	bal     balancer.Balancer
	// gate caps the targets' connections and queues the rest; its
	// pickers carry it while MaxConnsPerTarget is set.
	gate *balancer.Gate

	view atomic.Pointer[View]
	// Discovery state read by the admin without the serializer: updated
	// on every answer, which can be many a second.
	lastSync     atomic.Int64 // unix nanoseconds of the last answer
	synced       atomic.Bool
	updates      atomic.Uint64
	errors       atomic.Uint64
	malformed    atomic.Uint64
	lastErr      atomic.Pointer[string]
	failing      atomic.Bool
	stale        atomic.Bool
	sinkGen      atomic.Uint64 // the current sink's generation
	inputs       queue
	done         chan struct{}
	closeOnce    sync.Once
	timersClosed atomic.Bool

	// Below: the serializer goroutine's own.
	cfg       Config
	entries   map[string]*entry // every target known: discovered, or kept while bridging
	order     []*entry          // entries, sorted by address
	warnings  []discovery.Warning
	seenWarn  map[discovery.Warning]bool
	dirty     bool // the picker and view need rebuilding
	panicking bool
	hold      *time.Timer // a held empty answer coming due
	holdGen   uint64
	bridge    *bridge
	drained   map[string]bool       // by address, kept across discovery churn
	weights   map[string]int        // local weight overrides, by address
	fleet     map[string]fleet.Mark // the fleet's marks on this pool's listener, by address
	fleetKind string                // where they come from ("etcd", "consul")
	ramp      *time.Timer           // rebuilds while a target ramps up (slow start)
	sampler   *time.Timer           // samples the targets' new connections every second
	serving   bool                  // some target has been live: later ones ramp
	gone      []*balancer.Target    // followed targets dropped since the last rebuild: "removed"
	flushers  []chan struct{}       // Flush calls waiting for the queue to run dry
}

// entry is one target and what the pool knows of it.
type entry struct {
	t         *balancer.Target
	inst      discovery.Instance
	up        bool      // health says live
	bridging  bool      // no longer discovered, kept until a new target is live
	liveSince time.Time // when it turned up while others served (slow start); zero: full weight
	initial   bool      // discovered before any target served: its first verdict does not ramp
	// Retired's view: followed once it served; why it took no new
	// connections at the last rebuild ("" while it took them).
	followed bool
	why      balancer.Reason
	history  *History // new connections, second by second
}

// bridge is a make-before-break in progress: a snapshot replaced every live
// target, and the old ones serve until a new one is live or the deadline.
type bridge struct {
	timer *time.Timer
}

// New starts a pool with no targets.
func New(cfg Config, log *zap.Logger) *Pool {
	if log == nil {
		log = zap.NewNop()
	}
	p := &Pool{
		log:      log,
		cfg:      cfg,
		entries:  map[string]*entry{},
		seenWarn: map[discovery.Warning]bool{},
		drained:  map[string]bool{},
		weights:  map[string]int{},
		done:     make(chan struct{}),
		gate:     balancer.NewGate(),
	}
	p.inputs.init()
	p.checker = health.New(cfg.Health, log.Named("health"), func(addr string, up bool) {
		p.inputs.push(func() { p.healthChanged(addr, up) })
	})
	p.view.Store(&View{})
	go p.run()
	p.inputs.push(p.sample)
	return p
}

// Pick starts a selection for one client connection (see balancer.Cursor).
// It takes no lock and allocates nothing.
func (p *Pool) Pick() balancer.Cursor { return p.bal.Pick() }

// PickFor is Pick for the connection of client (the PROXY header's, when
// one was accepted) that asked for serverName: the hash policy hashes the
// one its hash_key names; the others pick as Pick does. It takes no lock
// and allocates nothing.
func (p *Pool) PickFor(client netip.Addr, serverName string) balancer.Cursor {
	return p.bal.PickFor(client, serverName)
}

// Drain stops (or, with on false, resumes) new connections to addr; its
// open ones stay. The mark is kept by address, across discovery churn and
// reloads, until undrained. It returns once the picker reflects it.
func (p *Pool) Drain(addr string, on bool) {
	p.inputs.push(func() {
		if on {
			p.drained[addr] = true
		} else if p.drained[addr] {
			delete(p.drained, addr)
			if e, ok := p.entries[addr]; ok && e.up {
				p.startRamp(e)
			}
		}
		p.dirty = true
	})
	p.Flush()
}

// SetWeight overrides addr's registry weight in this process (0 clears
// the override). It returns once the picker reflects it.
func (p *Pool) SetWeight(addr string, w int) {
	p.inputs.push(func() {
		if w > 0 {
			p.weights[addr] = w
		} else {
			delete(p.weights, addr)
		}
		p.dirty = true
	})
	p.Flush()
}

// SetFleet replaces the fleet's marks on this pool's targets (by
// address; kind names their store). The pool keeps marks. A target
// undrained by it ramps up as after a local undrain. It never blocks.
func (p *Pool) SetFleet(marks map[string]fleet.Mark, kind string) {
	p.inputs.push(func() {
		for addr, m := range p.fleet {
			if m.Drain && !marks[addr].Drain && !p.drained[addr] {
				if e, ok := p.entries[addr]; ok && e.up {
					p.startRamp(e)
				}
			}
		}
		p.fleet, p.fleetKind = marks, kind
		p.dirty = true
	})
}

// Seed hands the pool's health checking the states another process had
// (an upgrade): targets discovered with these addresses start in them
// instead of checking. Call it before the first discovery snapshot.
func (p *Pool) Seed(states []health.Status) { p.checker.Seed(states) }

// ReportFailure takes addr out of rotation at once: the proxy could not
// reach it. It never blocks.
func (p *Pool) ReportFailure(addr string, err error) { p.checker.ReportFailure(addr, err) }

// Configure applies a new configuration; targets and their health stay.
func (p *Pool) Configure(cfg Config) {
	p.inputs.push(func() {
		p.cfg = cfg
		p.checker.SetConfig(cfg.Health)
		p.dirty = true
	})
}

// Queue is the pool's queue under max_conns_per_target: its length and
// how long connections waited.
func (p *Pool) Queue() *balancer.Gate { return p.gate }

// Health is every known target's health, sorted by address.
func (p *Pool) Health() []health.Status { return p.checker.Status() }

// Flush waits until every input queued before it, and every input those
// caused, has been applied and the picker rebuilt. Tests and benchmarks use
// it; the proxy never waits.
func (p *Pool) Flush() {
	ch := make(chan struct{})
	if !p.inputs.push(func() { p.flushers = append(p.flushers, ch) }) {
		return
	}
	select {
	case <-ch:
	case <-p.done:
	}
}

// Close stops the pool: health checking, timers and the serializer.
func (p *Pool) Close() {
	p.closeOnce.Do(func() {
		p.inputs.close()
		<-p.done
		// Connections waiting pick from the last picker rather than wait
		// out their timeout for places no one will announce.
		p.gate.WakeAll()
		p.checker.Close()
	})
}

// run is the serializer: it applies queued inputs in order, batch by
// batch, and rebuilds the picker after each batch that changed anything.
func (p *Pool) run() {
	defer close(p.done)
	defer p.stopTimers()
	for {
		batch, ok := p.inputs.take()
		if !ok {
			return
		}
		for i, fn := range batch {
			fn()
			batch[i] = nil
		}
		// Inputs cause inputs (a snapshot makes the checker report health
		// changes, queued behind this batch): a flusher is released only
		// after a batch that left nothing queued, so that it sees them.
		release := len(p.flushers) > 0 && !p.inputs.pending()
		if p.dirty || release {
			p.rebuild()
		}
		if release {
			for _, ch := range p.flushers {
				close(ch)
			}
			p.flushers = p.flushers[:0]
		}
	}
}

func (p *Pool) stopTimers() {
	p.timersClosed.Store(true)
	if p.hold != nil {
		p.hold.Stop()
	}
	if p.bridge != nil {
		p.bridge.timer.Stop()
	}
	if p.ramp != nil {
		p.ramp.Stop()
	}
	if p.sampler != nil {
		p.sampler.Stop()
	}
}

// after runs fn on the serializer after d, unless the pool closed.
func (p *Pool) after(d time.Duration, fn func()) *time.Timer {
	return time.AfterFunc(d, func() {
		if !p.timersClosed.Load() {
			p.inputs.push(fn)
		}
	})
}

// queue is the serializer's input: an unbounded FIFO of functions. Pushing
// never blocks, so health checking and discovery never wait for the pool.
type queue struct {
	mu     sync.Mutex
	fns    []func()
	spare  []func()
	signal chan struct{} // buffered(1): fns is not empty
	closed bool
}

func (q *queue) init() { q.signal = make(chan struct{}, 1) }

// push queues fn; false after close.
func (q *queue) push(fn func()) bool {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return false
	}
	q.fns = append(q.fns, fn)
	q.mu.Unlock()
	select {
	case q.signal <- struct{}{}:
	default:
	}
	return true
}

// take waits for inputs and returns all of them; false once closed (the
// inputs queued before close are returned first).
func (q *queue) take() ([]func(), bool) {
	for {
		q.mu.Lock()
		if len(q.fns) > 0 {
			batch := q.fns
			q.fns, q.spare = q.spare[:0], batch[:0]
			q.mu.Unlock()
			return batch, true
		}
		if q.closed {
			q.mu.Unlock()
			return nil, false
		}
		q.mu.Unlock()
		<-q.signal
	}
}

// pending reports whether inputs are waiting.
func (q *queue) pending() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.fns) > 0
}

func (q *queue) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	select {
	case q.signal <- struct{}{}:
	default:
	}
}
