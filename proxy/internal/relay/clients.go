package relay

import (
	"net/netip"
	"sync"
	"time"
)

// ClientLimit counts the open connections of each client address, for
// max_conns_per_client. One is shared by every connection of a listener
// and outlives reloads, so that a changed limit applies to the counts as
// they are. The lock is held for a map update only.
type ClientLimit struct {
	mu   sync.Mutex
	open map[netip.Addr]int
}

// NewClientLimit returns an empty count.
func NewClientLimit() *ClientLimit { return &ClientLimit{open: map[netip.Addr]int{}} }

// acquire takes a place for a if it holds fewer than max.
func (l *ClientLimit) acquire(a netip.Addr, max int) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open[a] >= max {
		return false
	}
	l.open[a]++
	return true
}

// release gives back a place acquire took.
func (l *ClientLimit) release(a netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if n := l.open[a]; n > 1 {
		l.open[a] = n - 1
	} else {
		delete(l.open, a)
	}
}

// Open returns how many connections a has open.
func (l *ClientLimit) Open(a netip.Addr) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open[a.Unmap()]
}

// ClientRates holds a token bucket per client address, for
// max_conn_rate_per_client. A bucket unused for a minute is full again,
// so it is dropped; the sweep runs every sweepEvery new addresses, and
// bounds the map by the clients of the last minute.
type ClientRates struct {
	r     Rate
	mu    sync.Mutex
	b     map[netip.Addr]*clientBucket
	added int
}

type clientBucket struct {
	tokens float64
	last   time.Time
}

const sweepEvery = 4096

// NewClientRates returns empty buckets of rate r.
func NewClientRates(r Rate) *ClientRates {
	return &ClientRates{r: r, b: map[netip.Addr]*clientBucket{}}
}

// allow takes a token from a's bucket, if it has one, at now.
func (cr *ClientRates) allow(a netip.Addr, now time.Time) bool {
	cr.mu.Lock()
	defer cr.mu.Unlock()
	burst := float64(cr.r.Burst())
	b := cr.b[a]
	if b == nil {
		if cr.added++; cr.added >= sweepEvery {
			cr.sweep(now)
		}
		b = &clientBucket{tokens: burst, last: now}
		cr.b[a] = b
	}
	b.tokens = min(burst, b.tokens+now.Sub(b.last).Seconds()*cr.r.PerSecond)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// sweep drops the buckets that refilled. Caller holds mu.
func (cr *ClientRates) sweep(now time.Time) {
	cr.added = 0
	full := time.Duration(float64(cr.r.Burst()) / max(cr.r.PerSecond, 1e-9) * float64(time.Second))
	for a, b := range cr.b {
		if now.Sub(b.last) > max(full, time.Minute) {
			delete(cr.b, a)
		}
	}
}
