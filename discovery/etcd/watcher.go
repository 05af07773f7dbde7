package etcd

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/connectivity"

	"github.com/rota-proxy/rota/discovery"
)

// ErrUnavailable is wrapped by errors reporting that the client lost its
// connection to every etcd endpoint.
var ErrUnavailable = errors.New("etcd unavailable")

const (
	// requestTimeout bounds one Get. While etcd is down a Get waits this
	// long for the connection to come back before it counts as failed.
	requestTimeout = 5 * time.Second
	// Resync backoff: from retryInitial up to retryMax, never giving up;
	// reset once a Get succeeds.
	retryInitial = 100 * time.Millisecond
	retryMax     = 5 * time.Second
)

// Watcher implements discovery.Watcher for one service in etcd.
//
// Watch does a Get of <prefix><service>/ and then watches from the next
// revision (WithPrevKV, WithProgressNotify, WithRequireLeader). It
// resyncs with a fresh Get and a new watch, on capped exponential
// backoff, when the watch channel closes, the watch is canceled (a
// compaction, a lost leader) or the client's connection to etcd fails.
// Events at revisions already applied are ignored. A value that is not a
// valid instance is skipped (see Malformed); it never stops the watcher.
type Watcher struct {
	client    *clientv3.Client
	keyPrefix string // <prefix><service>/
	log       *zap.Logger
	malformed atomic.Uint64
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
// again). Each is also logged once and reported as a *MalformedError
// through Sink.Error.
func (w *Watcher) Malformed() uint64 { return w.malformed.Load() }

// Watch implements discovery.Watcher. It returns nil when ctx is done, and
// an error only when the client has been closed. Calls one after the
// other are fine; each starts from a fresh Get.
func (w *Watcher) Watch(ctx context.Context, sink discovery.Sink) error {
	st := &watchState{addrs: map[string]string{}, bad: map[string]int64{}}
	b := backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(retryInitial),
		backoff.WithMaxInterval(retryMax),
		backoff.WithMaxElapsedTime(0),
	)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		err := w.session(ctx, sink, st)
		if ctx.Err() != nil {
			return nil
		}
		if cerr := w.client.Ctx().Err(); cerr != nil {
			return fmt.Errorf("etcd: watch %s: client closed: %w", w.keyPrefix, cerr)
		}
		if st.synced {
			b.Reset()
			st.synced = false
		}
		wait := b.NextBackOff()
		w.log.Warn("etcd watch failed; resyncing", zap.Error(err), zap.Duration("retry_in", wait))
		sink.Error(err)
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		}
	}
}

