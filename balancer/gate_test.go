package balancer

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Many connections at once through a gate of 3 targets x 2 places: no
// target ever holds more than its cap, every connection is served (the
// queue is large enough and every place given back wakes one), and at the
// end nothing is held or waiting. The waiting side is a connection's own:
// pick, queue when every place is taken, pick again when woken.
func TestGateUnderContention(t *testing.T) {
	var b Balancer
	g := NewGate()
	g.Set(2, 1000, time.Minute)
	b.SetGate(g)
	var es []Entry
	for _, a := range []string{"a:1", "b:1", "c:1"} {
		es = append(es, Entry{T: b.NewTarget(a), W: 1})
	}
	b.Update(RoundRobin, es)

	var peak atomic.Int64
	var served atomic.Int64
	var wg sync.WaitGroup
	const conns = 400
	for range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var w Waiter
			woken := false
			for {
				c := b.Pick()
				seen := g.Seq()
				if !woken && g.Queueing() {
					// A newcomer queues behind those waiting.
				} else if tg := c.Next(); tg != nil {
					if woken {
						g.Picked(&w)
					}
					n := tg.Held()
					for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
					}
					served.Add(1)
					c.Release(tg)
					return
				} else if woken {
					g.Picked(&w)
				}
				ch := make(chan struct{}, 1)
				if !g.Enter(&w, func() { ch <- struct{}{} }, 0, woken, seen) {
					t.Error("queue refused a connection")
					return
				}
				select {
				case <-ch:
				case <-time.After(20 * time.Second):
					t.Error("a waiter was never woken")
					g.Leave(&w)
					return
				}
				woken = g.Woke(&w)
				if !woken {
					t.Error("woken, but Woke says not")
					return
				}
			}
		}()
	}
	wg.Wait()
	if p := peak.Load(); p > 2 {
		t.Errorf("a target held %d places, cap 2", p)
	}
	if served.Load() != conns {
		t.Errorf("served %d of %d", served.Load(), conns)
	}
	for _, e := range es {
		if e.T.Held() != 0 {
			t.Errorf("%s holds %d places at the end", e.T.Addr, e.T.Held())
		}
	}
	if g.Queueing() || g.Length() != 0 {
		t.Errorf("at the end: queueing %v, length %d", g.Queueing(), g.Length())
	}
}

// A picker published with room wakes as many waiters as it has places,
// first in first out.
func TestGateRefillOnUpdate(t *testing.T) {
	var b Balancer
	g := NewGate()
	g.Set(1, 10, time.Minute)
	b.SetGate(g)
	a := b.NewTarget("a:1")
	b.Update(RoundRobin, []Entry{{T: a, W: 1}})
	c := b.Pick()
	if c.Next() != a {
		t.Fatal("no place on a")
	}
	woke := make([]int, 3)
	ws := make([]Waiter, 3)
	for i := range ws {
		if !g.Enter(&ws[i], func() { woke[i]++ }, int64(i), false, g.Seq()) {
			t.Fatal("refused")
		}
	}
	b.Update(RoundRobin, []Entry{{T: a, W: 1}, {T: b.NewTarget("b:1"), W: 1}, {T: b.NewTarget("c:1"), W: 1}})
	if woke[0] != 1 || woke[1] != 1 || woke[2] != 0 {
		t.Fatalf("woken %v, want the first two (two new places)", woke)
	}
	// Raising the cap makes room too.
	g.Set(2, 10, time.Minute)
	b.Update(RoundRobin, []Entry{{T: a, W: 1}})
	if woke[2] != 1 {
		t.Fatalf("woken %v after the cap rose", woke)
	}
}

// A place given back while every waiter has been woken already is kept
// for the next to queue, which is woken at once: no place stays free
// while a connection waits for one.
func TestGateSparePlace(t *testing.T) {
	var b Balancer
	g := NewGate()
	g.Set(2, 10, time.Minute)
	b.SetGate(g)
	a := b.NewTarget("a:1")
	b.Update(RoundRobin, []Entry{{T: a, W: 1}})
	x, y, z := b.Pick(), b.Pick(), b.Pick()
	if x.Next() != a || y.Next() != a || z.Next() != nil {
		t.Fatal("a should have exactly two places")
	}
	var w1, w2 Waiter
	woke1, woke2 := 0, 0
	g.Enter(&w1, func() { woke1++ }, 1, false, g.Seq())
	x.Release(a) // wakes w1
	y.Release(a) // nobody queued (w1 woken, not yet picked): spare
	if woke1 != 1 {
		t.Fatalf("w1 woken %d times", woke1)
	}
	g.Enter(&w2, func() { woke2++ }, 2, false, g.Seq())
	if woke2 != 1 {
		t.Fatalf("w2 woken %d times: the spare place was not passed on", woke2)
	}
	for _, w := range []*Waiter{&w1, &w2} {
		if !g.Woke(w) {
			t.Fatal("not woken")
		}
		g.Picked(w)
	}
	if g.Queueing() || g.Length() != 0 || a.Held() != 0 {
		t.Fatalf("queueing %v, length %d, held %d", g.Queueing(), g.Length(), a.Held())
	}
	// With nobody counted, the spare is dropped: a later queue starts
	// without it.
	p1, p2 := b.Pick(), b.Pick()
	p1.Next()
	p2.Next()
	var w3 Waiter
	g.Enter(&w3, func() { t.Error("w3 woken with both places taken") }, 3, false, g.Seq())
	g.Leave(&w3)
}

// A place given back between a pick that found none and the Enter that
// follows (nobody was counted as waiting, so it woke no one) wakes the
// waiter as it enters: no connection waits beside a free place.
func TestGatePlaceGivenBackBeforeEnter(t *testing.T) {
	var b Balancer
	g := NewGate()
	g.Set(1, 10, time.Minute)
	b.SetGate(g)
	a := b.NewTarget("a:1")
	b.Update(RoundRobin, []Entry{{T: a, W: 1}})
	holder := b.Pick()
	holder.Next()
	seen := g.Seq()
	late := b.Pick()
	if late.Next() != nil || !late.Full() {
		t.Fatal("a should be at its cap")
	}
	holder.Release(a) // before late enters
	woken := 0
	var w Waiter
	g.Enter(&w, func() { woken++ }, 0, false, seen)
	if woken != 1 {
		t.Fatalf("the waiter was woken %d times; a place was free as it entered", woken)
	}
	// Without a release in between, it waits.
	g.Woke(&w)
	again := b.Pick()
	if again.Next() != a {
		t.Fatal("no place")
	}
	g.Picked(&w)
	seen = g.Seq()
	var w2 Waiter
	g.Enter(&w2, func() { t.Error("woken with no place given back") }, 1, false, seen)
	g.Leave(&w2)
}
