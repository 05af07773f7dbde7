package health

// targetHeap is a binary min-heap of targets by their next probe; each
// target knows its position, so rescheduling one is O(log n).
type targetHeap struct{ ts []*target }

func (h *targetHeap) len() int     { return len(h.ts) }
func (h *targetHeap) top() *target { return h.ts[0] }

func (h *targetHeap) push(t *target) {
	h.ts = append(h.ts, t)
	t.idx = len(h.ts)
	h.up(len(h.ts) - 1)
}

func (h *targetHeap) pop() *target {
	t := h.ts[0]
	h.remove(0)
	return t
}

func (h *targetHeap) remove(i int) {
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

func (h *targetHeap) fix(i int) {
	if !h.down(i) {
		h.up(i)
	}
}

func (h *targetHeap) less(i, j int) bool { return h.ts[i].nextAt.Before(h.ts[j].nextAt) }

func (h *targetHeap) swap(i, j int) {
	h.ts[i], h.ts[j] = h.ts[j], h.ts[i]
	h.ts[i].idx = i + 1
	h.ts[j].idx = j + 1
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
