package balancer

import (
	"sync"
	"sync/atomic"
	"time"
)

// Gate caps the connections each target of a pool holds at once
// (max_conns_per_target) and queues, first in first out, the connections
// that find every target at its cap (queue: {size, timeout}), as HAProxy's
// per-server maxconn and queue do.
//
// A target's place is taken when a Cursor offers it (Next) and given back
// with Release when that attempt ends, whether it failed or the connection
// closed: a place is held from the pick, through the dial, to the close.
// Each Release with connections queued wakes the first of them, which picks
// again (ahead of any newcomer: while one waits or has been woken and not
// yet picked, a new connection queues behind it); a picker published with
// room (a target turned live, a higher cap) wakes as many as it has room
// for.
//
// The zero Gate is not used: NewGate. A pool owns one; its pickers carry
// it (Balancer.SetGate). Every method is safe for concurrent use: the
// queue is guarded by mu, which is never held across a call out (a wake
// function runs after it is released).
type Gate struct {
	// Settings, changed by Set while connections use them.
	max     atomic.Int64 // places a target; 0 no cap
	size    atomic.Int64 // connections that may wait; 0 no queue
	timeout atomic.Int64 // how long one may wait, nanoseconds

	// busy counts the connections waiting plus those woken that have yet
	// to pick: read without mu on every new connection's path.
	busy atomic.Int64
	// released counts the places given back and the pickers published
	// (which may bring places): a connection reads it before it picks
	// (Seq) and Enter compares, so that a place given back between a pick
	// that found none and the Enter that follows is not missed.
	released atomic.Uint32

	mu         sync.Mutex
	head, tail *Waiter
	waiting    int
	// spare counts places given back while every connection in busy had
	// been woken already: the next to queue is woken at once for each.
	spare int

	// Wait is how long connections waited, served or not.
	Wait WaitHistogram
}

// NewGate returns a gate with no cap and no queue.
func NewGate() *Gate { return &Gate{} }

// Set changes the cap, the queue's size and its timeout. A lower cap
// takes no place back (the connections over it finish first); a higher
// one, or a bigger queue, applies to the next connections.
func (g *Gate) Set(perTarget, size int, timeout time.Duration) {
	g.max.Store(int64(max(perTarget, 0)))
	g.size.Store(int64(max(size, 0)))
	g.timeout.Store(int64(timeout))
}

// Cap is the places a target has; 0: no cap.
func (g *Gate) Cap() int { return int(g.max.Load()) }

// Timeout is how long a connection may wait in the queue.
func (g *Gate) Timeout() time.Duration { return time.Duration(g.timeout.Load()) }

// Length is the number of connections waiting now.
func (g *Gate) Length() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.waiting
}

// Queueing reports whether connections wait (or have been woken and not
// yet picked): a new connection then queues behind them.
func (g *Gate) Queueing() bool { return g.busy.Load() > 0 }

