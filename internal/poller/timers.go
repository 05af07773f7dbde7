//go:build linux

package poller

// timerHeap is a binary min-heap of timers by deadline; each timer knows its
// position, so setting it again or cancelling it is O(log n).
type timerHeap struct{ ts []*Timer }

func (h *timerHeap) len() int    { return len(h.ts) }
func (h *timerHeap) top() *Timer { return h.ts[0] }
func (h *timerHeap) due(now int64) bool {
	return len(h.ts) > 0 && h.ts[0].when <= now
}

// next is the earliest deadline, 0 when there is none. A deadline of 0
// itself is reported as 1 (the clock starts at 0 when the poller does).
func (h *timerHeap) next() int64 {
	if len(h.ts) == 0 {
		return 0
	}
	return max(h.ts[0].when, 1)
}

func (h *timerHeap) push(t *Timer) {
	h.ts = append(h.ts, t)
	t.idx = len(h.ts)
	h.up(len(h.ts) - 1)
}

func (h *timerHeap) pop() *Timer {
	t := h.ts[0]
	h.remove(0)
	return t
}

func (h *timerHeap) remove(i int) {
	t := h.ts[i]
	last := len(h.ts) - 1
	if i != last {
		h.swap(i, last)
	}
	h.ts[last] = nil
	h.ts = h.ts[:last]
	t.idx = 0
	if i != last {
		h.fix(i)
	}
}

func (h *timerHeap) fix(i int) {
	if !h.down(i) {
		h.up(i)
	}
}

func (h *timerHeap) swap(i, j int) {
	h.ts[i], h.ts[j] = h.ts[j], h.ts[i]
	h.ts[i].idx = i + 1
	h.ts[j].idx = j + 1
}

func (h *timerHeap) up(i int) {
	for i > 0 {
		parent := (i - 1) / 2
		if h.ts[parent].when <= h.ts[i].when {
			return
		}
		h.swap(i, parent)
		i = parent
	}
}

// down sifts i toward the leaves and reports whether it moved.
func (h *timerHeap) down(i int) bool {
	start := i
	n := len(h.ts)
	for {
		l := 2*i + 1
		if l >= n {
			break
		}
		least := l
		if r := l + 1; r < n && h.ts[r].when < h.ts[l].when {
			least = r
		}
		if h.ts[i].when <= h.ts[least].when {
			break
		}
		h.swap(i, least)
		i = least
	}
	return i > start
}