// watchState is what one Watch call knows; only its goroutine touches it.
type watchState struct {
	rev    int64             // highest revision applied
	addrs  map[string]string // key -> instance address, valid keys only
	bad    map[string]int64  // key -> ModRevision of a skipped value already reported
	synced bool              // a Get succeeded since the last failure
	pushed bool              // a snapshot has been delivered
	last   discovery.Snapshot
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
	w.resync(sink, st, resp)
	st.synced = true
	w.publish(sink, st)

	sctx, stop := context.WithCancelCause(ctx)
	var wg sync.WaitGroup
	defer func() {
		stop(nil)
		wg.Wait()
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		w.watchConnection(sctx, stop)
	}()

	// A watcher of our own, so that closing it surely ends this session's
	// gRPC watch stream and its goroutines, whatever else shares the client.
	watcher := clientv3.NewWatcher(w.client)
	defer watcher.Close()
	wch := watcher.Watch(clientv3.WithRequireLeader(sctx), w.keyPrefix,
		clientv3.WithPrefix(), clientv3.WithRev(st.rev+1),
		clientv3.WithPrevKV(), clientv3.WithProgressNotify())
	for {
		select {
		case <-sctx.Done():
			return context.Cause(sctx)
		case wr, ok := <-wch:
			if sctx.Err() != nil {
				return context.Cause(sctx)
			}
			if !ok {
				return fmt.Errorf("etcd: watch %s (applied up to revision %d): channel closed", w.keyPrefix, st.rev)
			}
			if err := wr.Err(); err != nil {
				return fmt.Errorf("etcd: watch %s (applied up to revision %d): %w", w.keyPrefix, st.rev, err)
			}
			if wr.IsProgressNotify() {
				// Every event up to the header revision has been delivered.
				st.rev = max(st.rev, wr.Header.Revision)
				continue
			}
			if w.apply(sink, st, wr.Events) {
				w.publish(sink, st)
			}
		}
	}
}

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
func (w *Watcher) resync(sink discovery.Sink, st *watchState, resp *clientv3.GetResponse) {
	rev := resp.Header.Revision
	if rev < st.rev {
		w.log.Warn("etcd revision went backwards (data dir wiped or restored?); taking the new state as is",
			zap.Int64("applied_revision", st.rev), zap.Int64("revision", rev))
	}
	addrs := make(map[string]string, len(resp.Kvs))
	bad := map[string]int64{}
	for _, kv := range resp.Kvs {
		addr, err := parseInstance(w.keyPrefix, kv.Key, kv.Value)
		if err != nil {
			if st.bad[string(kv.Key)] != kv.ModRevision {
				w.reportMalformed(sink, kv, err)
			}
			bad[string(kv.Key)] = kv.ModRevision
			continue
		}
		addrs[string(kv.Key)] = addr
	}
	st.rev, st.addrs, st.bad = rev, addrs, bad
}

// apply applies watch events and reports whether the instance set may have
// changed. All events of one revision arrive in one response, so skipping
// by the revision applied before this response keeps a transaction whole.
func (w *Watcher) apply(sink discovery.Sink, st *watchState, evs []*clientv3.Event) bool {
	applied := st.rev
	changed := false
	for _, ev := range evs {
		kv := ev.Kv
		if kv.ModRevision <= applied {
			continue
		}
		st.rev = max(st.rev, kv.ModRevision)
		key := string(kv.Key)
		switch ev.Type {
		case mvccpb.DELETE:
			if _, ok := st.addrs[key]; ok {
				delete(st.addrs, key)
				changed = true
			}
			delete(st.bad, key)
		case mvccpb.PUT:
			addr, err := parseInstance(w.keyPrefix, kv.Key, kv.Value)
			if err != nil {
				// The key's current value is not an instance: whatever
				// it registered before is gone, as a resync would find.
				if _, ok := st.addrs[key]; ok {
					delete(st.addrs, key)
					changed = true
				}
				if st.bad[key] != kv.ModRevision {
					w.reportMalformed(sink, kv, err)
					st.bad[key] = kv.ModRevision
				}
				continue
			}
			delete(st.bad, key)
			if st.addrs[key] != addr {
				st.addrs[key] = addr
				changed = true
			}
		}
	}
	return changed
}

func (w *Watcher) reportMalformed(sink discovery.Sink, kv *mvccpb.KeyValue, err error) {
	w.malformed.Add(1)
	w.log.Warn("skipping malformed instance value",
		zap.String("key", string(kv.Key)), zap.Int64("revision", kv.ModRevision),
		zap.ByteString("value", truncate(kv.Value, 200)), zap.Error(err))
	sink.Error(&MalformedError{Key: string(kv.Key), Revision: kv.ModRevision, Reason: err.Error()})
}

// publish delivers the current set if it differs from the last one
// delivered, and always the first time.
func (w *Watcher) publish(sink discovery.Sink, st *watchState) {
	addrs := make([]string, 0, len(st.addrs))
	for _, a := range st.addrs {
		addrs = append(addrs, a)
	}
	snap := discovery.NewSnapshot(addrs...)
	if st.pushed && snap.Equal(st.last) {
		return
	}
	st.pushed, st.last = true, snap
	sink.Update(snap)
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}
