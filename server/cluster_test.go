package server_test

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/rota-proxy/rota/internal/testenv"
)

// A 3-member etcd cluster, rota given all three endpoints (through proxies
// that can cut each member off the network): while clients stream through
// rota, each member in turn is cut off (the one rota's watch is on among
// them) and the leader is killed. Every time, rota keeps routing the last
// good set with no failed client connection, and a change written to the
// surviving majority is routed within 3 s of the fault.
func TestEtcdClusterFaults(t *testing.T) {
	cl := testenv.StartEtcdCluster(t, 3)
	var endpoints []string
	var proxies []*testenv.TCPProxy
	for i := range 3 {
		u, _ := url.Parse(cl.Endpoint(i))
		p := testenv.StartTCPProxy(t, u.Host)
		proxies = append(proxies, p)
		endpoints = append(endpoints, p.Addr())
	}
	writer := cl.Client(t)
	backends := []*backend{startBackend(t, "b0"), startBackend(t, "b1")}
	for _, b := range backends {
		put(t, writer, b.Addr, 0)
	}
	cfg := etcdConfig(testenv.StartEtcd(t)) // a template; endpoints replaced below
	cfg.Registries.Etcd.Endpoints = endpoints
	srv := startServer(t, cfg)
	exactly(t, srv, "b0 and b1 routed", "b0", "b1")
	ld := startLoad(t, proxyAddr(t, srv, "web"), 6)

	type fault struct {
		name     string
		do, undo func()
	}
	var faults []fault
	for i := range 3 {
		faults = append(faults, fault{
			name: fmt.Sprintf("member %d cut off from rota", i),
			do:   func() { proxies[i].Freeze(true) },
			undo: func() { proxies[i].Freeze(false); proxies[i].Cut() },
		})
	}
	for i := range 3 {
		faults = append(faults, fault{
			name: fmt.Sprintf("member %d killed", i),
			do:   func() { cl.Kill(i) },
			undo: func() { cl.Start(i) },
		})
	}
	var leader int
	faults = append(faults,
		fault{
			name: "leader killed",
			do: func() {
				if leader = cl.Leader(t); leader < 0 {
					t.Fatal("no leader")
				}
				cl.Kill(leader)
			},
			undo: func() { cl.Start(leader) },
		},
		fault{
			name: "leader frozen (SIGSTOP)",
			do: func() {
				if leader = cl.Leader(t); leader < 0 {
					t.Fatal("no leader")
				}
				cl.Freeze(leader)
			},
			undo: func() { cl.Thaw(leader) },
		})
	for n, f := range faults {
		b := startBackend(t, fmt.Sprintf("b%d", n+2))
		want := []string{"b0", "b1", b.Name}
		f.do()
		at := time.Now()
		// On a lease: a put that timed out while there was no leader may
		// still be applied later (the frozen leader proposes it once it
		// runs again), after the delete below; revoking the lease leaves
		// such a late put nothing to attach to.
		lease := retrying(t, "grant a lease", func(ctx context.Context) (clientv3.LeaseID, error) {
			g, err := writer.Grant(ctx, 60)
			if err != nil {
				return 0, err
			}
			return g.ID, nil
		})
		putRetrying(t, writer, b.Addr, lease)
		took := exactly(t, srv, "the change routed after: "+f.name, want...)
		since := time.Since(at)
		t.Logf("%s: a change written to the majority routed %v after the fault", f.name, since.Round(time.Millisecond))
		if since > 3*time.Second {
			t.Errorf("%s: change routed %v after the fault, want within 3s (waited %v)", f.name, since, took)
		}
		f.undo()
		retrying(t, "revoke the lease", func(ctx context.Context) (struct{}, error) {
			_, err := writer.Revoke(ctx, lease)
			if errors.Is(err, rpctypes.ErrLeaseNotFound) {
				err = nil // an earlier attempt did it
			}
			return struct{}{}, err
		})
		exactly(t, srv, "back to b0 and b1", "b0", "b1")
	}
	ld.Stop()
	ld.AssertNoFailures(t)
	t.Logf("%d client connections through the faults, none failed", ld.OK.Load())
}

// putRetrying registers addr on lease, retrying while the cluster has no
// leader.
func putRetrying(t *testing.T, c *clientv3.Client, addr string, lease clientv3.LeaseID) {
	t.Helper()
	retrying(t, "put "+addr, func(ctx context.Context) (struct{}, error) {
		_, err := c.Put(ctx, "services/web/"+addr, `{"Op":0,"Addr":"`+addr+`","Metadata":null}`, clientv3.WithLease(lease))
		return struct{}{}, err
	})
}

// retrying runs op until it succeeds, each attempt bounded, for 10 s at
// most: the cluster may have no leader for a while.
func retrying[T any](t *testing.T, what string, op func(context.Context) (T, error)) T {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		v, err := op(ctx)
		cancel()
		if err == nil {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
	}
}

// A 3-server Consul cluster, rota on a client agent: the leader is killed
// while clients stream through rota. rota keeps routing the last good set
// with no failed client connection, does not hammer the agent while there
// is no leader (500 "No cluster leader"), and routes a change registered
// once a new leader is elected.
func TestConsulClusterLeaderLoss(t *testing.T) {
	cl := testenv.StartConsulCluster(t, 3)
	c := cl.Client(t)
	b0, b1 := startBackend(t, "b0"), startBackend(t, "b1")
	consulRegister(t, c, b0, api.HealthPassing)
	consulRegister(t, c, b1, api.HealthPassing)
	srv := startServer(t, consulConfig(cl.Addr()))
	exactly(t, srv, "b0 and b1 routed", "b0", "b1")
	ld := startLoad(t, proxyAddr(t, srv, "web"), 6)

	for round := range 2 {
		leader := cl.Leader()
		if leader < 0 {
			t.Fatal("no leader")
		}
		errsBefore := srv.Status()[0].DiscoveryErrors
		cl.Kill(leader)
		killed := time.Now()
		b := startBackend(t, fmt.Sprintf("b%d", round+2))
		// Registered once a new leader is elected: registered before, the
		// agent's sync to the catalog fails and waits for its anti-entropy
		// retry, which is Consul's pace, not rota's.
		testenv.Eventually(t, "a new Consul leader", 30*time.Second, func() bool {
			l := cl.Leader()
			return l >= 0 && l != leader
		})
		consulRegister(t, c, b, api.HealthPassing)
		took := exactly(t, srv, "the change routed after the leader loss", "b0", "b1", b.Name)
		t.Logf("leader killed: a change registered once a new leader was elected routed %v after the kill", time.Since(killed).Round(time.Millisecond))
		if errs := srv.Status()[0].DiscoveryErrors - errsBefore; errs > 40 {
			t.Errorf("%d discovery errors in the %v without a leader: a hot loop", errs, took)
		}
		cl.Start(leader)
		if err := c.Agent().ServiceDeregister(b.Name); err != nil {
			t.Fatal(err)
		}
		exactly(t, srv, "back to b0 and b1", "b0", "b1")
	}
	ld.Stop()
	ld.AssertNoFailures(t)
	t.Logf("%d client connections through two leader losses, none failed", ld.OK.Load())
}