// take takes one of t's places, if it has one free.
func (g *Gate) take(t *Target) bool {
	limit := g.max.Load()
	for {
		n := t.held.Load()
		if limit > 0 && n >= limit {
			return false
		}
		if t.held.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// Seq is read before a pick, for the Enter that may follow (see released).
func (g *Gate) Seq() uint32 { return g.released.Load() }

// Release gives back a place of t's, taken by a Cursor of this gate's
// pickers, and wakes the first connection waiting, if any.
func (g *Gate) Release(t *Target) {
	t.held.Add(-1)
	g.released.Add(1)
	if g.busy.Load() > 0 {
		g.wakeOne()
	}
}

// Held is the places of t's taken: connections dialling or open to it
// through a gate.
func (t *Target) Held() int64 { return t.held.Load() }

// WaiterState is where a Waiter stands.
type WaiterState uint8

const (
	NotWaiting WaiterState = iota
	Waiting                // in the queue
	Woken                  // out of the queue, told to pick again
	Picking                // woken, picking now (Woke)
)

// Waiter is one connection's place in a Gate's queue. Its owner (the
// connection) keeps it where it does not move until it has left the
// queue; the gate links it in and out under its mutex.
type Waiter struct {
	prev, next *Waiter
	state      WaiterState // guarded by the gate's mu
	since      int64       // when its connection first queued
	// wake is called, outside the gate's lock, once the waiter is woken:
	// it must not block (a driver posts the wake-up to the connection's
	// owner).
	wake func()
}

// Enter queues w, which wake will tell when the connection should pick
// again; since is when the connection first queued, seen what Seq said
// before the pick that found no place. A connection woken that found no
// place after all (again: true) keeps its turn: it goes back ahead of
// every connection that queued after it. Enter reports false when the
// queue is full (or there is none): the connection is refused. A place
// given back while no one was queued to take it, or since seen, wakes the
// first waiter at once.
func (g *Gate) Enter(w *Waiter, wake func(), since int64, again bool, seen uint32) bool {
	g.mu.Lock()
	size := g.size.Load()
	if w.state != NotWaiting || size == 0 || (!again && int64(g.waiting) >= size) {
		g.mu.Unlock()
		return false
	}
	w.wake, w.state, w.since = wake, Waiting, since
	// after is the waiter w goes behind: the last that queued before it.
	after := g.tail
	if again {
		after = nil
		for x := g.head; x != nil && x.since <= since; x = x.next {
			after = x
		}
	}
	w.prev = after
	if after != nil {
		w.next = after.next
		after.next = w
	} else {
		w.next = g.head
		g.head = w
	}
	if w.next != nil {
		w.next.prev = w
	} else {
		g.tail = w
	}
	g.waiting++
	g.busy.Add(1)
	// After busy counts w: a Release from here on wakes the head itself;
	// one before, that found busy 0, changed released.
	var f func()
	switch {
	case g.spare > 0:
		g.spare--
		f = g.popLocked()
	case g.released.Load() != seen:
		f = g.popLocked()
	}
	g.mu.Unlock()
	if f != nil {
		f()
	}
	return true
}

// Woke says that w's connection, woken, picks now; Picked that it has.
// Until then it holds newcomers back, so that none takes the place it
// was woken for. Woke reports whether w had been woken (false: it left).
func (g *Gate) Woke(w *Waiter) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if w.state != Woken {
		return false
	}
	w.state = Picking
	return true
}

// Picked ends a Woke: w is out of the gate (it may Enter again).
func (g *Gate) Picked(w *Waiter) {
	g.mu.Lock()
	if w.state == Picking {
		w.state = NotWaiting
		g.settleLocked()
	}
	g.mu.Unlock()
}

// settleLocked counts one connection out of busy.
func (g *Gate) settleLocked() {
	if g.busy.Add(-1) == 0 {
		g.spare = 0 // newcomers pick for themselves again
	}
}

// Leave takes w out of the queue (its connection timed out or closed). A
// waiter woken that leaves before it picked passes its turn to the next.
func (g *Gate) Leave(w *Waiter) {
	g.mu.Lock()
	var f func()
	switch w.state {
	case NotWaiting:
		g.mu.Unlock()
		return
	case Waiting:
		g.unlink(w)
		g.waiting--
		w.wake = nil
	case Woken, Picking:
		f = g.passLocked()
	}
	w.state = NotWaiting
	g.settleLocked()
	g.mu.Unlock()
	if f != nil {
		f()
	}
}

func (g *Gate) unlink(w *Waiter) {
	if w.prev != nil {
		w.prev.next = w.next
	} else {
		g.head = w.next
	}
	if w.next != nil {
		w.next.prev = w.prev
	} else {
		g.tail = w.prev
	}
	w.prev, w.next = nil, nil
}

// popLocked wakes the first waiter: it returns the function to call, once
// mu is released.
func (g *Gate) popLocked() func() {
	w := g.head
	g.unlink(w)
	g.waiting--
	w.state = Woken
	f := w.wake
	w.wake = nil
	return f
}

// passLocked hands a place given back to the first waiter; with none
// queued (every connection counted in busy has been woken already), the
// place is kept as spare for the next to queue, which is woken at once.
func (g *Gate) passLocked() func() {
	if g.head != nil {
		return g.popLocked()
	}
	if g.busy.Load() > 0 {
		g.spare++
	}
	return nil
}

// wakeOne passes on one place given back.
func (g *Gate) wakeOne() {
	g.mu.Lock()
	f := g.passLocked()
	g.mu.Unlock()
	if f != nil {
		f()
	}
}

// wake wakes up to n waiters, first in first out.
func (g *Gate) wake(n int) {
	var buf [8]func()
	wakes := buf[:0]
	g.mu.Lock()
	for ; n > 0 && g.head != nil; n-- {
		wakes = append(wakes, g.popLocked())
	}
	g.mu.Unlock()
	for _, f := range wakes {
		f()
	}
}

// WakeAll wakes every waiter (the pool is closing: they pick from its last
// picker rather than wait out their timeout).
func (g *Gate) WakeAll() { g.wake(int(^uint(0) >> 1)) }

// refill wakes as many waiters as the targets have free places.
func (g *Gate) refill(set, fallback []*Target) {
	g.released.Add(1)
	if g.busy.Load() == 0 {
		return
	}
	limit := g.max.Load()
	if limit == 0 {
		g.WakeAll()
		return
	}
	free := 0
	for _, ts := range [][]*Target{set, fallback} {
		for _, t := range ts {
			free += int(max(limit-t.held.Load(), 0))
		}
	}
	if free > 0 {
		g.wake(free)
	}
}

// WaitBuckets are the upper bounds, in seconds, of rota_queue_wait_seconds'
// buckets.
var WaitBuckets = [...]float64{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// WaitHistogram counts waits by WaitBuckets (each bucket its own, not
// cumulative), with their sum: atomics, so connections record without a
// lock and a scrape reads without stopping them.
type WaitHistogram struct {
	counts [len(WaitBuckets) + 1]atomic.Uint64 // the last: above every bound
	sumNs  atomic.Uint64
}

// Observe records a wait of d.
func (h *WaitHistogram) Observe(d time.Duration) {
	s := d.Seconds()
	i := 0
	for i < len(WaitBuckets) && s > WaitBuckets[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sumNs.Add(uint64(max(d, 0)))
}

// Snapshot returns the count, the sum in seconds and the cumulative count
// at each of WaitBuckets' bounds.
func (h *WaitHistogram) Snapshot() (count uint64, sum float64, cumulative map[float64]uint64) {
	cumulative = make(map[float64]uint64, len(WaitBuckets))
	for i, b := range WaitBuckets {
		count += h.counts[i].Load()
		cumulative[b] = count
	}
	count += h.counts[len(WaitBuckets)].Load()
	return count, float64(h.sumNs.Load()) / 1e9, cumulative
}
