package server_test

import (
	"context"
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/discovery/etcd"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/server"
)

// etcdConfig is one listener "web" discovering service web in e.
func etcdConfig(e *testenv.Etcd) *config.Config {
	cfg := config.Default()
	ec := config.DefaultEtcd()
	ec.Endpoints = e.Endpoints()
	cfg.Registries.Etcd = &ec
	l := fastListener("web")
	l.Discovery, l.Service, l.Static = "etcd", "web", nil
	cfg.Listeners = []config.Listener{l}
	return cfg
}

// routed reports whether a request through addr reaches each of want and
// only them, within a few rounds of the rotation.
func routedSet(addr string, rounds int) (map[string]bool, error) {
	seen := map[string]bool{}
	for range rounds {
		ans, err := request(addr)
		if err != nil {
			return seen, err
		}
		seen[ans] = true
	}
	return seen, nil
}

func put(t *testing.T, c *clientv3.Client, addr string, lease clientv3.LeaseID) {
	t.Helper()
	key, err := etcd.InstanceKey("", "web", addr)
	if err != nil {
		t.Fatal(err)
	}
	val := `{"Op":0,"Addr":"` + addr + `","Metadata":null}`
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var opts []clientv3.OpOption
	if lease != 0 {
		opts = append(opts, clientv3.WithLease(lease))
	}
	if _, err := c.Put(ctx, key, val, opts...); err != nil {
		t.Fatal(err)
	}
}

func del(t *testing.T, c *clientv3.Client, addr string) {
	t.Helper()
	key, _ := etcd.InstanceKey("", "web", addr)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
}

// exactly waits until requests through addr reach exactly the named
// backends, and returns how long that took.
func exactly(t *testing.T, srv *server.Server, what string, want ...string) time.Duration {
	t.Helper()
	addr := proxyAddr(t, srv, "web")
	slices.Sort(want)
	return testenv.Eventually(t, what, 10*time.Second, func() bool {
		if liveCount(srv, "web") != len(want) {
			return false
		}
		seen, err := routedSet(addr, 3*len(want)+1)
		if len(want) == 0 {
			return err != nil && len(seen) == 0
		}
		if err != nil {
			return false
		}
		got := make([]string, 0, len(seen))
		for k := range seen {
			got = append(got, k)
		}
		slices.Sort(got)
		return slices.Equal(got, want)
	})
}

func TestEtcdRegistryDrivesRouting(t *testing.T) {
	e := testenv.StartEtcd(t)
	c := e.Client(t)
	b1, b2 := startBackend(t, "b1"), startBackend(t, "b2")
	put(t, c, b1.Addr, 0)
	srv := startServer(t, etcdConfig(e))
	t.Logf("initial sync routed after %v", exactly(t, srv, "b1 routed", "b1"))

	put(t, c, b2.Addr, 0)
	t.Logf("register -> routed in %v", exactly(t, srv, "b2 routed after put", "b1", "b2"))

	del(t, c, b1.Addr)
	t.Logf("deregister -> out of rotation in %v", exactly(t, srv, "b1 gone after delete", "b2"))

	// A crashed registrant: its key is on a lease nobody keeps alive.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	lease, err := c.Grant(ctx, 1)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	put(t, c, b1.Addr, lease.ID)
	exactly(t, srv, "b1 back", "b1", "b2")
	t.Logf("lease expiry -> out of rotation in %v", exactly(t, srv, "b1 gone after lease expiry", "b2"))

	// rota register's code path: Register holds the key until cancelled.
	rctx, rcancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- etcd.Register(rctx, c, "", "web", b1.Addr, 5*time.Second, nil) }()
	t.Logf("Register -> routed in %v", exactly(t, srv, "b1 registered", "b1", "b2"))
	rcancel()
	if err := <-done; err != nil {
		t.Fatalf("Register: %v", err)
	}
	t.Logf("Register cancelled -> out of rotation in %v", exactly(t, srv, "b1 deregistered", "b2"))
}

