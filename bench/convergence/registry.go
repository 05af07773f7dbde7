package main

import (
	"context"
	"fmt"
	"os"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/discovery/etcd"
	"github.com/rota-proxy/rota/embedetcd"
)

// registry is what the benchmark changes and rota watches. Register and
// Deregister return once the registry has acknowledged the write: the
// clock starts just before they are called.
type registry interface {
	// Describe names the registry for the report.
	Describe() string
	Watcher() discovery.Watcher
	Register(ctx context.Context, addr string) error
	Deregister(ctx context.Context, addr string) error
	Close()
}

// etcdRegistry is an embedded etcd server (the one `rota demo` runs), a
// client shared by the watcher and the writes, and one lease that every
// instance key is attached to, as etcd.Register attaches its keys.
type etcdRegistry struct {
	dir     string
	srv     *embedetcd.Server
	client  *clientv3.Client
	lease   clientv3.LeaseID
	watcher *etcd.Watcher
	steer   *etcd.Steering
}

const service = "web"

func startEtcd(ctx context.Context, log *zap.Logger) (*etcdRegistry, error) {
	dir, err := os.MkdirTemp("", "rota-bench-etcd-")
	if err != nil {
		return nil, fmt.Errorf("etcd data dir: %w", err)
	}
	srv, err := embedetcd.Start(ctx, embedetcd.Config{
		DataDir:   dir,
		ClientURL: "http://127.0.0.1:0",
		Logger:    log,
	})
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	r, err := newEtcdRegistry(ctx, srv.Endpoints(), log)
	if err != nil {
		srv.Close()
		os.RemoveAll(dir)
		return nil, err
	}
	r.dir, r.srv = dir, srv
	return r, nil
}

// newEtcdRegistry is a registry on the etcd at endpoints, watched as rota
// watches it (steered off members that stop answering).
func newEtcdRegistry(ctx context.Context, endpoints []string, log *zap.Logger) (*etcdRegistry, error) {
	r := &etcdRegistry{}
	var err error
	r.client, err = etcd.NewClient(etcd.Config{Endpoints: endpoints, Logger: log})
	if err != nil {
		return nil, err
	}
	gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	g, err := r.client.Grant(gctx, 600)
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("etcd: grant lease: %w", err)
	}
	r.lease = g.ID
	r.watcher, err = etcd.NewWatcher(r.client, etcd.DefaultPrefix, service, log)
	if err != nil {
		r.Close()
		return nil, err
	}
	r.steer = etcd.NewSteering(r.client, log)
	r.watcher.Steer = r.steer
	return r, nil
}

func (r *etcdRegistry) Describe() string {
	return "etcd v3.7 embedded in-process (embedetcd), discovery/etcd watcher"
}

func (r *etcdRegistry) Watcher() discovery.Watcher { return r.watcher }

func (r *etcdRegistry) Register(ctx context.Context, addr string) error {
	key, err := etcd.InstanceKey(etcd.DefaultPrefix, service, addr)
	if err != nil {
		return err
	}
	val := fmt.Sprintf(`{"Op":0,"Addr":%q,"Metadata":null}`, addr)
	if _, err := r.client.Put(ctx, key, val, clientv3.WithLease(r.lease)); err != nil {
		return fmt.Errorf("etcd: put %s: %w", key, err)
	}
	return nil
}

func (r *etcdRegistry) Deregister(ctx context.Context, addr string) error {
	key, err := etcd.InstanceKey(etcd.DefaultPrefix, service, addr)
	if err != nil {
		return err
	}
	if _, err := r.client.Delete(ctx, key); err != nil {
		return fmt.Errorf("etcd: delete %s: %w", key, err)
	}
	return nil
}

// Close is called after every Watch has returned.
func (r *etcdRegistry) Close() {
	if r.steer != nil {
		r.steer.Close()
	}
	if r.client != nil {
		_ = r.client.Close()
	}
	if r.srv != nil {
		r.srv.Close()
	}
	if r.dir != "" {
		_ = os.RemoveAll(r.dir)
	}
}
