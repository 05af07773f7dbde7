package balancer

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

func hashEntries(n int, weight func(i int) int) []Entry {
	es := make([]Entry, n)
	for i := range es {
		es[i] = Entry{T: NewTarget(fmt.Sprintf("10.0.%d.%d:80", i/250, i%250+1)), W: weight(i)}
	}
	return es
}

func one(int) int { return 1 }

// clientKey is the key the proxy makes of a client address.
func clientKey(i int) uint64 {
	a := netip.AddrFrom4([4]byte{127, byte(i >> 16), byte(i >> 8), byte(i)}).As16()
	return HashBytes(a[:])
}

// mapping is every key's target address.
func mapping(b *Balancer, keys int) []string {
	out := make([]string, keys)
	for k := range out {
		c := b.PickKey(clientKey(k))
		out[k] = c.Next().Addr
	}
	return out
}

// Two processes with the same targets (in any order) map every key to the
// same target.
func TestHashSameMappingAnyOrder(t *testing.T) {
	es := hashEntries(50, one)
	var a, b Balancer
	a.Update(Hash, es)
	shuffled := slices.Clone(es)
	rand.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
	b.Update(Hash, shuffled)
	ma, mb := mapping(&a, 10_000), mapping(&b, 10_000)
	for k := range ma {
		if ma[k] != mb[k] {
			t.Fatalf("key %d: %s in one, %s in the other", k, ma[k], mb[k])
		}
	}
}

// Adding or removing one of N targets moves about 1/N of the keys: within
// 1.2x of the ideal at N = 3, 10, 100 and 1,000.
func TestHashMovesItsShare(t *testing.T) {
	const keys = 50_000
	for _, n := range []int{3, 10, 100, 1000} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			es := hashEntries(n+1, one)
			var b Balancer
			b.Update(Hash, es[:n])
			before := mapping(&b, keys)
			b.Update(Hash, es) // one added
			added := mapping(&b, keys)
			b.Update(Hash, es[1:]) // the first removed (of N+1)
			removed := mapping(&b, keys)
			moved := func(x, y []string) float64 {
				m := 0
				for k := range x {
					if x[k] != y[k] {
						m++
					}
				}
				return float64(m) / keys
			}
			ideal := 1 / float64(n+1)
			// Sampling noise on 50,000 keys: a few sigma of sqrt(p/keys).
			slack := 0.2*ideal + 4*sqrt(ideal/keys)
			if got := moved(before, added); got > ideal+slack {
				t.Errorf("added one to %d: %.4f of the keys moved, ideal %.4f", n, got, ideal)
			} else {
				t.Logf("N=%d, one added: %.4f of the keys moved (ideal %.4f, %.2fx)", n, got, ideal, got/ideal)
			}
			if got := moved(added, removed); got > ideal+slack {
				t.Errorf("removed one of %d: %.4f of the keys moved, ideal %.4f", n+1, got, ideal)
			} else {
				t.Logf("N=%d, one removed: %.4f of the keys moved (ideal %.4f, %.2fx)", n+1, got, ideal, got/ideal)
			}
		})
	}
}

func sqrt(x float64) float64 {
	z := x
	for range 30 {
		z = (z + x/z) / 2
	}
	return z
}

// Keys spread as the weights say.
func TestHashFollowsWeights(t *testing.T) {
	es := hashEntries(3, func(i int) int { return i + 1 }) // 1:2:3
	var b Balancer
	b.Update(Hash, es)
	count := map[string]int{}
	const keys = 60_000
	for _, a := range mapping(&b, keys) {
		count[a]++
	}
	for i, e := range es {
		want := float64(keys) * float64(i+1) / 6
		if got := float64(count[e.T.Addr]); got < want*0.92 || got > want*1.08 {
			t.Errorf("%s (weight %d): %v keys, want %v ±8%%", e.T.Addr, i+1, got, want)
		}
	}
}

// boundedHash publishes n targets of b's own, weight 1 each, under the
// hash policy with a bound of 1.25, and returns them.
func boundedHash(b *Balancer, n int) []Entry {
	es := make([]Entry, n)
	for i := range es {
		es[i] = Entry{T: b.NewTarget(fmt.Sprintf("10.0.0.%d:80", i+1)), W: 1}
	}
	b.SetHash(1.25, false)
	b.Update(Hash, es)
	return es
}

// Bounded load: with most keys the same, no target holds more than the
// factor times the mean of open connections (plus the one being placed).
func TestHashBoundedLoad(t *testing.T) {
	var b Balancer
	es := boundedHash(&b, 4)
	const conns = 1000
	for k := range conns {
		key := clientKey(7) // a hot key
		if k%5 == 0 {
			key = clientKey(k)
		}
		c := b.PickKey(key)
		c.Next().AddActive(1)
	}
	for _, e := range es {
		limit := 1.25*conns/4 + 1
		if a := float64(e.T.Active.Load()); a > limit {
			t.Errorf("%s holds %v of %d connections, over 1.25x the mean (%v)", e.T.Addr, a, conns, limit)
		}
	}
	// Unbounded, the hot key's target takes them all.
	var u Balancer
	ues := hashEntries(4, one)
	u.Update(Hash, ues)
	c := u.PickKey(clientKey(7))
	first := c.Next()
	for range 10 {
		first.AddActive(1)
		c := u.PickKey(clientKey(7))
		if got := c.Next(); got != first {
			t.Fatalf("unbounded: the hot key moved to %s", got.Addr)
		}
	}
}

func TestHashPickAllocatesNothing(t *testing.T) {
	var b Balancer
	boundedHash(&b, 100)
	k := 0
	if n := testing.AllocsPerRun(1000, func() {
		c := b.PickKey(clientKey(k))
		c.Next()
		k++
	}); n != 0 {
		t.Fatalf("PickKey allocates %v times", n)
	}
}
