package health

import "time"

// targetHeap is a binary min-heap of targets by their next probe; each
// target knows its position, so rescheduling one is O(log n). Each slot
// carries its target's due time as an integer, so that sifting compares
// the slots themselves instead of chasing a pointer to every target
// (at 10,000 targets the pointer chasing was most of the scheduler's own
// time). A target's nextAt changes only with a fix or push after it.
type targetHeap struct {
	ts   []heapSlot
	base time.Time // the due times are offsets from it
}

type heapSlot struct {
	at int64 // nextAt - base, nanoseconds
	t  *target
}

func (h *targetHeap) len() int     { return len(h.ts) }
func (h *targetHeap) top() *target { return h.ts[0].t }

// untilTop is how long from now the first target is due (<= 0: due), read
// from its slot, not its target.
func (h *targetHeap) untilTop(now time.Time) time.Duration {
	return time.Duration(h.ts[0].at - int64(now.Sub(h.base)))
}

func (h *targetHeap) key(t *target) int64 {
	if h.base.IsZero() {
		h.base = t.nextAt
	}
	return int64(t.nextAt.Sub(h.base))
}

func (h *targetHeap) push(t *target) {
	h.ts = append(h.ts, heapSlot{at: h.key(t), t: t})
	t.idx = len(h.ts)
	h.up(len(h.ts) - 1)
}

func (h *targetHeap) pop() *target {
	t := h.ts[0].t
	h.remove(0)
	return t
}

func (h *targetHeap) remove(i int) {
	t := h.ts[i].t
	last := len(h.ts) - 1
	if i != last {
		h.swap(i, last)
	}
	h.ts[last] = heapSlot{}
	h.ts = h.ts[:last]
	t.idx = 0
	if i != last {
		h.sift(i)
	}
}

// fix restores the order after slot i's target changed its nextAt.
func (h *targetHeap) fix(i int) {
	h.ts[i].at = h.key(h.ts[i].t)
	h.sift(i)
}

func (h *targetHeap) sift(i int) {
	if !h.down(i) {
		h.up(i)
	}
}

func (h *targetHeap) less(i, j int) bool { return h.ts[i].at < h.ts[j].at }

func (h *targetHeap) swap(i, j int) {
	h.ts[i], h.ts[j] = h.ts[j], h.ts[i]
	h.ts[i].t.idx = i + 1
	h.ts[j].t.idx = j + 1
}

func (h *targetHeap) up(i int) {
	for i > 0 {
		p := (i - 1) / 2
		if !h.less(i, p) {
			return
		}
		h.swap(i, p)
		i = p
	}
}

func (h *targetHeap) down(i int) bool {
	start, n := i, len(h.ts)
	for {
		l := 2*i + 1
		if l >= n {
			break
		}
		m := l
		if r := l + 1; r < n && h.less(r, l) {
			m = r
		}
		if !h.less(m, i) {
			break
		}
		h.swap(i, m)
		i = m
	}
	return i > start
}
