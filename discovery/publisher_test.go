package discovery

import (
	"errors"
	"testing"
)

// The first list and every changed one are updates, an unchanged one a
// sync, and the first after a failure an update marked Resync.
func TestPublisher(t *testing.T) {
	var got []string
	p := Publisher{Sink: SinkFuncs{
		OnUpdate: func(s Snapshot) {
			if s.Resync {
				got = append(got, "resync")
			} else {
				got = append(got, "update")
			}
		},
		OnSynced: func() { got = append(got, "synced") },
		OnError:  func(error) { got = append(got, "error") },
	}}
	a := Snapshot{Instances: []Instance{{Addr: "10.0.0.1:1"}}}
	b := Snapshot{Instances: []Instance{{Addr: "10.0.0.2:1"}}}
	p.Publish(Snapshot{})
	p.Publish(Snapshot{})
	p.Publish(a)
	p.Publish(a)
	p.Fail(errors.New("down"))
	p.Publish(a)
	p.Publish(b)
	want := []string{"update", "synced", "update", "synced", "error", "resync", "update"}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
}
