package health

import (
	"math/rand/v2"
	"testing"
	"time"
)

// The heap yields targets in the order of their nextAt through pushes,
// reschedules (fix after nextAt changes) and removals, with every target's
// position kept in idx, and untilTop reads the first one's due time right.
func TestTargetHeapOrder(t *testing.T) {
	var h targetHeap
	base := time.Now()
	ts := make([]*target, 500)
	for i := range ts {
		ts[i] = &target{nextAt: base.Add(time.Duration(rand.IntN(1e6)))}
		h.push(ts[i])
	}
	for range 300 { // reschedule some
		tg := ts[rand.IntN(len(ts))]
		tg.nextAt = base.Add(time.Duration(rand.IntN(1e6)) - 5e5)
		h.fix(tg.idx - 1)
	}
	removed := map[*target]bool{}
	for range 100 {
		tg := ts[rand.IntN(len(ts))]
		if tg.idx > 0 {
			h.remove(tg.idx - 1)
			removed[tg] = true
		}
	}
	for i, s := range h.ts {
		if s.t.idx != i+1 {
			t.Fatalf("slot %d holds a target whose idx is %d", i, s.t.idx)
		}
	}
	var last time.Time
	n := h.len()
	for i := range n {
		if got, want := h.untilTop(base), h.top().nextAt.Sub(base); got != want {
			t.Fatalf("pop %d: untilTop says %v, the target %v", i, got, want)
		}
		tg := h.pop()
		if removed[tg] || tg.idx != 0 {
			t.Fatalf("popped a removed target, or one still placed (idx %d)", tg.idx)
		}
		if i > 0 && tg.nextAt.Before(last) {
			t.Fatalf("pop %d: %v before the previous %v", i, tg.nextAt, last)
		}
		last = tg.nextAt
	}
	if n+len(removed) != len(ts) {
		t.Fatalf("popped %d and removed %d of %d", n, len(removed), len(ts))
	}
}

// The scheduler's cycle at 10,000 targets: the first due is popped and
// pushed back an interval (±10%) later.
func BenchmarkTargetHeapCycle(b *testing.B) {
	var h targetHeap
	base := time.Now()
	const n, interval = 10_000, int64(2 * time.Second)
	// Targets apart in memory, as a process's are after hours of
	// churn: each in its own cache lines, far from the heap's slots.
	spread := make([][]byte, 0, n)
	for range n {
		h.push(&target{nextAt: base.Add(time.Duration(rand.Int64N(interval)))})
		spread = append(spread, make([]byte, 1024))
	}
	r := rand.New(rand.NewPCG(1, 2))
	b.ResetTimer()
	for range b.N {
		t := h.pop()
		t.nextAt = t.nextAt.Add(time.Duration(interval*9/10 + r.Int64N(interval/5)))
		h.push(t)
	}
	b.StopTimer()
	_ = spread
}
