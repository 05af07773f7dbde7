package etcd

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/naming/endpoints"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/internal/retry"
)

const (
	// DefaultTTL is the lease TTL Register uses when given none.
	DefaultTTL = 10 * time.Second
	// deregisterTimeout bounds the delete and revoke after ctx is done.
	deregisterTimeout = 3 * time.Second
)

// errLeaseLost is what Register logs when a held lease's keepalive ends.
var errLeaseLost = errors.New("lease keepalive ended: lease expired or etcd unreachable for longer than the TTL")

// Register keeps addr registered as an instance of service under prefix
// ("" means DefaultPrefix), with no weight: see RegisterInstance.
func Register(ctx context.Context, client *clientv3.Client, prefix, service, addr string, ttl time.Duration, logger *zap.Logger) error {
	return RegisterInstance(ctx, client, Registration{Prefix: prefix, Service: service, Addr: addr, TTL: ttl}, logger)
}

// Registration is what RegisterInstance registers.
type Registration struct {
	Prefix, Service, Addr string
	// Weight, 1-1000, goes in the value's Metadata.weight; 0 for none.
	Weight int
	// TTL is the lease's (rounded up to whole seconds; 0 means DefaultTTL).
	TTL time.Duration
}

// RegisterInstance keeps reg.Addr registered until ctx is done. It grants a
// lease of reg.TTL, puts <prefix><service>/<addr> with etcd's
// naming/endpoints value attached to the lease, and keeps the lease alive.
// It watches the key too: deleted by someone else while the lease lives,
// it is put back. When the lease is lost (etcd replaced by one with a fresh
// data dir, a partition longer than the TTL) or etcd cannot be reached, it
// grants and puts again on capped exponential backoff, never giving up.
// When ctx is done it deletes the key (only if it is still attached to its
// lease) and revokes the lease, within a short timeout of its own, and
// returns nil; if etcd is unreachable then, the key disappears when the
// lease expires.
//
// It returns an error for invalid arguments, and when client is closed
// under it (the caller owns and closes the client). A crashed process
// never deregisters; its key goes away with the lease after the TTL.
func RegisterInstance(ctx context.Context, client *clientv3.Client, reg Registration, logger *zap.Logger) error {
	if client == nil {
		return errors.New("etcd: register: nil client")
	}
	key, err := InstanceKey(reg.Prefix, reg.Service, reg.Addr)
	if err != nil {
		return fmt.Errorf("etcd: register: %w", err)
	}
	if reg.Weight < 0 || reg.Weight > 1000 {
		return fmt.Errorf("etcd: register: weight %d: want 1-1000 (or 0 for none)", reg.Weight)
	}
	ttl := reg.TTL
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	ttlSec := max(int64(math.Ceil(ttl.Seconds())), 1)
	if logger == nil {
		logger = zap.NewNop()
	}
	log := logger.Named("etcd").With(zap.String("key", key), zap.Int64("ttl_seconds", ttlSec))
	em, err := endpoints.NewManager(client, strings.TrimSuffix(key[:len(key)-len(reg.Addr)], "/"))
	if err != nil {
		return fmt.Errorf("etcd: register %s: %w", key, err)
	}
	ep := endpoints.Endpoint{Addr: reg.Addr}
	if reg.Weight > 0 {
		ep.Metadata = map[string]any{"weight": reg.Weight}
	}

	r := &registration{client: client, em: em, lease: clientv3.NewLease(client), key: key, ep: ep, ttl: ttlSec, log: log}
	defer r.lease.Close()

	bo := retry.New(retryInitial, retryMax)
	for {
		id, held, err := r.register(ctx)
		if ctx.Err() != nil {
			// Done during or after registration: clean up what we hold.
			if id != 0 {
				r.deregister(ctx, id)
			}
			return nil
		}
		if cerr := client.Ctx().Err(); cerr != nil {
			return fmt.Errorf("etcd: register %s: client closed: %w", key, cerr)
		}
		if held >= time.Duration(ttlSec)*time.Second {
			bo.Reset() // it held for a while: retry fast; a lease lost at once keeps backing off
		}
		wait := bo.Next()
		log.Warn("etcd registration lost; registering again", zap.Error(err), zap.Duration("retry_in", wait))
		if !retry.Sleep(ctx, wait) {
			return nil
		}
	}
}

// registration is one Register call's state; only its goroutine uses it.
type registration struct {
	client *clientv3.Client
	em     endpoints.Manager
	lease  clientv3.Lease // our own lessor, closed when Register returns
	key    string
	ep     endpoints.Endpoint
	ttl    int64
	log    *zap.Logger
}

