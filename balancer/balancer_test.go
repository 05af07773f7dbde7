package balancer

import (
	"fmt"
	"math"
	"net/netip"
	"slices"
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
	var b RoundRobinBalancer
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
	var b RoundRobinBalancer
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
	var b RoundRobinBalancer
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
		var b RoundRobinBalancer
		b.Update(ts)
		c := b.Pick()
		first[c.Next().Addr] = true
	}
	if len(first) < 2 {
		t.Fatalf("every balancer started at the same target: %v", first)
	}
}

func TestRotationContinuesAcrossUpdates(t *testing.T) {
	var b RoundRobinBalancer
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
	var b RoundRobinBalancer
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
	var b RoundRobinBalancer
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

func weighted(ts []*Target, ws ...int) []Entry {
	es := make([]Entry, len(ts))
	for i, t := range ts {
		es[i] = Entry{T: t, W: ws[i%len(ws)]}
	}
	return es
}

var policies = []Policy{RoundRobin, LeastConn, RandomTwo, Hash}

// Over 30,000 connections of equal load (each closed before the next),
// every policy splits by weight within 3%.
func TestWeightedSplit(t *testing.T) {
	for _, pol := range policies {
		for _, n := range []int{3, 300} { // the smooth schedule, and the alias table
			t.Run(fmt.Sprintf("%s/%d", pol, n), func(t *testing.T) {
				var b Balancer
				ts := targets(n)
				b.Update(pol, weighted(ts, 1, 2, 3))
				count := map[*Target]int{}
				const picks = 30000
				// Equal load: every connection stays open for the next
				// 20n picks, then closes.
				var open []*Target
				for range picks {
					if len(open) == 20*n {
						open[0].Active.Add(-1)
						open = open[1:]
					}
					c := b.Pick()
					tg := c.Next()
					tg.Active.Add(1)
					open = append(open, tg)
					count[tg]++
				}
				byWeight := map[int]int{}
				for i, tg := range ts {
					byWeight[[]int{1, 2, 3}[i%3]] += count[tg]
				}
				for w, got := range byWeight {
					want := float64(picks) * float64(w) / 6
					if d := (float64(got) - want) / want; d > 0.03 || d < -0.03 {
						t.Errorf("weight %d got %d picks, want %.0f ±3%% (%+.1f%%)", w, got, want, 100*d)
					}
				}
			})
		}
	}
}

// Round-robin spreads a heavy target's picks out: with 1:1:3 it is never
// picked three times in a row (nginx's smooth weighted round-robin).
func TestRoundRobinIsSmooth(t *testing.T) {
	var b Balancer
	ts := targets(3)
	b.Update(RoundRobin, weighted(ts, 1, 1, 3))
	run, prev := 0, (*Target)(nil)
	for range 1000 {
		c := b.Pick()
		tg := c.Next()
		if tg == prev {
			run++
		} else {
			run = 1
		}
		prev = tg
		if run >= 3 {
			t.Fatalf("%s picked %d times in a row", tg.Addr, run)
		}
	}
}

// With equal weights round-robin is the plain rotation.
func TestEqualWeightsRotate(t *testing.T) {
	var b Balancer
	ts := targets(4)
	b.Update(RoundRobin, weighted(ts, 5))
	c := b.Pick()
	first := c.Next()
	i := slices.Index(ts, first)
	for k := 1; k < 12; k++ {
		c := b.Pick()
		if got, want := c.Next(), ts[(i+k)%4]; got != want {
			t.Fatalf("pick %d: %s, want %s", k, got.Addr, want.Addr)
		}
	}
}

// least_conn sends new connections to the target with the fewest open
// ones relative to its weight; ties rotate.
func TestLeastConn(t *testing.T) {
	var b Balancer
	ts := targets(3)
	b.Update(LeastConn, weighted(ts, 1))
	ts[0].Active.Store(5)
	ts[1].Active.Store(2)
	ts[2].Active.Store(9)
	for range 10 {
		c := b.Pick()
		if got := c.Next(); got != ts[1] {
			t.Fatalf("picked %s with %d open, want the least loaded", got.Addr, got.Active.Load())
		}
	}
	// Relative to weight: 9 open on weight 6 is lighter than 2 on weight 1.
	b.Update(LeastConn, []Entry{{ts[0], 1}, {ts[1], 1}, {ts[2], 6}})
	c := b.Pick()
	if got := c.Next(); got != ts[2] {
		t.Fatalf("picked %s, want the target lightest for its weight", got.Addr)
	}
	// Ties rotate.
	for _, tg := range ts {
		tg.Active.Store(0)
	}
	b.Update(LeastConn, weighted(ts, 1))
	seen := map[*Target]bool{}
	for range 3 {
		c := b.Pick()
		seen[c.Next()] = true
	}
	if len(seen) != 3 {
		t.Fatalf("equal loads picked %d distinct targets in 3 picks, want rotation", len(seen))
	}
}

// Beyond the window, least_conn still balances: connections that stay open
// spread so that no target carries more than one above another, and a
// target with many more open than the rest is never picked while they are
// lighter.
func TestLeastConnBeyondTheWindow(t *testing.T) {
	var b Balancer
	ts := targets(1000)
	b.Update(LeastConn, weighted(ts, 1))
	ts[500].Active.Store(1 << 20) // stuck with long connections
	for range 50_000 {
		c := b.Pick()
		got := c.Next()
		if got == ts[500] {
			t.Fatal("picked the overloaded target")
		}
		got.Active.Add(1) // the connection stays open
	}
	lo, hi := int64(math.MaxInt64), int64(0)
	for i, tg := range ts {
		if i == 500 {
			continue
		}
		lo, hi = min(lo, tg.Active.Load()), max(hi, tg.Active.Load())
	}
	if hi-lo > 1 {
		t.Fatalf("open connections per target range from %d to %d, want within 1", lo, hi)
	}
}

// Every policy's cursor offers the others once each after its choice.
func TestCursorOffersEveryTargetOnce(t *testing.T) {
	for _, pol := range policies {
		var b Balancer
		ts := targets(5)
		b.Update(pol, weighted(ts, 1, 4))
		c := b.Pick()
		seen := map[*Target]int{}
		for tg := c.Next(); tg != nil; tg = c.Next() {
			seen[tg]++
		}
		if len(seen) != 5 {
			t.Fatalf("%s: cursor offered %d distinct targets of 5", pol, len(seen))
		}
		for tg, n := range seen {
			if n != 1 {
				t.Fatalf("%s: %s offered %d times", pol, tg.Addr, n)
			}
		}
	}
}

func TestPickAllocatesNothingForAnyPolicy(t *testing.T) {
	for _, pol := range policies {
		for _, n := range []int{3, 10_000} {
			var b Balancer
			b.Update(pol, weighted(targets(n), 1, 2, 3))
			k := 0
			allocs := testing.AllocsPerRun(1000, func() {
				c := b.PickFor(clients[k%len(clients)], "")
				k++
				_ = c.Next()
				_ = c.Next()
			})
			if allocs != 0 {
				t.Fatalf("%s with %d targets: Pick allocated %.1f times", pol, n, allocs)
			}
		}
	}
}

type weights struct {
	name string
	w    []int
}

// skewed is one target of weight 1000 and n-1 of weight 1.
func skewed(n int) []int {
	w := make([]int, n)
	for i := range w {
		w[i] = 1
	}
	w[0] = 1000
	return w
}

// clients are 1,024 client addresses, for PickFor.
var clients = func() []netip.Addr {
	out := make([]netip.Addr, 1024)
	for i := range out {
		out[i] = netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
	}
	return out
}()

func BenchmarkPickPolicies(b *testing.B) {
	for _, pol := range policies {
		for _, n := range []int{3, 100, 10_000} {
			// One heavy target among light ones is the worst case for
			// a scheduler that skips light targets' turns.
			for _, ws := range []weights{{"1", []int{1}}, {"1:2:3", []int{1, 2, 3}}, {"1000:1...", skewed(n)}} {
				b.Run(fmt.Sprintf("%s/targets=%d/weights=%s", pol, n, ws.name), func(b *testing.B) {
					var bal Balancer
					bal.Update(pol, weighted(targets(n), ws.w...))
					b.ReportAllocs()
					b.ResetTimer()
					b.RunParallel(func(pb *testing.PB) {
						k := 0
						for pb.Next() {
							// A client's address: hash's key; the others
							// pick as Pick does.
							c := bal.PickFor(clients[k&(len(clients)-1)], "")
							k++
							_ = c.Next()
						}
					})
				})
			}
		}
	}
}

func BenchmarkPick(b *testing.B) {
	for _, n := range []int{3, 100, 1000} {
		b.Run(fmt.Sprintf("targets=%d", n), func(b *testing.B) {
			var rr RoundRobinBalancer
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

// Beyond maxScheduled targets the weights go through an alias table: one
// step of the shared counter (or one random point) per pick whatever the
// weights. The stride scheduler it replaced skipped light targets' turns:
// with one target of weight 1000 among 9,999 of weight 1, about 900 turns
// (20 µs) a pick. Every policy still splits by weight (within 3% over
// 300,000 picks: random_two's draws, all ties here, are binomial, and 3% is
// then 5 standard deviations), and round-robin never picks a target three
// times running.
func TestLargeSetsPickInOneStep(t *testing.T) {
	const n, picks = 10_000, 300_000
	for _, pol := range policies {
		t.Run(string(pol), func(t *testing.T) {
			var b Balancer
			ts := targets(n)
			b.Update(pol, weighted(ts, skewed(n)...))
			seq0 := b.seq.Load()
			heavy, run, prev := 0, 0, (*Target)(nil)
			for range picks {
				c := b.Pick()
				tg := c.Next()
				if tg == ts[0] {
					heavy++
				}
				if tg == prev {
					run++
				} else {
					run = 1
				}
				prev = tg
				if pol == RoundRobin && run >= 3 {
					t.Fatalf("%s picked %d times in a row", tg.Addr, run)
				}
			}
			want := float64(picks) * 1000 / (1000 + n - 1)
			if d := (float64(heavy) - want) / want; d > 0.03 || d < -0.03 {
				t.Errorf("the weight-1000 target got %d picks, want %.0f ±3%% (%+.1f%%)", heavy, want, 100*d)
			}
			steps := b.seq.Load() - seq0
			if pol == RandomTwo {
				if steps != 0 {
					t.Errorf("random_two moved the rotation %d steps", steps)
				}
			} else if steps != picks {
				t.Errorf("%d picks took %d steps of the rotation, want one each", picks, steps)
			}
		})
	}
}

// An alias table gives each target its weight's share of [0, 2^64) (to
// within the 2^-32 rounding of each column).
func TestAliasTableShares(t *testing.T) {
	// Weights whose product with the count passes 2^32: the scaling is
	// exact, not wrapped (x*n<<32 overflowed 64 bits).
	huge := []uint32{math.MaxUint32, 1, 3_000_000_000, 2}
	many := make([]uint32, 1<<20)
	for i := range many {
		many[i] = uint32(1 + i%3)
	}
	many[7] = 1 << 16 // 2^16 * 2^20 = 2^36
	for _, w := range [][]uint32{{1, 2, 3}, {1000, 1, 1, 1, 1}, {7}, {5, 5, 5, 5}, {1, 1000, 999, 3, 64, 2}, huge, many} {
		a := aliasTable(w)
		share := make([]float64, len(w))
		for c, col := range a {
			own := float64(col.cut) / (1 << 32)
			if col.other == uint32(c) {
				own = 1
			}
			share[c] += own
			share[col.other] += 1 - own
		}
		var total float64
		for _, x := range w {
			total += float64(x)
		}
		for i, x := range w {
			want := float64(x) / total * float64(len(w))
			if d := share[i] - want; d > 1e-6 || d < -1e-6 {
				t.Errorf("weights %v: target %d has %.9f columns, want %.9f", w[:min(len(w), 8)], i, share[i], want)
				break
			}
		}
	}
}
