package relay

import (
	"net/netip"
	"sync"
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