// register grants, puts and holds the lease until it is lost or ctx is
// done. It returns the lease ID once one was granted (else 0), how long
// the registration held, and why it stopped.
func (r *registration) register(ctx context.Context) (clientv3.LeaseID, time.Duration, error) {
	// Everything below ends when ctx is done or the client is closed,
	// whichever comes first: a request on a closing client can otherwise
	// hang for seconds, past the lease's TTL.
	kctx, kcancel := context.WithCancel(ctx)
	defer kcancel()
	defer context.AfterFunc(r.client.Ctx(), kcancel)()
	rctx, cancel := context.WithTimeout(kctx, requestTimeout)
	defer cancel()
	g, err := r.lease.Grant(rctx, r.ttl)
	if err != nil {
		return 0, 0, fmt.Errorf("grant lease: %w", err)
	}
	// A put that failed may still have been applied (its answer lost to a
	// cancelled ctx): the lease is returned, so that a caller that is done
	// revokes it, and the key with it, instead of leaving it to its TTL.
	if err := r.put(rctx, g.ID); err != nil {
		return g.ID, 0, err
	}
	start := time.Now()
	ka, err := r.lease.KeepAlive(kctx, g.ID)
	if err != nil {
		return g.ID, 0, fmt.Errorf("keep lease %x alive: %w", g.ID, err)
	}
	r.log.Info("registered in etcd", zap.String("lease", fmt.Sprintf("%x", g.ID)))
	// Watch the key, so that a delete by someone else (etcdctl del, a
	// script cleaning up) is undone while this process lives. A watch that
	// ends (etcd unreachable) is left ended: the keepalive decides then.
	// (The client's own watcher: cancelling kctx ends this watch, and a
	// watcher of our own could not be closed promptly once the client is.)
	wch := r.client.Watch(kctx, r.key)
	if gr, err := r.client.Get(rctx, r.key); err == nil && gr.Count == 0 {
		r.restore(kctx, g.ID)
	}
	for {
		select {
		case <-ctx.Done():
			return g.ID, time.Since(start), ctx.Err()
		case <-r.client.Ctx().Done():
			return g.ID, time.Since(start), r.client.Ctx().Err()
		case wr, ok := <-wch:
			if !ok || wr.Err() != nil {
				wch = nil
				continue
			}
			for _, ev := range wr.Events {
				if ev.Type == mvccpb.DELETE {
					r.restore(kctx, g.ID)
				}
			}
		case _, ok := <-ka:
			if !ok {
				if ctx.Err() != nil {
					return g.ID, time.Since(start), ctx.Err()
				}
				return g.ID, time.Since(start), fmt.Errorf("lease %x: %w", g.ID, errLeaseLost)
			}
		}
	}
}

// put writes the key attached to lease id.
func (r *registration) put(ctx context.Context, id clientv3.LeaseID) error {
	if err := r.em.AddEndpoint(ctx, r.key, r.ep, clientv3.WithLease(id)); err != nil {
		return fmt.Errorf("put %s: %w", r.key, err)
	}
	return nil
}

// restore puts back the key someone deleted while its lease lives.
func (r *registration) restore(ctx context.Context, id clientv3.LeaseID) {
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	if err := r.put(rctx, id); err != nil {
		if ctx.Err() == nil {
			r.log.Warn("registration key deleted while its lease lives; putting it back failed", zap.Error(err))
		}
		return
	}
	r.log.Warn("registration key was deleted while its lease lives; put it back", zap.String("lease", fmt.Sprintf("%x", id)))
}

// deregister deletes the key if it is still attached to lease id (so as
// not to remove a newer registration of the same address) and revokes the
// lease, on a fresh short timeout since ctx is already done.
func (r *registration) deregister(ctx context.Context, id clientv3.LeaseID) {
	if r.client.Ctx().Err() != nil {
		return
	}
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), deregisterTimeout)
	defer cancel()
	_, derr := r.client.Txn(dctx).
		If(clientv3.Compare(clientv3.LeaseValue(r.key), "=", id)).
		Then(clientv3.OpDelete(r.key)).
		Commit()
	_, rerr := r.lease.Revoke(dctx, id)
	if err := errors.Join(derr, rerr); err != nil {
		r.log.Warn("etcd deregistration failed; the key goes when its lease expires", zap.Error(err))
		return
	}
	r.log.Info("deregistered from etcd")
}
