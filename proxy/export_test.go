package proxy

import (
	"net/netip"
	"testing"
)

// RelayWithGoroutines makes p relay every connection with goroutines, the
// path taken off Linux, so tests cover both drivers.
func RelayWithGoroutines(p *Proxy) { p.goroutinesOnly = true }

// PanicOn makes relaying panic when a client sends a chunk for which f is
// true (from p's next Configure).
func PanicOn(p *Proxy, f func([]byte) bool) { p.panicOn = f }

// PanicOnAccess makes starting a connection panic (where its access is
// checked) for a client address for which f is true.
func PanicOnAccess(p *Proxy, f func(netip.Addr) bool) { p.panicOnAccess = f }

// LimitPipes sets how many splice pipes e may have open at once (Linux).
func LimitPipes(e *Engine, n int) { e.limitPipes(n) }

// PipesOpen is how many splice pipes e has open (Linux; 0 elsewhere).
func PipesOpen(e *Engine) int { return e.pipesOpen() }

// StallLoops holds each of e's running loops in a posted function until
// release is called (Linux; nothing elsewhere): what arrives meanwhile
// queues in the kernel, as under a burst the loop is too busy for. A test
// that fails before it releases them releases them in its cleanup, so
// that e can close.
func StallLoops(t testing.TB, e *Engine) (release func()) {
	release = e.stallLoops()
	t.Cleanup(release)
	return release
}
