package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/internal/testenv"
)

// The clustered registries: a 3-member etcd cluster of real etcd processes
// and a 3-server Consul cluster behind a client agent, started with the
// test environment's helpers (this command plays the test for them).

// leaderKiller is a registry whose leader can be killed, and restarted.
type leaderKiller interface {
	KillLeader() (restart func(), err error)
}

// env is a testenv.T for a command: cleanups run by close, failures panic
// (recovered by runCluster into an error).
type env struct {
	cleanups []func()
}

type envFailure struct{ error }

func (e *env) Helper() {}
func (e *env) Fatalf(format string, args ...any) {
	panic(envFailure{fmt.Errorf(format, args...)})
}
func (e *env) TempDir() string {
	dir, err := os.MkdirTemp("", "rota-bench-")
	if err != nil {
		e.Fatalf("temp dir: %v", err)
	}
	e.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
func (e *env) Cleanup(f func()) { e.cleanups = append(e.cleanups, f) }
func (e *env) close() {
	for i := len(e.cleanups) - 1; i >= 0; i-- {
		e.cleanups[i]()
	}
}

// catch turns an env failure in fn into an error.
func catch(fn func() error) (err error) {
	defer func() {
		if v := recover(); v != nil {
			f, ok := v.(envFailure)
			if !ok {
				panic(v)
			}
			err = f.error
		}
	}()
	return fn()
}

type etcdClusterRegistry struct {
	*etcdRegistry
	env *env
	cl  *testenv.EtcdCluster
}

func startEtcdCluster(ctx context.Context, log *zap.Logger) (*etcdClusterRegistry, error) {
	r := &etcdClusterRegistry{env: &env{}}
	err := catch(func() error {
		r.cl = testenv.StartEtcdCluster(r.env, 3)
		var err error
		r.etcdRegistry, err = newEtcdRegistry(ctx, r.cl.Endpoints(), log)
		return err
	})
	if err != nil {
		r.env.close()
		return nil, err
	}
	return r, nil
}

func (r *etcdClusterRegistry) Describe() string {
	return "a 3-member etcd v3.7 cluster of real etcd processes on loopback (scripts/etcd-bin), rota given every endpoint"
}

func (r *etcdClusterRegistry) KillLeader() (func(), error) {
	var restart func()
	err := catch(func() error {
		i := r.cl.Leader(r.env)
		if i < 0 {
			return fmt.Errorf("no etcd leader")
		}
		r.cl.Kill(i)
		restart = func() { _ = catch(func() error { r.cl.Start(i); return nil }) }
		return nil
	})
	return restart, err
}

func (r *etcdClusterRegistry) Close() {
	r.etcdRegistry.Close()
	r.env.close()
}

type consulClusterRegistry struct {
	*consulRegistry
	env *env
	cl  *testenv.ConsulCluster
}

func startConsulCluster(ctx context.Context, log *zap.Logger) (*consulClusterRegistry, error) {
	r := &consulClusterRegistry{env: &env{}, consulRegistry: &consulRegistry{known: map[string]bool{}}}
	err := catch(func() error {
		r.cl = testenv.StartConsulCluster(r.env, 3)
		return r.connect(r.cl.Addr(), log)
	})
	if err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

func (r *consulClusterRegistry) Describe() string {
	return "a 3-server Consul 1.20.1 cluster (raft_multiplier 1) on loopback, rota on a client agent; a change is a TTL check turning passing or critical"
}

func (r *consulClusterRegistry) KillLeader() (func(), error) {
	var restart func()
	err := catch(func() error {
		i := r.cl.Leader()
		if i < 0 {
			return fmt.Errorf("no consul leader")
		}
		r.cl.Kill(i)
		restart = func() { _ = catch(func() error { r.cl.Start(i); return nil }) }
		return nil
	})
	return restart, err
}

func (r *consulClusterRegistry) Close() {
	if r.consulRegistry.client != nil {
		r.consulRegistry.client.Close()
	}
	r.env.close()
}

// leaderLosses kills the registry's leader rounds times; each time a
// change is written as soon as the registry takes writes again, and the
// time from the kill to the first client connection routed accordingly is
// measured. The killed member comes back between rounds.
func (m *measurement) leaderLosses(ctx context.Context, lk leaderKiller, rounds int) ([]time.Duration, error) {
	var out []time.Duration
	flapper := m.backends[len(m.backends)-1]
	for range rounds {
		// The flapper deregistered first, so that the change is a
		// registration that must show up through the proxy.
		if _, err := m.change(ctx, false, flapper); err != nil {
			return out, err
		}
		restart, err := lk.KillLeader()
		if err != nil {
			return out, err
		}
		killed := time.Now()
		for {
			cctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
			err := m.reg.Register(cctx, flapper.Addr())
			cancel()
			if err == nil {
				break
			}
			if ctx.Err() != nil || time.Since(killed) > 30*time.Second {
				restart()
				return out, fmt.Errorf("no write accepted after the leader loss: %w", err)
			}
		}
		for {
			name, err := m.probeCounted(ctx)
			if err == nil && name == flapper.Name() {
				break
			}
			if ctx.Err() != nil || time.Since(killed) > 30*time.Second {
				restart()
				return out, fmt.Errorf("the change was not routed after the leader loss")
			}
		}
		out = append(out, time.Since(killed))
		restart()
	}
	return out, nil
}
