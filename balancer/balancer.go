// Package balancer hands out live targets in round-robin order.
//
// The live set is an immutable slice published through an atomic pointer
// (grpc-go's picker pattern): Update builds a new slice and swaps it in, Pick
// reads whatever slice is current without taking a lock or allocating.
package balancer

import (
	"math/rand/v2"
	"net/netip"
	"sync/atomic"
)

// Target is one backend address together with the connection accounting the
// proxy keeps for it. A Target lives as long as its address is discovered, so
// counters survive changes of health and of the live set. All fields but Addr
// are updated atomically from many goroutines.
type Target struct {
	Addr string
	// AddrPort is Addr parsed, when it is an IP address and port (not a
	// name), so the proxy connects without parsing it again.
	AddrPort netip.AddrPort

	Active     atomic.Int64  // connections open right now
	Total      atomic.Uint64 // connections handed to this target
	DialErrors atomic.Uint64 // failed dials
	BytesIn    atomic.Uint64 // bytes from the target to clients
	BytesOut   atomic.Uint64 // bytes from clients to the target
}

// NewTarget returns a Target for addr with zeroed counters.
func NewTarget(addr string) *Target {
	ap, _ := netip.ParseAddrPort(addr)
	return &Target{Addr: addr, AddrPort: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())}
}

// RoundRobin picks live targets in turn. The zero value is ready to use and
// has no targets.
type RoundRobin struct {
	live atomic.Pointer[[]*Target]
	// next is shared by every published set so the rotation continues across
	// updates instead of restarting at the first target after each change.
	next    atomic.Uint64
	started atomic.Bool
}

// Update publishes targets as the new live set. The slice is owned by the
// balancer from here on: callers must not modify it.
func (b *RoundRobin) Update(targets []*Target) {
	if b.started.CompareAndSwap(false, true) {
		// Random start: a fleet of proxies restarted together must not all
		// send their first connection to the same instance.
		b.next.Store(rand.Uint64())
	}
	b.live.Store(&targets)
}

// Live returns the current live set. Callers must not modify it.
func (b *RoundRobin) Live() []*Target {
	if p := b.live.Load(); p != nil {
		return *p
	}
	return nil
}

// Pick starts a selection for one client connection: the returned Cursor
// yields the next live target in rotation, then (for retries) the ones after
// it, each target at most once. Pick takes no lock and does not allocate.
func (b *RoundRobin) Pick() Cursor {
	set := b.Live()
	if len(set) == 0 {
		return Cursor{}
	}
	return Cursor{set: set, start: b.next.Add(1) - 1}
}

// Cursor walks the live set as it was when Pick was called. The zero Cursor
// yields nothing.
type Cursor struct {
	set   []*Target
	start uint64
	i     int
}

// Next returns the next target to try, or nil when every target of the set
// has been offered once.
func (c *Cursor) Next() *Target {
	if c.i >= len(c.set) {
		return nil
	}
	t := c.set[(c.start+uint64(c.i))%uint64(len(c.set))]
	c.i++
	return t
}

// Len is the number of targets the cursor can offer in all.
func (c *Cursor) Len() int { return len(c.set) }
