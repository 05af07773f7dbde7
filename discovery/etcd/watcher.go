package etcd

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/connectivity"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/internal/retry"
)

// ErrUnavailable is wrapped by errors reporting that the client lost its
// connection to every etcd endpoint.
var ErrUnavailable = errors.New("etcd unavailable")

// ErrStale is wrapped by errors reporting that the watch stopped hearing
// from its etcd member (cut off from the client, or frozen).
var ErrStale = fmt.Errorf("etcd: %w", discovery.ErrStale)

const (
	// Resync backoff: from retryInitial up to retryMax, never giving up;
	// reset once a Get succeeds.
	retryInitial = 100 * time.Millisecond
	retryMax     = 5 * time.Second
	// requestTimeout bounds one Get. While etcd is down a Get waits this
	// long for the connection to come back before it counts as failed.
	requestTimeout = 5 * time.Second
	// publishCost spaces the snapshots of a burst of changes: publishing
	// (and applying) a snapshot costs in proportion to its instances, so
	// snapshots of n instances are at least n*publishCost apart: a change
	// to a small service is published at once, while a burst of changes
	// to 10,000 instances is published 20 times a second, the latest
	// state winning.
	publishCost = 5 * time.Microsecond
	// The watch asks its member for a progress notification every
	// progressEvery; a member that has said nothing for staleAfter is
	// taken as cut off, and the watch moves to another member.
	progressEvery = 500 * time.Millisecond
	staleAfter    = 1500 * time.Millisecond
)

// Watcher implements discovery.Watcher for one service in etcd.
//
// Watch does a Get of <prefix><service>/ and then watches from the next
// revision (WithPrevKV, WithProgressNotify, WithRequireLeader), asking for
// progress notifications so that a member that stops answering is noticed
// within staleAfter. It resyncs with a fresh Get and a new watch, on capped
// exponential backoff, when the watch channel closes, the watch is canceled
// (a compaction, a lost leader), goes stale, or the client's connection to
// etcd fails. Events at revisions already applied are ignored. A value that
// is not a valid instance is skipped and listed in the snapshot's Warnings;
// it never stops the watcher.
type Watcher struct {
	client    *clientv3.Client
	keyPrefix string // <prefix><service>/
	log       *zap.Logger
	malformed atomic.Uint64
	// Steer, if set, is told about a member a watch found stale, and
	// about other failures, so that the client uses the members that answer.
	Steer *Steering
}

