// Package discovery holds the types that registries produce: full, sorted
// snapshots of a service's instances. Adapters (discovery/static, discovery/etcd,
// discovery/consul) turn a registry into Snapshots; nothing downstream knows
// which registry a snapshot came from.
package discovery

import (
	"context"
	"slices"
	"strings"
)

// Instance is one network endpoint of a service.
type Instance struct {
	// Addr is host:port, as dialled by the proxy.
	Addr string
}

// Snapshot is the complete set of instances of a service at one moment.
// Snapshots are never deltas: each replaces the previous one whole. The
// Instances slice is sorted by Addr and free of duplicates; treat it as
// immutable once pushed.
type Snapshot struct {
	Instances []Instance
}

// NewSnapshot builds a sorted, de-duplicated Snapshot from addresses.
// Empty addresses are dropped.
func NewSnapshot(addrs ...string) Snapshot {
	out := make([]Instance, 0, len(addrs))
	for _, a := range addrs {
		if a != "" {
			out = append(out, Instance{Addr: a})
		}
	}
	slices.SortFunc(out, func(a, b Instance) int { return strings.Compare(a.Addr, b.Addr) })
	out = slices.CompactFunc(out, func(a, b Instance) bool { return a.Addr == b.Addr })
	return Snapshot{Instances: out}
}

// Addrs returns the instance addresses in order.
func (s Snapshot) Addrs() []string {
	out := make([]string, len(s.Instances))
	for i, in := range s.Instances {
		out[i] = in.Addr
	}
	return out
}

// Equal reports whether two snapshots hold the same instances.
func (s Snapshot) Equal(o Snapshot) bool {
	return slices.Equal(s.Instances, o.Instances)
}

// Sink receives what a Watcher learns. Both methods are called from the
// watcher's goroutine, one call at a time, and must not block for long.
type Sink interface {
	// Update delivers a full snapshot. Watchers call it on the first
	// successful sync (even when the service has no instances) and then on
	// every change; they do not re-deliver a snapshot equal to the last one.
	Update(Snapshot)
	// Error reports a registry failure. The last good snapshot stays in
	// force: an error never means "no instances".
	Error(error)
}

// Watcher watches one service in one registry.
type Watcher interface {
	// Watch runs until ctx is done, pushing snapshots and errors to sink.
	// It retries registry failures itself (with backoff) and returns only
	// when ctx is done (nil) or on a setup error that retrying cannot fix.
	Watch(ctx context.Context, sink Sink) error
}

// SinkFuncs adapts two functions to a Sink; nil functions are ignored.
type SinkFuncs struct {
	OnUpdate func(Snapshot)
	OnError  func(error)
}

// Update implements Sink.
func (f SinkFuncs) Update(s Snapshot) {
	if f.OnUpdate != nil {
		f.OnUpdate(s)
	}
}

// Error implements Sink.
func (f SinkFuncs) Error(err error) {
	if f.OnError != nil {
		f.OnError(err)
	}
}
