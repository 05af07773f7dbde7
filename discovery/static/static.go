// Package static is a discovery.Watcher over a fixed list of addresses: the
// classic proxy's backend list.
package static

import (
	"context"

	"github.com/rota-proxy/rota/discovery"
)

// Watcher pushes one snapshot of Addrs, then waits for ctx. The zero value
// is a valid watcher of no instances.
type Watcher struct {
	Addrs []string
}

// Watch implements discovery.Watcher.
func (w Watcher) Watch(ctx context.Context, sink discovery.Sink) error {
	sink.Update(discovery.NewSnapshot(w.Addrs...))
	<-ctx.Done()
	return nil
}
