package balancer

import (
	"fmt"
	"sync"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func targets(n int) []*Target {
	out := make([]*Target, n)
	for i := range out {
		out[i] = NewTarget(fmt.Sprintf("127.0.0.1:%d", 9000+i))
	}
	return out
}

func TestZeroValuePicksNothing(t *testing.T) {
	var b RoundRobin
	c := b.Pick()
	if got := c.Next(); got != nil {
		t.Fatalf("zero balancer picked %v", got.Addr)
	}
	b.Update(nil)
	c = b.Pick()
	if got := c.Next(); got != nil {
		t.Fatalf("empty balancer picked %v", got.Addr)
	}
}

func TestRoundRobinExactlyEven(t *testing.T) {
	var b RoundRobin
	ts := targets(3)
	b.Update(ts)
	count := map[string]int{}
	var prev string
	for range 300 {
		c := b.Pick()
		got := c.Next()
		if got.Addr == prev {
			t.Fatalf("same target twice in a row: %s", prev)
		}
		prev = got.Addr
		count[got.Addr]++
	}
	for _, tg := range ts {
		if count[tg.Addr] != 100 {
			t.Fatalf("uneven spread: %v", count)
		}
	}
}

func TestCursorOffersEachTargetOnce(t *testing.T) {
	var b RoundRobin
	b.Update(targets(4))
	c := b.Pick()
	seen := map[string]bool{}
	for tg := c.Next(); tg != nil; tg = c.Next() {
		if seen[tg.Addr] {
			t.Fatalf("cursor offered %s twice", tg.Addr)
		}
		seen[tg.Addr] = true
	}
	if len(seen) != 4 {
		t.Fatalf("cursor offered %d targets, want 4", len(seen))
	}
}

func TestRandomStart(t *testing.T) {
	// With 16 targets, 20 fresh balancers all starting on the same target
	// has probability 16^-19: a failure here means the start is not random.
	first := map[string]bool{}
	ts := targets(16)
	for range 20 {
		var b RoundRobin
		b.Update(ts)
		c := b.Pick()
		first[c.Next().Addr] = true
	}
	if len(first) < 2 {
		t.Fatalf("every balancer started at the same target: %v", first)
	}
}

func TestRotationContinuesAcrossUpdates(t *testing.T) {
	var b RoundRobin
	ts := targets(3)
	b.Update(ts)
	c := b.Pick()
	a := c.Next()
	b.Update(append([]*Target(nil), ts...)) // same set, new slice
	c = b.Pick()
	if c.Next() == a {
		t.Fatalf("rotation restarted after update")
	}
}

func TestPickDoesNotAllocate(t *testing.T) {
	var b RoundRobin
	b.Update(targets(5))
	allocs := testing.AllocsPerRun(1000, func() {
		c := b.Pick()
		for tg := c.Next(); tg != nil; tg = c.Next() {
		}
	})
	if allocs != 0 {
		t.Fatalf("Pick allocated %.1f times per run", allocs)
	}
}

func TestConcurrentPickAndUpdate(t *testing.T) {
	var b RoundRobin
	sets := [][]*Target{targets(1), targets(3), nil, targets(7)}
	var updater, pickers sync.WaitGroup
	stop := make(chan struct{})
	updater.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			b.Update(sets[i%len(sets)])
		}
	})
	for range 4 {
		pickers.Go(func() {
			for range 20000 {
				c := b.Pick()
				n := 0
				for tg := c.Next(); tg != nil; tg = c.Next() {
					if tg.Addr == "" {
						t.Error("picked a target with no address")
						return
					}
					n++
				}
				if n != c.Len() {
					t.Errorf("cursor offered %d of %d targets", n, c.Len())
					return
				}
			}
		})
	}
	pickers.Wait()
	close(stop)
	updater.Wait()
}

func BenchmarkPick(b *testing.B) {
	for _, n := range []int{3, 100, 1000} {
		b.Run(fmt.Sprintf("targets=%d", n), func(b *testing.B) {
			var rr RoundRobin
			rr.Update(targets(n))
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					c := rr.Pick()
					_ = c.Next()
				}
			})
		})
	}
}
