package balancer

import (
	"math"
	"slices"
	"strings"
)

// Consistent hashing on a ring with bounded loads (Karger et al.;
// Mirrokni, Thorup and Zadimoghaddam 2018), for the hash policy. Every
// target owns points on a ring of 2^64, as many as its weight's share of
// about 400 a target; a key belongs to the first point at or after its
// own hash. A ring rather than Maglev or weighted rendezvous hashing:
// adding a target moves only the keys its new points take, and removing
// one only the keys its points had (Maglev also reshuffles others': 1.6x
// the ideal at 100 targets here), while a pick stays a binary search
// (rendezvous scores every target: 10,000 hashes a connection at 10,000
// targets). The points depend only on the targets' addresses and weights,
// never on their order or on the process, so every rota of a fleet with
// the same targets maps a key to the same target, and "the next in the
// key's order", where bounded load sends a key whose target is full, is
// the next point's owner, the same everywhere.

// Hash is the consistent-hash policy: a key (the client's address, or
// the TLS server name) picks the same target as long as that target is
// live, and a change of the set moves only its share of keys.
const Hash Policy = "hash"

// ring is the points of a picker's set, sorted by hash.
type ring struct {
	hash  []uint64 // sorted
	owner []uint32 // index in the picker's set, by point
	// start[b] is the first point whose hash's top 16 bits are at least
	// b: a pick searches only its bucket (16 points at 1M points), not
	// the whole ring (20 cache misses at 10,000 targets).
	start []uint32
	// bound is the hash_balance_factor (0: unbounded): a key's target
	// that carries more than bound x its weighted share of the open
	// connections passes the key to the next point's.
	bound float64
	wsum  uint64 // the sum of the weights
}

const (
	// pointsPerTarget is the points a target of mean weight owns: its
	// share of keys is then within about 5 % (1/sqrt) of its weight's.
	pointsPerTarget = 400
	// maxPoints bounds a ring (12 MB, sorted in a fraction of a second);
	// beyond 2,621 targets each owns fewer points (100 at 10,000).
	maxPoints = 1 << 20
)

// newRing places every target's points: point j of target t hashes t's
// address with j, so a target's points never depend on the others'. Their
// number is its weight over the set's (upper) median weight, times
// pointsPerTarget: a target joining at a small weight (slow start) or
// leaving changes no other target's count, so only its own keys move.
func newRing(set []*Target, w []uint32, bound float64) *ring {
	var wsum uint64
	for _, x := range w {
		wsum += uint64(x)
	}
	sorted := slices.Clone(w)
	slices.Sort(sorted)
	median := float64(sorted[len(sorted)/2])
	per := float64(pointsPerTarget) / median // points per unit of weight
	if total := per * float64(wsum); total > maxPoints {
		per *= maxPoints / total
	}
	type point struct {
		h     uint64
		owner uint32
	}
	pts := make([]point, 0, int(per*float64(wsum))+len(set))
	for i, t := range set {
		k := max(1, int(math.Round(per*float64(w[i]))))
		base := fnv(t.Addr)
		for j := range k {
			pts = append(pts, point{mix(base ^ mix(uint64(j)+1)), uint32(i)})
		}
	}
	slices.SortFunc(pts, func(a, b point) int {
		switch {
		case a.h < b.h:
			return -1
		case a.h > b.h:
			return 1
		}
		// Equal hashes (one in 2^64): the address decides, not the order.
		return strings.Compare(set[a.owner].Addr, set[b.owner].Addr)
	})
	r := &ring{hash: make([]uint64, len(pts)), owner: make([]uint32, len(pts)), start: make([]uint32, 1<<16+1),
		bound: bound, wsum: wsum}
	for i, p := range pts {
		r.hash[i], r.owner[i] = p.h, p.owner
	}
	b := 0
	for i, h := range r.hash {
		for ; b <= int(h>>48); b++ {
			r.start[b] = uint32(i)
		}
	}
	for ; b <= 1<<16; b++ {
		r.start[b] = uint32(len(r.hash))
	}
	return r
}

// hashPick returns the index of key's target: the owner of the first point
// at or after the key's hash, or, when a bound is set and that target is
// over it, the first owner of the following points that is not. With every
// target over its bound (at most when all are), the key's own.
func (p *picker) hashPick(key uint64) int {
	r := p.ring
	h := mix(key)
	// The first point at or after h: a binary search of h's bucket (no
	// closure); none there, the next bucket's first point.
	lo, hi := int(r.start[h>>48]), int(r.start[h>>48+1])
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if r.hash[m] < h {
			lo = m + 1
		} else {
			hi = m
		}
	}
	if lo == len(r.hash) {
		lo = 0 // past the last point: the ring wraps
	}
	first := int(r.owner[lo])
	if r.bound <= 0 {
		return first
	}
	total := float64(p.open.Load() + 1) // with the connection being placed
	for range len(r.hash) {
		i := int(r.owner[lo])
		// Within its capacity: active < ceil(bound x total x w / wsum),
		// rounded up as the paper's is, so that at low counts a target
		// keeps its keys until it holds a whole connection more than its
		// share.
		if float64(p.set[i].Active.Load()) < math.Ceil(r.bound*total*float64(p.w[i])/float64(r.wsum)) {
			return i
		}
		if lo++; lo == len(r.hash) {
			lo = 0
		}
	}
	return first
}

// mix is splitmix64's finaliser: every bit of x moves about half of the
// result's.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// fnv is FNV-1a of b: fixed, so the same in every process.
func fnv[T string | []byte](b T) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(b); i++ {
		h ^= uint64(b[i])
		h *= 1099511628211
	}
	return h
}

// HashKey is the key of a string (a TLS server name) for PickKey; it does
// not allocate.
func HashKey(s string) uint64 { return fnv(s) }

// HashBytes is the key of bytes (a client address's 16-byte form) for
// PickKey; it does not allocate.
func HashBytes(b []byte) uint64 { return fnv(b) }
