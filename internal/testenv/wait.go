package testenv

import (
	"fmt"
	"time"
)

// Waiter is what Eventually needs of its caller (a testing.TB has it).
type Waiter interface {
	Helper()
	Fatalf(format string, args ...any)
}

// Eventually polls cond every 2 ms until it holds, and fails the test
// naming what it waited for once timeout passes. It returns how long the
// wait took. Tests wait for a condition with a deadline, never for a
// fixed time.
func Eventually(t Waiter, what string, timeout time.Duration, cond func() bool) time.Duration {
	t.Helper()
	took, ok := Poll(timeout, cond)
	if !ok {
		t.Fatalf("timed out after %v waiting for %s", timeout, what)
	}
	return took
}

// Poll is Eventually for a caller that reports a timeout itself (e2e, a
// program): it polls cond every 2 ms until it holds (true) or timeout
// passes (false), and says how long it waited.
func Poll(timeout time.Duration, cond func() bool) (time.Duration, bool) {
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			return time.Since(start), false
		}
		time.Sleep(2 * time.Millisecond)
	}
	return time.Since(start), true
}

// FreeAddr returns a 127.0.0.1 address nothing listens on now (a port the
// kernel just handed out and took back): for a server a test starts
// itself, or a target that must refuse.
func FreeAddr(t Waiter) string {
	t.Helper()
	return FreeAddrs(t, 1)[0]
}

// FreeAddrs returns n such addresses, all different: they are held at
// once while picked (FreeAddr called n times can hand out a port again,
// since each is let go before the next is picked).
func FreeAddrs(t Waiter, n int) []string {
	t.Helper()
	addrs, err := freePorts(n)
	if err != nil {
		t.Fatalf("%v", fmt.Errorf("free port: %w", err))
	}
	return addrs
}
