package relay

import (
	"errors"
	"testing"
	"time"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/balancer"
)

// gated is a balancer over targets whose places a gate caps.
type gated struct {
	b       balancer.Balancer
	gate    *balancer.Gate
	targets []*balancer.Target
}

func newGated(perTarget, size int, timeout time.Duration, n int) *gated {
	g := &gated{gate: balancer.NewGate()}
	g.gate.Set(perTarget, size, timeout)
	g.b.SetGate(g.gate)
	var es []balancer.Entry
	for i := range n {
		t := g.b.NewTarget(string(rune('a'+i)) + ":1")
		g.targets = append(g.targets, t)
		es = append(es, balancer.Entry{T: t, W: 1})
	}
	g.b.Update(balancer.RoundRobin, es)
	return g
}

// queued is one connection of a queue test, and its wake-ups.
type queued struct {
	c     Conn
	woken int
}

func (g *gated) conn(t *testing.T, cfg *Config, stats *Stats, now int64) (*queued, Action) {
	t.Helper()
	q := &queued{}
	q.c.Init(cfg, stats, nil, client, listen, now)
	return q, q.c.Start(now)
}

func (q *queued) enqueue(t *testing.T) {
	t.Helper()
	if a := q.c.Enqueue(func() { q.woken++ }); a != Continue {
		t.Fatalf("Enqueue: %v (%v)", a, q.c.Err)
	}
}

// Two targets of one place each: the third connection queues without
// picking, the fourth behind it; a place given back wakes the first, which
// dials; the second times out and is counted as such.
func TestQueueWaitsForAPlaceFirstInFirstOut(t *testing.T) {
	g := newGated(1, 10, time.Second, 2)
	cfg := Config{Picker: &g.b, Settings: Settings{Retries: 2}}
	var stats Stats
	a, act := g.conn(t, &cfg, &stats, 0)
	if act != Dial {
		t.Fatalf("first: %v", act)
	}
	a.c.Dialed(0)
	b, act := g.conn(t, &cfg, &stats, 0)
	if act != Dial || b.c.Target() == a.c.Target() {
		t.Fatalf("second: %v to %v", act, b.c.Target())
	}
	c, act := g.conn(t, &cfg, &stats, 10)
	if act != Queue || c.c.State() != Queued || c.c.Target() != nil {
		t.Fatalf("third: %v in %v", act, c.c.State())
	}
	if d := c.c.Deadline(); d != 10+int64(time.Second) {
		t.Fatalf("queued deadline %d", d)
	}
	c.enqueue(t)
	d, act := g.conn(t, &cfg, &stats, 20)
	if act != Queue {
		t.Fatalf("fourth: %v", act)
	}
	d.enqueue(t)
	if n := g.gate.Length(); n != 2 {
		t.Fatalf("queue length %d, want 2", n)
	}

	// b's target fails its dial: its place goes to c, first in the
	// queue; b, whose retry finds a's target at its cap, queues last.
	if act := b.c.DialFailed(errors.New("refused"), 30); act != Queue {
		t.Fatalf("b after its failed dial: %v", act)
	}
	if c.woken != 1 || d.woken != 0 {
		t.Fatalf("wake-ups: c %d, d %d; want c first", c.woken, d.woken)
	}
	if act := c.c.Dequeued(40); act != Dial || c.c.Target() == a.c.Target() {
		t.Fatalf("c woken: %v to %v", act, c.c.Target())
	}
	b.enqueue(t)
	if n := g.gate.Length(); n != 2 {
		t.Fatalf("queue length %d, want 2 (d, then b)", n)
	}
	// A wake-up that comes twice is taken once.
	if act := c.c.Dequeued(41); act != Continue {
		t.Fatalf("second wake-up: %v", act)
	}

	// d's wait ends at its deadline.
	if act := d.c.Expired(20 + int64(time.Second)); act != Close {
		t.Fatalf("d at its deadline: %v", act)
	}
	if d.c.Termination() != accesslog.QueueTimeout || !errors.Is(d.c.Err, ErrQueueTimeout) {
		t.Fatalf("d ended %v: %v", d.c.Termination(), d.c.Err)
	}
	if n := g.gate.Length(); n != 1 {
		t.Fatalf("queue length %d after the timeout, want 1", n)
	}
	// a closes: b, now first, is woken and takes a's place.
	aTarget := a.c.Target()
	a.c.Close(nil)
	if b.woken != 1 {
		t.Fatalf("b woken %d times", b.woken)
	}
	if act := b.c.Dequeued(50); act != Dial || b.c.Target() != aTarget {
		t.Fatalf("b woken: %v to %v", act, b.c.Target())
	}
	if held := g.targets[0].Held() + g.targets[1].Held(); held != 2 {
		t.Fatalf("places held %d, want 2", held)
	}
	b.c.Close(nil)
	c.c.Close(nil)
	if held := g.targets[0].Held() + g.targets[1].Held(); held != 0 || g.gate.Queueing() {
		t.Fatalf("after every close: places held %d, queueing %v", held, g.gate.Queueing())
	}
	count, _, _ := g.gate.Wait.Snapshot()
	if count != 3 { // c and b served, d timed out
		t.Fatalf("waits observed %d, want 3", count)
	}
}