func TestEtcdOutageUnderLoadKeepsRouting(t *testing.T) {
	e := testenv.StartEtcd(t)
	c := e.Client(t)
	b1, b2, b3 := startBackend(t, "b1"), startBackend(t, "b2"), startBackend(t, "b3")
	put(t, c, b1.Addr, 0)
	put(t, c, b2.Addr, 0)
	srv := startServer(t, etcdConfig(e))
	exactly(t, srv, "b1 and b2 routed", "b1", "b2")
	addr := proxyAddr(t, srv, "web")

	ld := startLoad(t, addr, 6)
	e.Stop()
	testenv.Eventually(t, "the outage seen by discovery", 30*time.Second, func() bool {
		return srv.Status()[0].DiscoveryErrors > 0 || !srv.Status()[0].DiscoveryOK
	})
	before := ld.OK.Load()
	testenv.Eventually(t, "traffic during the outage", 10*time.Second, func() bool { return ld.OK.Load() > before+200 })
	if n := liveCount(srv, "web"); n != 2 {
		t.Fatalf("%d live targets during the outage, want the last good 2", n)
	}
	if ld.Count("b1") == 0 || ld.Count("b2") == 0 {
		t.Fatal("the last good set is not routed during the outage")
	}

	e.Restart()
	c2 := e.Client(t)
	put(t, c2, b3.Addr, 0)
	del(t, c2, b1.Addr)
	t.Logf("changes after the outage routed in %v", exactly(t, srv, "b2 and b3 after etcd is back", "b2", "b3"))
	ld.Stop()
	ld.AssertNoFailures(t)
	t.Logf("%d client connections across the outage, none failed", ld.OK.Load())
}

// Deleting the last instance on a healthy watch is believed at once: the
// registry is up and says so.
func TestDeregisteringTheLastInstanceAppliesAtOnce(t *testing.T) {
	e := testenv.StartEtcd(t)
	c := e.Client(t)
	b1 := startBackend(t, "b1")
	put(t, c, b1.Addr, 0)
	srv := startServer(t, etcdConfig(e))
	exactly(t, srv, "b1 routed", "b1")
	del(t, c, b1.Addr)
	took := exactly(t, srv, "the pool emptied")
	t.Logf("last instance removed %v after its key was deleted", took)
	if took > time.Second {
		t.Fatalf("the pool emptied %v after a deregistration on a healthy watch, want at once", took)
	}
}

// An empty answer right after the registry came back (here: etcd restarted
// with no data) may be a registry that lost its data: the last known
// instances keep serving for empty_hold before the answer is believed.
func TestEmptyAnswerAfterRestartIsHeld(t *testing.T) {
	e := testenv.StartEtcd(t)
	c := e.Client(t)
	b1 := startBackend(t, "b1")
	put(t, c, b1.Addr, 0)
	cfg := etcdConfig(e)
	const hold = 2 * time.Second
	cfg.Registries.EmptyHold = hold
	srv := startServer(t, cfg)
	exactly(t, srv, "b1 routed", "b1")
	addr := proxyAddr(t, srv, "web")

	e.RestartFresh()
	back := time.Now()
	testenv.Eventually(t, "the empty answer after the restart", 20*time.Second, func() bool {
		st := srv.Status()[0]
		return st.DiscoveryOK && !st.LastSync.Before(back)
	})
	for time.Since(back) < hold/2 {
		if _, err := request(addr); err != nil {
			t.Fatalf("%v after etcd came back empty, the last known instance was dropped: %v", time.Since(back), err)
		}
	}
	exactly(t, srv, "the pool emptied after the hold")
	if d := time.Since(back); d < hold {
		t.Fatalf("emptied %v after etcd came back, before the hold of %v", d, hold)
	}
}

