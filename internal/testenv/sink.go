package testenv

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rota-proxy/rota/discovery"
)

// Sink is a discovery.Sink that keeps what a watcher told it, for tests
// to wait on.
type Sink struct {
	mu      sync.Mutex
	updates []discovery.Snapshot
	errs    []error
	synced  int
}

// Watch runs w into a new Sink until the test ends; the watcher must
// return nil when its context is cancelled.
func Watch(t testing.TB, w discovery.Watcher) *Sink {
	t.Helper()
	s := &Sink{}
	RunWatcher(t, w, s)
	return s
}

// RunWatcher runs w into sink until the test ends: the test's cleanup
// cancels it, waits for Watch to return and fails the test unless it
// returned nil.
func RunWatcher(t testing.TB, w discovery.Watcher, sink discovery.Sink) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Watch(ctx, sink) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Watch returned %v", err)
		}
	})
}

// Update implements discovery.Sink.
func (s *Sink) Update(snap discovery.Snapshot) {
	s.mu.Lock()
	s.updates = append(s.updates, snap)
	s.mu.Unlock()
}

// Synced implements discovery.Sink.
func (s *Sink) Synced() { s.mu.Lock(); s.synced++; s.mu.Unlock() }

// Error implements discovery.Sink.
func (s *Sink) Error(err error) { s.mu.Lock(); s.errs = append(s.errs, err); s.mu.Unlock() }

// Last returns the last snapshot, the number of updates and of errors.
func (s *Sink) Last() (discovery.Snapshot, int, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.updates) == 0 {
		return discovery.Snapshot{}, 0, len(s.errs)
	}
	return s.updates[len(s.updates)-1], len(s.updates), len(s.errs)
}

// Updates are every snapshot delivered, in order.
func (s *Sink) Updates() []discovery.Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]discovery.Snapshot(nil), s.updates...)
}

// Errors are every error reported, in order.
func (s *Sink) Errors() []error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]error(nil), s.errs...)
}

// Synced is how many times the watcher said nothing changed.
func (s *Sink) SyncedCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.synced
}

// LastError is the last error reported, nil when none.
func (s *Sink) LastError() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.errs) == 0 {
		return nil
	}
	return s.errs[len(s.errs)-1]
}

// WaitAddrs waits until the last snapshot's addresses are addrs (in
// order) and returns it.
func (s *Sink) WaitAddrs(t T, what string, addrs ...string) discovery.Snapshot {
	t.Helper()
	var snap discovery.Snapshot
	Eventually(t, what, 20*time.Second, func() bool {
		snap, _, _ = s.Last()
		return strings.Join(snap.Addrs(), " ") == strings.Join(addrs, " ")
	})
	return snap
}
