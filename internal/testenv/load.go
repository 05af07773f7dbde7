package testenv

import (
	"strings"
	"sync"
	"sync/atomic"
)

// Load is clients making requests back to back (a new connection each,
// as the caller's request makes them) and keeping score: successes,
// failures with their first errors, and how often each answer came. It is
// bounded (perWorker requests per worker) and ends at Stop.
type Load struct {
	crew
	OK, Failed atomic.Int64

	mu   sync.Mutex
	errs []string // the first ten
	seen sync.Map // answer -> *atomic.Int64
}

// StartLoad starts workers, each calling request (with its number) until
// Stop, at most perWorker times.
func StartLoad(workers, perWorker int, request func(worker int) (answer string, err error)) *Load {
	l := &Load{}
	l.start(workers, perWorker, func(w int) {
		ans, err := request(w)
		if err != nil {
			l.Failed.Add(1)
			l.mu.Lock()
			if len(l.errs) < 10 {
				l.errs = append(l.errs, err.Error())
			}
			l.mu.Unlock()
			return
		}
		l.OK.Add(1)
		v, _ := l.seen.LoadOrStore(ans, new(atomic.Int64))
		v.(*atomic.Int64).Add(1)
	})
	return l
}

// Count is how many requests got answer.
func (l *Load) Count(answer string) int64 {
	if v, ok := l.seen.Load(answer); ok {
		return v.(*atomic.Int64).Load()
	}
	return 0
}

// Errors are the first failures' errors.
func (l *Load) Errors() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.errs...)
}

// AssertNoFailures fails t if a request failed, or if none succeeded (a
// load that never ran proves nothing).
func (l *Load) AssertNoFailures(t Waiter) {
	t.Helper()
	if n := l.Failed.Load(); n > 0 {
		t.Fatalf("%d of %d client connections failed; first errors: %s", n, n+l.OK.Load(), strings.Join(l.Errors(), "; "))
	}
	if l.OK.Load() == 0 {
		t.Fatalf("no client connection completed; the test proves nothing")
	}
}
