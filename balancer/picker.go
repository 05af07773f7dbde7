package balancer

import (
	"math"
	"math/bits"
	"math/rand/v2"
	"sync/atomic"
)

const (
	// maxSchedule bounds a smooth round-robin schedule (its period, the
	// sum of the weights once reduced), and maxScheduled the targets
	// that get one: building it costs period x targets. Larger sets use
	// an alias table, O(targets) to build and O(1) to pick whatever the
	// weights (a stride scheduler, which skips light targets' turns, took
	// 900 turns a pick with one target of weight 1000 among 9,999 of 1).
	maxSchedule  = 8192
	maxScheduled = 256
	// window bounds the targets least_conn compares per pick: exact up to
	// window targets, beyond that the least loaded of a window that starts
	// at the rotation's choice, so that a pick costs about the same at 3
	// and at 10,000 targets (it was 64: 26 ns against 100). It still
	// balances: at 1,000 targets open connections stay within one of each
	// other (TestLeastConnBeyondTheWindow).
	window = 8
	// golden is 2^64 divided by the golden ratio: multiples of it mod
	// 2^64 (a Weyl sequence) spread over [0, 2^64) as evenly as any
	// sequence can, each new point in the largest gap left.
	golden = 0x9E3779B97F4A7C15
)

// picker is an immutable selection over a set of weighted targets.
type picker struct {
	policy Policy
	set    []*Target
	// fallback is offered, in order, after every target of set: backups,
	// for a connection whose every try of a live target failed.
	fallback []*Target
	w        []uint32 // effective weights, by index in set
	// Round-robin: nil both with equal weights (plain rotation); else a
	// smooth schedule of indices (small sets) or an alias table.
	schedule []uint32
	alias    []column
	ring     *ring         // hash
	bySNI    bool          // hash: the key is the server name
	open     *atomic.Int64 // the balancer's open connections
	gate     *Gate         // caps the targets' connections; nil none
}

// column is one column of Vose's alias table: a point u in the column
// picks the column's own target if its position in the column is below
// cut/2^32, else target other (a full column has other = itself).
type column struct{ cut, other uint32 }

func newPicker(policy Policy, entries []Entry, bound float64) *picker {
	p := &picker{policy: policy, set: make([]*Target, len(entries)), w: make([]uint32, len(entries))}
	if p.policy == "" {
		p.policy = RoundRobin
	}
	equal := true
	for i, e := range entries {
		p.set[i] = e.T
		p.w[i] = uint32(max(e.W, 1))
		equal = equal && p.w[i] == p.w[0]
	}
	if p.policy == Hash && len(p.set) > 0 {
		p.ring = newRing(p.set, p.w, bound)
	}
	// Unequal weights weigh in every policy's first candidates: the
	// round-robin order, least_conn's ties, random_two's draws (and
	// hash's Pick without a key).
	if !equal {
		if len(p.w) <= maxScheduled {
			p.schedule = smoothSchedule(p.w)
		} else {
			p.alias = aliasTable(p.w)
		}
	}
	return p
}

// pick returns the index of the policy's choice; seq is the balancer's
// shared counter.
func (p *picker) pick(seq *atomic.Uint64) int {
	switch p.policy {
	case LeastConn:
		return p.leastConn(p.rotation(seq))
	case RandomTwo:
		return p.randomTwo()
	}
	return p.rotation(seq)
}

// rotation is the weighted round-robin's next index.
func (p *picker) rotation(seq *atomic.Uint64) int {
	switch {
	case p.schedule != nil:
		return int(p.schedule[(seq.Add(1)-1)%uint64(len(p.schedule))])
	case p.alias != nil:
		// The counter's Weyl point: deterministic and evenly spread, so
		// each target's share of any run of picks is close to its weight.
		return p.at((seq.Add(1) - 1) * golden)
	}
	return int((seq.Add(1) - 1) % uint64(len(p.set)))
}

// draw is a random index, each as likely as its weight.
func (p *picker) draw() int {
	switch {
	case p.schedule != nil:
		return int(p.schedule[rand.IntN(len(p.schedule))])
	case p.alias != nil:
		return p.at(rand.Uint64())
	}
	return rand.IntN(len(p.set))
}

// lighter reports whether target i carries fewer open connections
// relative to its weight than target j (cross-multiplied: no division).
func (p *picker) lighter(i, j int) bool {
	return p.set[i].Active.Load()*int64(p.w[j]) < p.set[j].Active.Load()*int64(p.w[i])
}