// A full queue refuses: the connection ends as max_conns.
func TestQueueFullRefuses(t *testing.T) {
	g := newGated(1, 1, time.Second, 1)
	cfg := Config{Picker: &g.b}
	var stats Stats
	a, _ := g.conn(t, &cfg, &stats, 0)
	b, act := g.conn(t, &cfg, &stats, 0)
	if act != Queue {
		t.Fatalf("b: %v", act)
	}
	b.enqueue(t)
	c, act := g.conn(t, &cfg, &stats, 0)
	if act != Queue {
		t.Fatalf("c: %v", act)
	}
	if act := c.c.Enqueue(func() { t.Error("c woken") }); act != Close {
		t.Fatalf("c with the queue full: %v", act)
	}
	if c.c.Termination() != accesslog.MaxConns || !errors.Is(c.c.Err, ErrQueueFull) {
		t.Fatalf("c ended %v: %v", c.c.Termination(), c.c.Err)
	}
	// b closes while it waits (its client left, or shutdown): the queue
	// forgets it, and a's place, given back, wakes no one.
	b.c.Close(errors.New("client reset"))
	a.c.Close(nil)
	if g.gate.Length() != 0 || g.gate.Queueing() || b.woken != 0 || g.targets[0].Held() != 0 {
		t.Fatalf("length %d, queueing %v, b woken %d, held %d", g.gate.Length(), g.gate.Queueing(), b.woken, g.targets[0].Held())
	}
}

// With no queue, a connection that finds every place taken is refused at
// once.
func TestNoQueueRefusesAtTheCap(t *testing.T) {
	g := newGated(1, 0, time.Second, 1)
	cfg := Config{Picker: &g.b}
	var stats Stats
	g.conn(t, &cfg, &stats, 0)
	b, act := g.conn(t, &cfg, &stats, 0)
	if act != Queue {
		t.Fatalf("b: %v", act)
	}
	if act := b.c.Enqueue(func() {}); act != Close || b.c.Termination() != accesslog.MaxConns {
		t.Fatalf("b: %v, ended %v", act, b.c.Termination())
	}
}

// A connection woken that finds every place taken after all (another
// target's place was announced, then taken) queues again in its turn, and
// its wait still counts from its first entry.
func TestWokenWithoutAPlaceQueuesFirst(t *testing.T) {
	g := newGated(1, 10, time.Second, 1)
	cfg := Config{Picker: &g.b}
	var stats Stats
	a, _ := g.conn(t, &cfg, &stats, 0)
	b, _ := g.conn(t, &cfg, &stats, 5)
	b.enqueue(t)
	c, _ := g.conn(t, &cfg, &stats, 6)
	c.enqueue(t)
	g.gate.WakeAll() // as a pool closing does
	if b.woken != 1 || c.woken != 1 {
		t.Fatalf("woken b %d c %d", b.woken, c.woken)
	}
	// c picks first this time: no place (a holds it): it queues again,
	// then b, which goes back ahead of it.
	if act := c.c.Dequeued(7); act != Queue {
		t.Fatalf("c: %v", act)
	}
	c.enqueue(t)
	if act := b.c.Dequeued(8); act != Queue {
		t.Fatalf("b: %v", act)
	}
	b.enqueue(t)
	if d := b.c.Deadline(); d != 5+int64(time.Second) {
		t.Fatalf("b's deadline %d moved", d)
	}
	a.c.Close(nil)
	if b.woken != 2 || c.woken != 1 {
		t.Fatalf("after a's close: b woken %d, c %d; want b (first in)", b.woken, c.woken)
	}
}

// Over the cap a target is passed over, and backups are not offered for a
// busy target (they stand in for dead ones): the connection queues.
func TestFullTargetsPassedOverNotBackedUp(t *testing.T) {
	g := &gated{gate: balancer.NewGate()}
	g.gate.Set(1, 5, time.Second)
	g.b.SetGate(g.gate)
	p1, p2, backup := g.b.NewTarget("p1:1"), g.b.NewTarget("p2:1"), g.b.NewTarget("b:1")
	g.b.UpdateWithFallback(balancer.RoundRobin, []balancer.Entry{{T: p1, W: 1}, {T: p2, W: 1}}, []*balancer.Target{backup})
	cfg := Config{Picker: &g.b, Settings: Settings{Retries: 5}}
	var stats Stats
	a, _ := g.conn(t, &cfg, &stats, 0)
	a.c.Dialed(0)
	// b's first try fails: the next primary is at its cap, so b is not
	// sent to the backup but queues.
	b, act := g.conn(t, &cfg, &stats, 0)
	if act != Dial {
		t.Fatalf("b: %v", act)
	}
	if act := b.c.DialFailed(errors.New("refused"), 0); act != Queue {
		t.Fatalf("b after a failed dial, the other primary full: %v to %v", act, b.c.Target())
	}
	if backup.Held() != 0 {
		t.Fatal("the backup was taken")
	}
}

// A place given back after a connection found every target at its cap but
// before it entered the queue (nobody waited, so the release woke no one)
// wakes it as it enters.
func TestPlaceGivenBackBeforeEnqueue(t *testing.T) {
	g := newGated(1, 10, time.Second, 1)
	cfg := Config{Picker: &g.b}
	var stats Stats
	a, _ := g.conn(t, &cfg, &stats, 0)
	b, act := g.conn(t, &cfg, &stats, 0)
	if act != Queue {
		t.Fatalf("b: %v", act)
	}
	a.c.Close(nil)
	b.enqueue(t)
	if b.woken != 1 {
		t.Fatalf("b woken %d times: it waits beside a free place", b.woken)
	}
	if act := b.c.Dequeued(1); act != Dial {
		t.Fatalf("b woken: %v", act)
	}
}
