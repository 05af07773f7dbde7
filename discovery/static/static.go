// Package static is a discovery.Watcher over a fixed list of addresses: the
// classic proxy's backend list.
package static

import (
	"context"

	"github.com/rota-proxy/rota/discovery"
)

// Watcher pushes one snapshot of Instances, then waits for ctx. The zero
// value is a valid watcher of no instances.
type Watcher struct {
	Instances []discovery.Instance
}

// Watch implements discovery.Watcher.
func (w Watcher) Watch(ctx context.Context, sink discovery.Sink) error {
	ins := discovery.SortInstances(append([]discovery.Instance(nil), w.Instances...))
	sink.Update(discovery.Snapshot{Instances: ins, Resync: true})
	<-ctx.Done()
	return nil
}