// leastConn compares up to window targets from the rotation's choice:
// ties go to the earliest, so equal loads follow the weighted rotation.
func (p *picker) leastConn(start int) int {
	n := len(p.set)
	best := start
	// The best's load is read once, and the index wraps without a
	// division: the loop is one atomic load and two multiplications.
	bestLoad, bestW := p.set[best].Active.Load(), int64(p.w[best])
	i := start
	for range min(n, window) - 1 {
		if i++; i == n {
			i = 0
		}
		load, w := p.set[i].Active.Load(), int64(p.w[i])
		if load*bestW < bestLoad*w {
			best, bestLoad, bestW = i, load, w
		}
	}
	return best
}

// randomTwo draws two targets (each as likely as its weight) and takes
// the lighter; the first on a tie.
func (p *picker) randomTwo() int {
	i, j := p.draw(), p.draw()
	if j != i && p.lighter(j, i) {
		return j
	}
	return i
}

// smoothSchedule lays out one period of nginx's smooth weighted
// round-robin: each step every target's credit grows by its weight, the
// target with the most credit is picked and pays the total. A target of
// weight 3 among two of weight 1 goes C A C B C: spread out, never a
// burst. Weights are reduced by their common divisor, and scaled down to
// keep the period within maxSchedule.
func smoothSchedule(w []uint32) []uint32 {
	g := w[0]
	var total uint64
	for _, x := range w {
		g = gcd(g, x)
		total += uint64(x)
	}
	ws := make([]int64, len(w))
	var sum int64
	for i, x := range w {
		v := uint64(x / g)
		if total/uint64(g) > maxSchedule {
			v = max(1, uint64(math.Round(float64(x)*maxSchedule/float64(total))))
		}
		ws[i] = int64(v)
		sum += ws[i]
	}
	credit := make([]int64, len(w))
	out := make([]uint32, sum)
	for s := range out {
		best := 0
		for i := range ws {
			credit[i] += ws[i]
			if credit[i] > credit[best] {
				best = i
			}
		}
		credit[best] -= sum
		out[s] = uint32(best)
	}
	return out
}

func gcd(a, b uint32) uint32 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// aliasTable builds Vose's alias table of weights w: column i's share of
// [0, 2^64) goes to target i up to w[i]/mean of a column, the rest of the
// column to a heavier target, so that every target's total is its weight.
func aliasTable(w []uint32) []column {
	n := len(w)
	var total uint64
	for _, x := range w {
		total += uint64(x)
	}
	// Scaled weights in units of a column's 2^32: the mean is one column.
	// x*n*2^32/total in 128 bits (x*n fits 64 bits, both being under 2^32;
	// shifted it need not), and the units the quotients round off handed
	// back one each to weights that lost some, so that they add up to
	// exactly n columns: every target's share is then its weight's to a
	// unit of 2^-32 of a column, however many targets and however heavy.
	scaled := make([]uint64, n)
	short := uint64(n) << 32
	for i, x := range w {
		hi, lo := bits.Mul64(uint64(x)*uint64(n), 1<<32)
		scaled[i], _ = bits.Div64(hi, lo, total)
		short -= scaled[i]
	}
	for i, x := range w {
		if short == 0 {
			break
		}
		hi, lo := bits.Mul64(uint64(x)*uint64(n), 1<<32)
		if _, r := bits.Div64(hi, lo, total); r > 0 {
			scaled[i]++
			short--
		}
	}
	var small, large []uint32
	for i := range w {
		if scaled[i] < 1<<32 {
			small = append(small, uint32(i))
		} else {
			large = append(large, uint32(i))
		}
	}
	out := make([]column, n)
	for len(small) > 0 && len(large) > 0 {
		s, l := small[len(small)-1], large[len(large)-1]
		small = small[:len(small)-1]
		out[s] = column{cut: uint32(scaled[s]), other: l}
		// The large target fills the rest of s's column.
		scaled[l] -= 1<<32 - scaled[s]
		if scaled[l] < 1<<32 {
			large = large[:len(large)-1]
			small = append(small, l)
		}
	}
	// What is left is full columns (rounding leaves a column a hair off
	// full either way).
	for _, i := range append(small, large...) {
		out[i] = column{cut: math.MaxUint32, other: i}
	}
	return out
}

// at is the target at point u of [0, 2^64): the column is u's share of n
// (the high word of u*n), the place in the column the low word.
func (p *picker) at(u uint64) int {
	c, in := bits.Mul64(u, uint64(len(p.alias)))
	if col := p.alias[c]; uint32(in>>32) >= col.cut {
		return int(col.other)
	}
	return int(c)
}