// NewWatcher returns a watcher of service under prefix ("" means
// DefaultPrefix) through client, which the caller keeps owning: several
// watchers may share it, and it must outlive their Watch calls.
func NewWatcher(client *clientv3.Client, prefix, service string, logger *zap.Logger) (*Watcher, error) {
	if client == nil {
		return nil, errors.New("etcd: nil client")
	}
	kp, err := servicePrefix(prefix, service)
	if err != nil {
		return nil, err
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	return &Watcher{
		client:    client,
		keyPrefix: kp,
		log:       logger.Named("etcd").With(zap.String("service", service), zap.String("key_prefix", kp)),
	}, nil
}

// KeyPrefix returns the watched prefix, "<prefix><service>/".
func (w *Watcher) KeyPrefix() string { return w.keyPrefix }

// Malformed counts the values skipped as malformed since the watcher was
// made, once per key and revision (a resync does not count the same value
// again). Each is also logged once.
func (w *Watcher) Malformed() uint64 { return w.malformed.Load() }

// Watch implements discovery.Watcher. It returns nil when ctx is done, and
// an error only when the client has been closed. Calls one after the
// other are fine; each starts from a fresh Get.
func (w *Watcher) Watch(ctx context.Context, sink discovery.Sink) error {
	st := &watchState{keys: map[string]discovery.Instance{}, bad: map[string]badValue{}}
	bo := retry.New(retryInitial, retryMax)
	for {
		err := w.session(ctx, sink, st)
		if ctx.Err() != nil {
			return nil
		}
		if cerr := w.client.Ctx().Err(); cerr != nil {
			return fmt.Errorf("etcd: watch %s: client closed: %w", w.keyPrefix, cerr)
		}
		if st.synced {
			bo.Reset()
			st.synced = false
		}
		wait := bo.Next()
		switch {
		case errors.Is(err, ErrStale):
			wait = 0 // the member is avoided now: resync through another at once
		case w.Steer != nil:
			// Whatever failed, the client's endpoints should be those that
			// answer now (a member avoided earlier may be the only one left).
			w.Steer.Refresh(0)
		}
		w.log.Warn("etcd watch failed; resyncing", zap.Error(err), zap.Duration("retry_in", wait))
		sink.Error(err)
		if !retry.Sleep(ctx, wait) {
			return nil
		}
	}
}

// badValue is a key skipped as malformed, at a revision, for a reason.
type badValue struct {
	rev    int64
	reason string
}

// watchState is what one Watch call knows; only its goroutine touches it.
type watchState struct {
	rev    int64                         // highest revision applied
	keys   map[string]discovery.Instance // key -> instance, valid keys only
	bad    map[string]badValue           // key -> the malformed value skipped
	synced bool                          // a Get succeeded since the last failure
	pushed bool                          // a snapshot has been delivered
	last   discovery.Snapshot
	member uint64 // the member that last answered the watch
}

// session syncs once and follows the watch until it fails or ctx is done.
// It always returns an error unless ctx is done.
func (w *Watcher) session(ctx context.Context, sink discovery.Sink, st *watchState) error {
	gctx, cancel := context.WithTimeout(ctx, requestTimeout)
	resp, err := w.client.Get(gctx, w.keyPrefix, clientv3.WithPrefix())
	cancel()
	if err != nil {
		return fmt.Errorf("etcd: get %s: %w", w.keyPrefix, err)
	}
	w.resync(st, resp)
	st.synced = true
	w.publish(sink, st, true)

	sctx, stop := context.WithCancelCause(ctx)
	var wg sync.WaitGroup
	defer func() {
		stop(nil)
		wg.Wait()
	}()
	wg.Go(func() { w.watchConnection(sctx, stop) })

	// A watcher of our own, so that closing it surely ends this session's
	// gRPC watch stream and its goroutines, whatever else shares the client.
	watcher := clientv3.NewWatcher(w.client)
	defer watcher.Close()
	f := &follow{w: w, sink: sink, st: st, watcher: watcher, lastPub: time.Now(),
		// The watch's context names its gRPC stream: progress requests
		// must carry the same one (with its require-leader metadata) to
		// reach it.
		wctx: clientv3.WithRequireLeader(sctx)}
	if err := f.open(sctx, &wg); err != nil {
		return err
	}
	return f.run(sctx)
}

// follow is a session's watch: the responses applied to its state, and
// snapshots published no more often than their size allows. The session's
// goroutine owns it.
type follow struct {
	w       *Watcher
	sink    discovery.Sink
	st      *watchState
	watcher clientv3.Watcher
	wctx    context.Context
	wch     clientv3.WatchChan
	heard   time.Time // the member's last answer
	lastPub time.Time
	dirty   bool // applied, not yet published
}

// open starts the watch from the revision applied, not the next: etcd
// answers a progress request only for watches that started at or before
// its current revision, so a watch from rev+1 on a quiet cluster would
// never be answered (the events at rev itself are skipped by apply).
// Watch blocks until the member confirms the watch: a member that stopped
// answering must not hold the session there for ever.
func (f *follow) open(ctx context.Context, wg *sync.WaitGroup) error {
	created := make(chan clientv3.WatchChan, 1)
	wg.Go(func() {
		created <- f.watcher.Watch(f.wctx, f.w.keyPrefix,
			clientv3.WithPrefix(), clientv3.WithRev(f.st.rev),
			clientv3.WithPrevKV(), clientv3.WithProgressNotify())
	})
	select {
	case f.wch = <-created:
		f.heard = time.Now()
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-time.After(staleAfter):
		if f.w.Steer != nil {
			f.w.Steer.Refresh(f.st.member)
		}
		return fmt.Errorf("etcd: watch %s: member %x did not start the watch within %v: %w", f.w.keyPrefix, f.st.member, staleAfter, ErrStale)
	}
}

// take applies one watch response; an error ends the session.
func (f *follow) take(wr clientv3.WatchResponse, ok bool) error {
	st := f.st
	if !ok {
		return fmt.Errorf("etcd: watch %s (applied up to revision %d): channel closed", f.w.keyPrefix, st.rev)
	}
	if err := wr.Err(); err != nil {
		return fmt.Errorf("etcd: watch %s (applied up to revision %d): %w", f.w.keyPrefix, st.rev, err)
	}
	f.heard = time.Now()
	st.member = wr.Header.MemberId
	if wr.IsProgressNotify() {
		// Every event up to the header revision has been delivered.
		st.rev = max(st.rev, wr.Header.Revision)
		if !f.dirty {
			f.sink.Synced()
		}
		return nil
	}
	if f.w.apply(st, wr.Events) {
		f.dirty = true
	}
	return nil
}

// takeArrived takes every response already here: a burst is applied, and
// published, once.
func (f *follow) takeArrived() error {
	for {
		select {
		case wr, ok := <-f.wch:
			if err := f.take(wr, ok); err != nil {
				return err
			}
		default:
			return nil
		}
	}
}

// publish publishes what was applied.
func (f *follow) publish() {
	f.w.publish(f.sink, f.st, false)
	f.dirty, f.lastPub = false, time.Now()
}

// run follows the watch until it fails or ctx is done.
func (f *follow) run(ctx context.Context) error {
	progress := time.NewTicker(progressEvery)
	defer progress.Stop()
	flush := time.NewTimer(time.Hour)
	flush.Stop()
	defer flush.Stop()
	flushing := false
	for {
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case wr, ok := <-f.wch:
			if ctx.Err() != nil {
				return context.Cause(ctx)
			}
			if err := f.take(wr, ok); err != nil {
				return err
			}
			if err := f.takeArrived(); err != nil {
				return err
			}
			if f.dirty && !flushing {
				if d := spacing(len(f.st.keys)) - time.Since(f.lastPub); d > 0 {
					flush.Reset(d)
					flushing = true
				} else {
					f.publish()
				}
			}
		case <-flush.C:
			flushing = false
			if f.dirty {
				f.publish()
			}
		case <-progress.C:
			// Answers already here count, whichever case select took.
			if err := f.takeArrived(); err != nil {
				return err
			}
			if since := time.Since(f.heard); since > staleAfter {
				member := f.st.member
				if f.w.Steer != nil {
					f.w.Steer.Refresh(member)
				}
				return fmt.Errorf("etcd: watch %s: no answer from member %x for %v: %w", f.w.keyPrefix, member, since.Round(time.Millisecond), ErrStale)
			}
			f.watcher.RequestProgress(f.wctx)
		}
	}
}

