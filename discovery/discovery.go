// Package discovery holds the types that registries produce: full, sorted
// snapshots of a service's instances. Adapters (discovery/static, discovery/etcd,
// discovery/consul) turn a registry into Snapshots; nothing downstream knows
// which registry a snapshot came from.
package discovery

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"strings"
	"unicode/utf8"
)

// Instance is one network endpoint of a service.
type Instance struct {
	// Addr is host:port, as dialled by the proxy.
	Addr string
	// Weight is the instance's share of new connections relative to the
	// others, 1-1000, as the registry gives it (Consul's
	// Service.Weights.Passing, etcd's Metadata.weight, a static entry's
	// weight); 0 when the registry gives none, which counts as 1.
	Weight int
	// Metadata is what the registry holds beside the address, as JSON
	// (etcd's naming/endpoints Metadata); "" when none.
	Metadata string
	// Backup instances get new connections only while no other (primary)
	// instance is live: a static entry's backup, etcd's Metadata.backup,
	// Consul's service meta rota_backup, an SRV record of a higher
	// priority than the lowest, Docker's rota.backup label.
	Backup bool
	// Draining instances take no new connections while their open ones
	// finish: the registry says they are on their way out (a Kubernetes
	// endpoint that is serving but terminating).
	Draining bool
}

// Warning is a registry entry that was skipped because it is not a valid
// instance: the key (or ID) and why, both truncated (Truncate).
type Warning struct {
	Key, Reason string
}

// Snapshot is the complete set of instances of a service at one moment.
// Snapshots are never deltas: each replaces the previous one whole. The
// Instances slice is sorted by Addr and free of duplicates; treat it as
// immutable once pushed.
type Snapshot struct {
	Instances []Instance
	// Warnings are the entries skipped as malformed, sorted by key. Each
	// stays listed until its key is fixed or deleted.
	Warnings []Warning
	// Resync marks the first answer after the registry was unreachable,
	// restarted or resynced (a compaction, an index that went backwards).
	// An empty answer then may be a registry that lost its data rather
	// than a service without instances, so it is held for a while before
	// it empties a pool; an empty answer on a healthy watch applies at once.
	Resync bool
}

// NewSnapshot builds a sorted, de-duplicated Snapshot from addresses, each
// with no weight or metadata. Empty addresses are dropped.
func NewSnapshot(addrs ...string) Snapshot {
	ins := make([]Instance, 0, len(addrs))
	for _, a := range addrs {
		ins = append(ins, Instance{Addr: a})
	}
	return Snapshot{Instances: SortInstances(ins)}
}

// SortInstances sorts ins by address in place and drops empty addresses
// and duplicates (two registry entries naming one address are one
// instance: the first, in the order given, is kept). It returns the
// shortened slice.
func SortInstances(ins []Instance) []Instance {
	ins = slices.DeleteFunc(ins, func(in Instance) bool { return in.Addr == "" })
	slices.SortStableFunc(ins, func(a, b Instance) int { return strings.Compare(a.Addr, b.Addr) })
	return slices.CompactFunc(ins, func(a, b Instance) bool { return a.Addr == b.Addr })
}

// SortWarnings sorts ws by key in place.
func SortWarnings(ws []Warning) []Warning {
	slices.SortFunc(ws, func(a, b Warning) int { return cmp.Compare(a.Key, b.Key) })
	return ws
}

// Addrs returns the instance addresses in order.
func (s Snapshot) Addrs() []string {
	out := make([]string, len(s.Instances))
	for i, in := range s.Instances {
		out[i] = in.Addr
	}
	return out
}

// Equal reports whether two snapshots hold the same instances and
// warnings (Resync aside).
func (s Snapshot) Equal(o Snapshot) bool {
	return slices.Equal(s.Instances, o.Instances) && slices.Equal(s.Warnings, o.Warnings)
}

// MaxText bounds what a registry's error or warning text may put in logs
// and the admin API: a malformed value can be megabytes.
const MaxText = 256

// Truncate shortens s to MaxText bytes (on a character boundary), marking
// the cut.
func Truncate(s string) string {
	if len(s) <= MaxText {
		return s
	}
	cut := MaxText
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…(truncated)"
}

// ErrStale is wrapped by the errors of a watch that stopped hearing from its
// registry (a cut-off member) while the connection looked fine.
var ErrStale = errors.New("registry watch stale")

// TruncateError wraps err so that its text is at most MaxText bytes;
// errors.Is and errors.As still see err.
func TruncateError(err error) error {
	if err == nil || len(err.Error()) <= MaxText {
		return err
	}
	return truncated{err}
}

type truncated struct{ err error }

func (t truncated) Error() string { return Truncate(t.err.Error()) }
func (t truncated) Unwrap() error { return t.err }

// Sink receives what a Watcher learns. Its methods are called from the
// watcher's goroutine, one call at a time, and must not block for long.
type Sink interface {
	// Update delivers a full snapshot. Watchers call it on the first
	// successful sync (even when the service has no instances), on every
	// change, and on every resync; they do not re-deliver an unchanged
	// snapshot otherwise.
	Update(Snapshot)
	// Synced reports an answer from the registry that changed nothing (a
	// watch's progress notification, a blocking query returning): the
	// registry is reachable and the last snapshot still holds.
	Synced()
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

// SinkFuncs adapts functions to a Sink; nil functions are ignored.
type SinkFuncs struct {
	OnUpdate func(Snapshot)
	OnSynced func()
	OnError  func(error)
}

// Update implements Sink.
func (f SinkFuncs) Update(s Snapshot) {
	if f.OnUpdate != nil {
		f.OnUpdate(s)
	}
}

// Synced implements Sink.
func (f SinkFuncs) Synced() {
	if f.OnSynced != nil {
		f.OnSynced()
	}
}

// Error implements Sink.
func (f SinkFuncs) Error(err error) {
	if f.OnError != nil {
		f.OnError(err)
	}
}

// Publisher is how a watcher that lists its registry from scratch (DNS,
// Docker) delivers each list to a sink: the first, every one after a
// failure (marked Resync, so that an empty answer is held), and every one
// that changed, as Update; an unchanged one as Synced. Its zero value
// needs Sink set; one watcher owns it.
type Publisher struct {
	Sink    Sink
	last    Snapshot
	sent    bool
	failing bool
}

// Publish delivers snap.
func (p *Publisher) Publish(snap Snapshot) {
	snap.Resync = p.failing
	if !p.sent || p.failing || !snap.Equal(p.last) {
		p.Sink.Update(snap)
	} else {
		p.Sink.Synced()
	}
	p.last, p.sent, p.failing = snap, true, false
}

// Fail reports a failure (truncated); the next list is a resync.
func (p *Publisher) Fail(err error) {
	p.Sink.Error(TruncateError(err))
	p.failing = true
}
