package etcd

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/naming/endpoints"
	"go.uber.org/zap"
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
// ("" means DefaultPrefix) until ctx is done. It grants a lease of ttl
// (rounded up to whole seconds; 0 means DefaultTTL), puts
// <prefix><service>/<addr> with etcd's naming/endpoints value attached to
// the lease, and keeps the lease alive. When the lease is lost (etcd
// replaced by one with a fresh data dir, a partition longer than ttl) or
// etcd cannot be reached, it grants and puts again on capped exponential
// backoff, never giving up. When ctx is done it deletes the key (only if
// it is still attached to its lease) and revokes the lease, within a short
// timeout of its own, and returns nil; if etcd is unreachable then, the
// key disappears when the lease expires.
//
// It returns an error for invalid arguments, and when client is closed
// under it (the caller owns and closes the client). A crashed process
// never deregisters; its key goes away with the lease after ttl.
func Register(ctx context.Context, client *clientv3.Client, prefix, service, addr string, ttl time.Duration, logger *zap.Logger) error {
	if client == nil {
		return errors.New("etcd: register: nil client")
	}
	key, err := InstanceKey(prefix, service, addr)
	if err != nil {
		return fmt.Errorf("etcd: register: %w", err)
	}
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	ttlSec := max(int64(math.Ceil(ttl.Seconds())), 1)
	if logger == nil {
		logger = zap.NewNop()
	}
	log := logger.Named("etcd").With(zap.String("key", key), zap.Int64("ttl_seconds", ttlSec))
	em, err := endpoints.NewManager(client, strings.TrimSuffix(key[:len(key)-len(addr)], "/"))
	if err != nil {
		return fmt.Errorf("etcd: register %s: %w", key, err)
	}

	r := &registration{client: client, em: em, lease: clientv3.NewLease(client), key: key, addr: addr, ttl: ttlSec, log: log}
	defer r.lease.Close()

	b := backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(retryInitial),
		backoff.WithMaxInterval(retryMax),
		backoff.WithMaxElapsedTime(0),
	)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
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
			b.Reset() // it held for a while: retry fast; a lease lost at once keeps backing off
		}
		wait := b.NextBackOff()
		log.Warn("etcd registration lost; registering again", zap.Error(err), zap.Duration("retry_in", wait))
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		}
	}
}

// registration is one Register call's state; only its goroutine uses it.
type registration struct {
	client *clientv3.Client
	em     endpoints.Manager
	lease  clientv3.Lease // our own lessor, closed when Register returns
	key    string
	addr   string
	ttl    int64
	log    *zap.Logger
}

// register grants, puts and holds the lease until it is lost or ctx is
// done. It returns the lease ID once the key was put (else 0), how long
// the registration held, and why it stopped.
func (r *registration) register(ctx context.Context) (clientv3.LeaseID, time.Duration, error) {
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	g, err := r.lease.Grant(rctx, r.ttl)
	if err != nil {
		return 0, 0, fmt.Errorf("grant lease: %w", err)
	}
	// A failed put leaves the lease to expire on its own.
	if err := r.em.AddEndpoint(rctx, r.key, endpoints.Endpoint{Addr: r.addr}, clientv3.WithLease(g.ID)); err != nil {
		return 0, 0, fmt.Errorf("put %s: %w", r.key, err)
	}
	start := time.Now()
	kctx, kcancel := context.WithCancel(ctx)
	defer kcancel()
	ka, err := r.lease.KeepAlive(kctx, g.ID)
	if err != nil {
		return g.ID, 0, fmt.Errorf("keep lease %x alive: %w", g.ID, err)
	}
	r.log.Info("registered in etcd", zap.String("lease", fmt.Sprintf("%x", g.ID)))
	for {
		select {
		case <-ctx.Done():
			return g.ID, time.Since(start), ctx.Err()
		case <-r.client.Ctx().Done():
			return g.ID, time.Since(start), r.client.Ctx().Err()
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