// spacing is the least time between two snapshots of n instances.
func spacing(n int) time.Duration { return time.Duration(n) * publishCost }

// watchConnection ends the session (stop) when the client's connection to
// etcd fails. The client's watch retries a broken stream quietly and
// forever; without this, an etcd outage would go unreported.
func (w *Watcher) watchConnection(ctx context.Context, stop context.CancelCauseFunc) {
	conn := w.client.ActiveConnection()
	for {
		s := conn.GetState()
		if s == connectivity.TransientFailure || s == connectivity.Shutdown {
			stop(fmt.Errorf("etcd: watch %s: connection to %v is %s: %w", w.keyPrefix, w.client.Endpoints(), s, ErrUnavailable))
			return
		}
		if !conn.WaitForStateChange(ctx, s) {
			return
		}
	}
}

// resync replaces the state with a Get's result.
func (w *Watcher) resync(st *watchState, resp *clientv3.GetResponse) {
	rev := resp.Header.Revision
	if rev < st.rev {
		w.log.Warn("etcd revision went backwards (data dir wiped or restored?); taking the new state as is",
			zap.Int64("applied_revision", st.rev), zap.Int64("revision", rev))
	}
	keys := make(map[string]discovery.Instance, len(resp.Kvs))
	bad := map[string]badValue{}
	for _, kv := range resp.Kvs {
		in, err := parseInstance(w.keyPrefix, kv.Key, kv.Value)
		if err != nil {
			bad[string(kv.Key)] = w.malformedValue(st, kv, err)
			continue
		}
		keys[string(kv.Key)] = in
	}
	st.rev, st.keys, st.bad = rev, keys, bad
	st.member = resp.Header.MemberId
}

