// Package balancer hands out live targets: weighted round-robin,
// least-connections or power-of-two random choices.
//
// The live set and its weights are an immutable picker published through an
// atomic pointer (grpc-go's picker pattern): Update builds a new picker and
// swaps it in, Pick reads whatever picker is current without taking a lock
// or allocating, and costs the same whether there are 3 targets or 10,000.
package balancer

import (
	"math/rand/v2"
	"net/netip"
	"sync/atomic"
)

// Target is one backend address together with the connection accounting the
// proxy keeps for it. A Target lives as long as its address is discovered, so
// counters survive changes of health and of the live set. All fields but Addr
// and AddrPort are updated atomically from many goroutines.
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

	// open is the balancer's count of its targets' open connections
	// (bounded-load hashing compares with its mean); nil for a target
	// made outside a balancer.
	open *atomic.Int64
	// held is the places taken through a Gate: connections dialling or
	// open to the target, picked by a cursor of a gated picker.
	held atomic.Int64
}

// NewTarget returns a Target for addr with zeroed counters.
func NewTarget(addr string) *Target {
	ap, _ := netip.ParseAddrPort(addr)
	return &Target{Addr: addr, AddrPort: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())}
}

// NewTarget returns a Target for addr whose open connections count in b's
// total as well as in its own Active.
func (b *Balancer) NewTarget(addr string) *Target {
	t := NewTarget(addr)
	t.open = &b.open
	return t
}

// AddActive adds d to the target's open connections (and to its
// balancer's total).
func (t *Target) AddActive(d int64) {
	t.Active.Add(d)
	if t.open != nil {
		t.open.Add(d)
	}
}

// Policy is how a picker chooses among its targets.
type Policy string

// Policies (the listener's balance key).
const (
	// RoundRobin takes the targets in turn, each as often as its weight
	// says, spread out (never a burst to one target): with equal weights,
	// exactly one after the other.
	RoundRobin Policy = "round_robin"
	// LeastConn takes the target with the fewest open connections relative
	// to its weight, ties in rotation.
	LeastConn Policy = "least_conn"
	// RandomTwo draws two targets at random and takes the one with fewer
	// open connections relative to its weight.
	RandomTwo Policy = "random_two"
	// Hash is below (hash.go).
)

// Entry is a target in a picker, with its effective weight (at least 1).
type Entry struct {
	T *Target
	W int
}

// Balancer publishes pickers. The zero value is a round-robin balancer with
// no targets.
type Balancer struct {
	cur atomic.Pointer[picker]
	// seq is shared by every picker published, so that the rotation goes
	// on across updates instead of restarting at the first target.
	seq     atomic.Uint64
	started atomic.Bool
	// open counts the open connections of the targets made by NewTarget.
	open atomic.Int64
	// The hash policy's bound and key for the pickers published from here.
	bound float64
	bySNI bool
	// gate caps the targets' connections (nil: no cap).
	gate *Gate
}

// SetGate makes the pickers published from now on take their targets'
// places through g (nil: none). Call it before the Update that should use
// it, from the goroutine that updates.
func (b *Balancer) SetGate(g *Gate) { b.gate = g }

// SetHash sets the hash policy's settings for the pickers published from
// now on: no target takes more than factor times its weighted share of
// the open connections (0: unbounded), and the key is the server name
// (bySNI) or the client's address. Call it before the Update that should
// use it, from the goroutine that updates.
func (b *Balancer) SetHash(factor float64, bySNI bool) { b.bound, b.bySNI = factor, bySNI }

// Update publishes a picker of policy over entries (a policy of "" is
// round-robin). The entries are the balancer's from here on: callers must
// not modify them. Building a picker costs O(n); picking from it, O(1).
func (b *Balancer) Update(policy Policy, entries []Entry) { b.UpdateWithFallback(policy, entries, nil) }

// UpdateWithFallback is Update with targets that a cursor offers after
// every entry, in order, and that are never picked first: backups, tried
// only by a connection whose every live target failed (its dial refused
// before the pool heard of it). Callers must not modify either slice.
func (b *Balancer) UpdateWithFallback(policy Policy, entries []Entry, fallback []*Target) {
	if b.started.CompareAndSwap(false, true) {
		// Random start: a fleet of proxies restarted together must not all
		// send their first connection to the same instance.
		b.seq.Store(rand.Uint64())
	}
	p := newPicker(policy, entries, b.bound)
	p.fallback, p.bySNI = fallback, b.bySNI
	p.open = &b.open
	p.gate = b.gate
	b.cur.Store(p)
	if b.gate != nil {
		b.gate.refill(p.set, p.fallback)
	}
}

