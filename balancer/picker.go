package balancer

import (
	"math"
	"math/rand/v2"
	"sync/atomic"
)

const (
	// maxSchedule bounds a smooth round-robin schedule (its period, the
	// sum of the weights once reduced), and maxScheduled the targets
	// that get one: building it costs period x targets. Larger sets use
	// the stride scheduler, as smooth on average and O(1) to build.
	maxSchedule  = 8192
	maxScheduled = 256
	// window bounds the targets least_conn compares per pick: exact up to
	// window targets, beyond that the least loaded of a window that starts
	// at the rotation's choice, so that a pick costs about the same at 3
	// and at 10,000 targets (it was 64: 26 ns against 100). It still
	// balances: at 1,000 targets open connections stay within one of each
	// other (TestLeastConnBeyondTheWindow).
	window = 8
	// maxStride is the scale of the stride scheduler's weights.
	maxStride = math.MaxUint16
)

// picker is an immutable selection over a set of weighted targets.
type picker struct {
	policy Policy
	set    []*Target
	w      []uint32 // effective weights, by index in set
	// Round-robin: nil both with equal weights (plain rotation); else a
	// smooth schedule of indices (small sets) or stride weights.
	schedule []uint32
	stride   []uint32
}

func newPicker(policy Policy, entries []Entry) *picker {
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
	// Unequal weights weigh in every policy's first candidates: the
	// round-robin order, least_conn's ties, random_two's draws.
	if !equal {
		if len(p.w) <= maxScheduled {
			p.schedule = smoothSchedule(p.w)
		} else {
			p.stride = strideWeights(p.w)
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
	case p.stride != nil:
		return p.strideNext(seq)
	}
	return int((seq.Add(1) - 1) % uint64(len(p.set)))
}

// draw is a random index, each as likely as its weight.
func (p *picker) draw() int {
	switch {
	case p.schedule != nil:
		return int(p.schedule[rand.IntN(len(p.schedule))])
	case p.stride != nil:
		for { // rejection sampling: the heaviest is always taken
			i := rand.IntN(len(p.stride))
			if rand.Uint32N(maxStride) < p.stride[i] {
				return i
			}
		}
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

// strideWeights scales weights to maxStride for the stride scheduler.
func strideWeights(w []uint32) []uint32 {
	var top uint32
	for _, x := range w {
		top = max(top, x)
	}
	out := make([]uint32, len(w))
	for i, x := range w {
		out[i] = max(1, uint32(math.Round(float64(x)*maxStride/float64(top))))
	}
	return out
}

// strideNext is grpc-go's static stride scheduler: the counter walks the
// targets in turn, and target i takes its turn with probability
// weight/maxStride, decided by a deterministic pattern (each target
// offset differently) rather than a random draw. The heaviest target
// never skips, so a pick loops maxStride/weight times on average at most.
func (p *picker) strideNext(seq *atomic.Uint64) int {
	const offset = 0x53AF // spreads the targets' patterns apart
	n := uint64(len(p.stride))
	for {
		s := seq.Add(1) - 1
		i := s % n
		w := uint64(p.stride[i])
		if (w*(s/n)+i*offset)%maxStride >= maxStride-w {
			return int(i)
		}
	}
}