func TestReloadSwitchesRegistry(t *testing.T) {
	a, b := testenv.StartEtcd(t), testenv.StartEtcd(t)
	b1, b2 := startBackend(t, "b1"), startBackend(t, "b2")
	put(t, a.Client(t), b1.Addr, 0)
	put(t, b.Client(t), b2.Addr, 0)
	cfg := etcdConfig(a)
	srv := startServer(t, cfg)
	exactly(t, srv, "b1 from the first etcd", "b1")

	next := etcdConfig(b)
	next.Listeners = cfg.Listeners
	if err := srv.Reload(context.Background(), next); err != nil {
		t.Fatal(err)
	}
	t.Logf("routing follows the new registry after %v", exactly(t, srv, "b2 from the second etcd", "b2"))

	// An embedded etcd cannot appear on reload: rejected, nothing changes.
	emb := etcdConfig(b)
	emb.Listeners = cfg.Listeners
	emb.Registries.Etcd.Embedded = &config.Embedded{DataDir: t.TempDir(), ClientURL: "http://127.0.0.1:0"}
	if err := srv.Reload(context.Background(), emb); err == nil {
		t.Fatal("a reload adding an embedded etcd was accepted")
	}
	exactly(t, srv, "b2 still routed", "b2")
}

// 10,000 instances registered at once are all routed within a second of
// the last write: the watcher publishes a burst once, the pool applies it
// in one batch.
func TestTenThousandInstancesRoutedAtOnce(t *testing.T) {
	e := testenv.StartEtcd(t)
	c := e.Client(t)
	cfg := etcdConfig(e)
	cfg.Listeners[0].Health.Check = "none" // trust the registry: discovery alone is measured
	srv := startServer(t, cfg)
	testenv.Eventually(t, "the first sync", 10*time.Second, func() bool { return srv.Status()[0].Synced })

	const n = 10_000
	ops := make([]clientv3.Op, 0, 128)
	flush := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := c.Txn(ctx).Then(ops...).Commit(); err != nil {
			t.Fatal(err)
		}
		ops = ops[:0]
	}
	for i := range n {
		addr := fmt.Sprintf("10.%d.%d.%d:80", i>>16&255, i>>8&255, i&255+1)
		key, _ := etcd.InstanceKey("", "web", addr)
		ops = append(ops, clientv3.OpPut(key, `{"Op":0,"Addr":"`+addr+`","Metadata":null}`))
		if len(ops) == cap(ops) {
			flush()
		}
	}
	flush()
	last := time.Now()
	// (Routed, not Status: building the status of 10,000 targets takes
	// 80-100 ms under -race, which the wait would mostly measure.)
	took := testenv.Eventually(t, "10,000 instances routed", 30*time.Second, func() bool { return srv.Routed("web") == n })
	t.Logf("10,000 instances routed %v after the last write", time.Since(last))
	if took > time.Second {
		t.Fatalf("10,000 instances routed %v after the last write, want within 1s", took)
	}
}

// A reload that removes a listener and replaces the registry clients it
// used stops that listener's discovery before closing the old clients: its
// open connection drains, and no watcher reports the client it was reading
// closed under it ("discovery stopped" was logged for each).
func TestReloadRetiresRemovedListenersWatchersQuietly(t *testing.T) {
	a, b := testenv.StartEtcd(t), testenv.StartEtcd(t)
	b1 := startBackend(t, "b1")
	put(t, a.Client(t), b1.Addr, 0)
	cfg := etcdConfig(a)
	core, logs := observer.New(zap.InfoLevel)
	srv, err := server.Start(context.Background(), cfg, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown(context.Background())
	exactly(t, srv, "b1 from the first etcd", "b1")
	held, err := net.Dial("tcp", proxyAddr(t, srv, "web"))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	testenv.Eventually(t, "the held connection open", 5*time.Second, func() bool { return srv.Status()[0].Count("active_conns", "") == 1 })

	next := etcdConfig(b) // other clients: the old ones are closed
	other := fastListener("other", b1.Addr)
	next.Listeners = []config.Listener{other}
	if err := srv.Reload(context.Background(), next); err != nil {
		t.Fatal(err)
	}
	held.Close() // the drain ends
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil { // waits for the removed listener
		t.Fatal(err)
	}
	if n := logs.FilterLevelExact(zap.ErrorLevel).Len(); n != 0 {
		t.Fatalf("%d error lines, want none; the first: %v", n, logs.FilterLevelExact(zap.ErrorLevel).All()[0])
	}
	if logs.FilterMessage("listener removed; draining").Len() != 1 {
		t.Fatal("the listener was not removed with its connection draining")
	}
}
