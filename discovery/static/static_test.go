package static_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/discovery/static"
)

type sink struct{ snaps chan discovery.Snapshot }

func (s sink) Update(snap discovery.Snapshot) { s.snaps <- snap }
func (sink) Synced()                          {}
func (sink) Error(error)                      {}

// A static list is one sorted snapshot, delivered at once (a resync, as
// a first answer is), with weights kept and duplicates merged; the
// caller's slice is not reordered; Watch ends with its context.
func TestStaticWatcher(t *testing.T) {
	given := []discovery.Instance{{Addr: "10.0.0.9:80", Weight: 3}, {Addr: "10.0.0.1:80"}, {Addr: "10.0.0.9:80", Weight: 3}}
	orig := slices.Clone(given)
	s := sink{snaps: make(chan discovery.Snapshot, 2)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- static.Watcher{Instances: given}.Watch(ctx, s) }()
	var snap discovery.Snapshot
	select {
	case snap = <-s.snaps:
	case <-time.After(5 * time.Second):
		t.Fatal("no snapshot")
	}
	if got := snap.Addrs(); !slices.Equal(got, []string{"10.0.0.1:80", "10.0.0.9:80"}) || !snap.Resync {
		t.Fatalf("snapshot %v (resync %v)", got, snap.Resync)
	}
	for _, in := range snap.Instances {
		if in.Addr == "10.0.0.9:80" && in.Weight != 3 {
			t.Fatalf("weight lost: %+v", in)
		}
	}
	if !slices.Equal(given, orig) {
		t.Fatal("Watch reordered the caller's list")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Watch = %v", err)
	}
	if len(s.snaps) != 0 {
		t.Fatal("more than one snapshot")
	}
}