// apply applies watch events and reports whether the instance set or its
// warnings may have changed. All events of one revision arrive in one
// response, so skipping by the revision applied before this response keeps
// a transaction whole.
func (w *Watcher) apply(st *watchState, evs []*clientv3.Event) bool {
	applied := st.rev
	changed := false
	for _, ev := range evs {
		kv := ev.Kv
		if kv.ModRevision <= applied {
			continue
		}
		st.rev = max(st.rev, kv.ModRevision)
		key := string(kv.Key)
		if _, ok := st.bad[key]; ok {
			delete(st.bad, key)
			changed = true
		}
		switch ev.Type {
		case mvccpb.DELETE:
			if _, ok := st.keys[key]; ok {
				delete(st.keys, key)
				changed = true
			}
		case mvccpb.PUT:
			in, err := parseInstance(w.keyPrefix, kv.Key, kv.Value)
			if err != nil {
				// The key's current value is not an instance: whatever
				// it registered before is gone, as a resync would find.
				delete(st.keys, key)
				st.bad[key] = w.malformedValue(st, kv, err)
				changed = true
				continue
			}
			if st.keys[key] != in {
				st.keys[key] = in
				changed = true
			}
		}
	}
	return changed
}

// malformedValue records a skipped value, logging and counting it once per
// key and revision.
func (w *Watcher) malformedValue(st *watchState, kv *mvccpb.KeyValue, err error) badValue {
	b := badValue{rev: kv.ModRevision, reason: discovery.Truncate(err.Error())}
	if prev, ok := st.bad[string(kv.Key)]; !ok || prev.rev != kv.ModRevision {
		w.malformed.Add(1)
		w.log.Warn("skipping malformed instance value",
			zap.String("key", discovery.Truncate(string(kv.Key))), zap.Int64("revision", kv.ModRevision),
			zap.ByteString("value", truncate(kv.Value, 200)), zap.String("reason", b.reason))
	}
	return b
}

// publish delivers the current set: always after a Get (resync), else when
// it differs from the last one delivered.
func (w *Watcher) publish(sink discovery.Sink, st *watchState, resync bool) {
	// Sorted by key first, so that of two keys naming one address the
	// first key's instance is kept, whatever the map's order.
	keys := make([]string, 0, len(st.keys))
	for k := range st.keys {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	ins := make([]discovery.Instance, len(keys))
	for i, k := range keys {
		ins[i] = st.keys[k]
	}
	var warns []discovery.Warning
	for k, b := range st.bad {
		warns = append(warns, discovery.Warning{Key: discovery.Truncate(strings.TrimPrefix(k, w.keyPrefix)), Reason: b.reason})
	}
	snap := discovery.Snapshot{Instances: discovery.SortInstances(ins), Warnings: discovery.SortWarnings(warns), Resync: resync}
	if st.pushed && !resync && snap.Equal(st.last) {
		return
	}
	st.pushed, st.last = true, snap
	sink.Update(snap)
}
