package pool

import (
	"sync/atomic"
	"time"
)

// historyLen is how many one-second samples a target's history keeps: the
// last minute.
const historyLen = 60

// History is a target's new connections per second over the last minute.
// The pool's goroutine writes it once a second; the admin reads it at any
// time without a lock (a read racing a write may see that second either
// way).
type History struct {
	counts [historyLen]atomic.Uint32
	next   atomic.Uint32 // index the next sample goes to
	filled atomic.Uint32 // samples written, up to historyLen
	last   uint64        // the target's Total at the last sample (writer's own)
}

// record adds one second's sample: the connections handed out since the
// previous one.
func (h *History) record(total uint64) {
	n := total - h.last
	h.last = total
	i := h.next.Load()
	h.counts[i].Store(uint32(min(n, uint64(^uint32(0)))))
	h.next.Store((i + 1) % historyLen)
	if f := h.filled.Load(); f < historyLen {
		h.filled.Store(f + 1)
	}
}

// Samples returns the recorded seconds, oldest first (at most 60).
func (h *History) Samples() []uint32 {
	if h == nil {
		return nil
	}
	n, next := h.filled.Load(), h.next.Load()
	out := make([]uint32, n)
	for k := range n {
		out[k] = h.counts[(next+historyLen-n+k)%historyLen].Load()
	}
	return out
}

// Sum is the connections of the recorded seconds.
func (h *History) Sum() uint64 {
	var s uint64
	for _, c := range h.Samples() {
		s += uint64(c)
	}
	return s
}

// sample records every target's last second and schedules the next (on
// the serializer).
func (p *Pool) sample() {
	for _, e := range p.order {
		e.history.record(e.t.Total.Load())
	}
	p.sampler = p.after(time.Second, p.sample)
}