// Live returns the targets of the current picker. Callers must not modify
// the slice.
func (b *Balancer) Live() []*Target {
	if p := b.cur.Load(); p != nil {
		return p.set
	}
	return nil
}

// Pick starts a selection for one client connection: the returned Cursor
// yields the policy's choice, then (for retries) every other target of the
// set once, in rotation. Pick takes no lock and does not allocate.
func (b *Balancer) Pick() Cursor {
	p := b.cur.Load()
	if p == nil || len(p.set) == 0 {
		return Cursor{}
	}
	return Cursor{p: p, start: uint32(p.pick(&b.seq))}
}

// PickKey is Pick for the hash policy: key (HashKey, HashBytes) chooses the
// first target; the retries follow as Pick's do. Other policies ignore the
// key. It takes no lock and does not allocate.
func (b *Balancer) PickKey(key uint64) Cursor {
	p := b.cur.Load()
	if p == nil || len(p.set) == 0 {
		return Cursor{}
	}
	if p.ring == nil {
		return Cursor{p: p, start: uint32(p.pick(&b.seq))}
	}
	return Cursor{p: p, start: uint32(p.hashPick(key))}
}

// PickFor is Pick for a connection from client that asked for serverName
// ("" for none): the hash policy hashes the one SetHash chose; the others
// pick as Pick does. It takes no lock and does not allocate.
func (b *Balancer) PickFor(client netip.Addr, serverName string) Cursor {
	p := b.cur.Load()
	if p == nil || len(p.set) == 0 {
		return Cursor{}
	}
	if p.ring == nil {
		return Cursor{p: p, start: uint32(p.pick(&b.seq))}
	}
	var key uint64
	if p.bySNI {
		key = HashKey(serverName)
	} else {
		a := client.Unmap().As16()
		key = HashBytes(a[:])
	}
	return Cursor{p: p, start: uint32(p.hashPick(key))}
}

// Cursor walks a picker's targets from its choice on. The zero Cursor
// yields nothing. It is small (16 bytes): every connection holds one.
type Cursor struct {
	p     *picker // immutable
	start uint32
	// i is the next offer's index; its top bit (full) says a target was
	// passed over at its cap.
	i uint32
}

const full = 1 << 31

// Next returns the next target to try, or nil when every target of the set
// and of the fallback has been offered once. With a Gate, it passes over
// targets at their cap and takes a place of the one it returns, which the
// caller gives back with Release; when it passed over one, it offers no
// fallback target (backups stand in for dead targets, not busy ones: the
// connection queues instead).
func (c *Cursor) Next() *Target {
	if c.p == nil {
		return nil
	}
	g := c.p.gate
	for {
		t := c.next()
		if t == nil || g == nil || g.take(t) {
			return t
		}
		c.i |= full
	}
}

func (c *Cursor) next() *Target {
	n := uint64(len(c.p.set))
	i := uint64(c.i &^ full)
	if i >= n {
		f := i - n
		if f >= uint64(len(c.p.fallback)) || c.i&full != 0 {
			return nil
		}
		c.i++
		return c.p.fallback[f]
	}
	t := c.p.set[(uint64(c.start)+i)%n]
	c.i++
	return t
}

// Full reports whether Next passed over a target at its cap.
func (c *Cursor) Full() bool { return c.i&full != 0 }

// Gate is the gate of the cursor's picker; nil when it has none.
func (c *Cursor) Gate() *Gate {
	if c.p == nil {
		return nil
	}
	return c.p.gate
}

// Release gives back the place Next took of t, if it took one.
func (c *Cursor) Release(t *Target) {
	if c.p != nil && c.p.gate != nil {
		c.p.gate.Release(t)
	}
}

// Len is the number of targets the cursor can offer in all.
func (c *Cursor) Len() int {
	if c.p == nil {
		return 0
	}
	return len(c.p.set) + len(c.p.fallback)
}

// RoundRobinBalancer is a balancer over equally weighted targets, for callers with
// no weights: Update(targets) is Balancer.Update(RoundRobin, weight 1 each).
type RoundRobinBalancer struct{ Balancer }

// Update publishes targets, equally weighted, in rotation.
func (b *RoundRobinBalancer) Update(targets []*Target) {
	es := make([]Entry, len(targets))
	for i, t := range targets {
		es[i] = Entry{T: t, W: 1}
	}
	b.Balancer.Update(RoundRobin, es)
}
