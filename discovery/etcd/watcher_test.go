package etcd

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"runtime/pprof"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rota-proxy/rota/internal/testenv"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/rota-proxy/rota/discovery"
)

const wait = 15 * time.Second // generous deadline for conditions under -race

// TestRegisterDeregisterExpiry: a Register call, its deregistration (ctx
// canceled) and the lease expiry of a crashed registrant each change the
// snapshot; a plain lease-attached put measures the write-to-snapshot
// latency.
func TestRegisterDeregisterExpiry(t *testing.T) {
	env := startEtcd(t)
	c := newClient(t, env.Endpoints())
	rec := startWatch(t, newWatcher(t, c, "web", nil))

	rec.waitSnap(t, wait) // first sync: empty, but delivered
	if u := rec.allUpdates(); len(u) != 1 {
		t.Fatalf("first sync: %d updates, want exactly 1 (empty)", len(u))
	}

	// Raw write to snapshot, over a few writes.
	direct := env.Client(t)
	lease, err := direct.Grant(ctxT(t), 30)
	if err != nil {
		t.Fatal(err)
	}
	var worst time.Duration
	for i, addr := range []string{"127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:9103"} {
		start := time.Now()
		putInstance(t, direct, addr, clientv3.WithLease(lease.ID))
		got := rec.waitSnap(t, wait, []string{"127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:9103"}[:i+1]...)
		d := got.Sub(start)
		worst = max(worst, d)
		t.Logf("put %s -> snapshot: %s", addr, d)
	}
	if _, err := direct.Revoke(ctxT(t), lease.ID); err != nil {
		t.Fatal(err)
	}
	rec.waitSnap(t, wait)

	// Register: lease, put, keepalive.
	regCtx, deregister := context.WithCancel(context.Background())
	defer deregister()
	regDone := make(chan error, 1)
	start := time.Now()
	go func() {
		regDone <- Register(regCtx, c, "", "web", "127.0.0.1:9001", 5*time.Second, zaptest.NewLogger(t))
	}()
	t.Logf("Register call -> snapshot: %s (grant + put + watch)", rec.waitSnap(t, wait, "127.0.0.1:9001").Sub(start))

	// Deregister: cancel the context; Register deletes the key and revokes.
	start = time.Now()
	deregister()
	t.Logf("Register ctx canceled -> snapshot without it: %s (delete + watch)", rec.waitSnap(t, wait).Sub(start))
	if err := <-regDone; err != nil {
		t.Fatalf("Register returned %v after ctx cancel, want nil", err)
	}

	// Crash: the registrant's client dies without deregistering; the key
	// stays until its 2 s lease expires.
	crashClient, err := NewClient(Config{Endpoints: env.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	crashDone := make(chan error, 1)
	go func() {
		crashDone <- Register(context.Background(), crashClient, "", "web", "127.0.0.1:9002", 2*time.Second, zaptest.NewLogger(t))
	}()
	rec.waitSnap(t, wait, "127.0.0.1:9002")
	crashed := time.Now()
	_ = crashClient.Close()

	err = <-crashDone
	if err == nil || !strings.Contains(err.Error(), "client closed") {
		t.Fatalf("Register with its client closed returned %v, want a client-closed error", err)
	}
	if resp, err := direct.Get(ctxT(t), DefaultPrefix+"web/127.0.0.1:9002"); err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("key of the crashed registrant: %v %v, want it still there until the lease expires", resp, err)
	}
	d := rec.waitSnap(t, wait).Sub(crashed)
	t.Logf("registrant crash -> snapshot without it: %s (lease TTL 2 s)", d)
	if errs := rec.allErrors(); len(errs) != 0 {
		t.Errorf("errors reported while etcd was healthy: %v", errs)
	}
	t.Logf("worst put -> snapshot: %s", worst)
}

// TestSharedClient: watchers of two services share one client; each sees
// only its own service, and stopping one leaves the other working.
func TestSharedClient(t *testing.T) {
	env := startEtcd(t)
	c := newClient(t, env.Endpoints())
	web := startWatch(t, newWatcher(t, c, "web", nil))

	api := &recorder{}
	ctx, stopAPI := context.WithCancel(context.Background())
	apiDone := make(chan error, 1)
	go func() { apiDone <- newWatcher(t, c, "api", nil).Watch(ctx, api) }()

	direct := env.Client(t)
	putInstance(t, direct, "127.0.0.1:9001")
	if _, err := direct.Put(ctxT(t), DefaultPrefix+"api/127.0.0.1:9501", instanceValue("127.0.0.1:9501")); err != nil {
		t.Fatal(err)
	}
	web.waitSnap(t, wait, "127.0.0.1:9001")
	api.waitSnap(t, wait, "127.0.0.1:9501")

	stopAPI()
	if err := <-apiDone; err != nil {
		t.Fatalf("api Watch returned %v", err)
	}
	putInstance(t, direct, "127.0.0.1:9002")
	web.waitSnap(t, wait, "127.0.0.1:9001", "127.0.0.1:9002")
}

// TestCompactionWhileDisconnected: the watcher is cut off etcd (etcd
// keeps running), instances change and history is compacted past the
// watcher's revision, the watcher comes back: it resyncs to exactly the
// live set. "hold" stalls the reconnect without failing it, so the
// client's watch resumes from its old revision and meets ErrCompacted;
// "refuse" fails the connection, so the watcher reports it and resyncs by
// a fresh Get.
func TestCompactionWhileDisconnected(t *testing.T) {
	for _, tc := range []struct {
		name  string
		mode  proxyMode
		cause func(error) bool
	}{
		{"hold", hold, func(err error) bool { return errors.Is(err, rpctypes.ErrCompacted) }},
		{"refuse", refuse, func(err error) bool { return errors.Is(err, ErrUnavailable) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := startEtcd(t)
			u, err := url.Parse(env.Endpoints()[0])
			if err != nil {
				t.Fatal(err)
			}
			proxy := startProxy(t, u.Host)
			rec := startWatch(t, newWatcher(t, newClient(t, []string{proxy.addr()}), "web", nil))
			direct := env.Client(t)

			putInstance(t, direct, "127.0.0.1:9001") // goes away while cut off
			putInstance(t, direct, "127.0.0.1:9002") // stays throughout
			rec.waitSnap(t, wait, "127.0.0.1:9001", "127.0.0.1:9002")
			before := len(rec.allUpdates())

			proxy.set(tc.mode)
			if tc.mode == refuse {
				rec.waitErr(t, wait, "connection failure reported", tc.cause)
			}
			deleteInstance(t, direct, "127.0.0.1:9001")
			putInstance(t, direct, "127.0.0.1:9003")
			putInstance(t, direct, "127.0.0.1:9004")
			rev := deleteInstance(t, direct, "127.0.0.1:9004")
			env.Compact(t, rev)
			if n := len(rec.allUpdates()); n != before {
				t.Fatalf("watcher got %d updates while cut off", n-before)
			}

			start := time.Now()
			proxy.set(pass)
			got := rec.waitSnap(t, wait, "127.0.0.1:9002", "127.0.0.1:9003")
			t.Logf("reconnect -> resynced snapshot: %s", got.Sub(start))
			err = rec.waitErr(t, wait, "the cause of the resync", tc.cause)
			t.Logf("reported: %v", err)

			for _, u := range rec.allUpdates()[before:] {
				addrs := u.snap.Addrs()
				if !strings.Contains(strings.Join(addrs, ","), "127.0.0.1:9002") {
					t.Errorf("live instance dropped in update %v", addrs)
				}
			}
			if n := len(rec.allUpdates()) - before; n != 1 {
				t.Errorf("%d updates after reconnecting, want 1 (straight to the live set)", n)
			}
		})
	}
}

// TestEtcdStopped: while etcd is down the watcher reports errors and
// delivers nothing (the last snapshot stays in force); changes made across
// two later restarts are picked up.
func TestEtcdStopped(t *testing.T) {
	env := startEtcd(t)
	rec := startWatch(t, newWatcher(t, newClient(t, env.Endpoints()), "web", nil))
	direct := env.Client(t)
	putInstance(t, direct, "127.0.0.1:9001")
	putInstance(t, direct, "127.0.0.1:9002")
	rec.waitSnap(t, wait, "127.0.0.1:9001", "127.0.0.1:9002")
	before := len(rec.allUpdates())

	stopped := time.Now()
	env.Stop()
	err := rec.waitErr(t, wait, "an error while etcd is down", func(error) bool { return true })
	t.Logf("etcd stopped -> sink.Error: %s: %v", time.Since(stopped), err)
	if !errors.Is(err, ErrUnavailable) {
		t.Errorf("first error %v does not wrap ErrUnavailable", err)
	}
	// Let the watcher retry against the dead server for a while: its
	// failed Gets must not produce updates.
	nErrs := len(rec.allErrors())
	testenv.Eventually(t, "a failed resync attempt", wait, func() bool { return len(rec.allErrors()) > nErrs })
	if n := len(rec.allUpdates()); n != before {
		t.Fatalf("%d updates while etcd was down", n-before)
	}

	env.Restart()
	deleteInstance(t, direct, "127.0.0.1:9001")
	putInstance(t, direct, "127.0.0.1:9003")
	env.Restart() // a second outage, right after the changes
	start := time.Now()
	putInstance(t, direct, "127.0.0.1:9004")
	got := rec.waitSnap(t, wait, "127.0.0.1:9002", "127.0.0.1:9003", "127.0.0.1:9004")
	t.Logf("last write after restarts -> snapshot: %s", got.Sub(start))

	for _, u := range rec.allUpdates()[before-1:] {
		if !strings.Contains(strings.Join(u.snap.Addrs(), ","), "127.0.0.1:9002") {
			t.Errorf("instance 9002, live throughout, missing from %v", u.snap.Addrs())
		}
	}
}

// TestMalformedAndForeignKeys: malformed values are skipped, counted and
// logged once per key and revision, and listed in the snapshot's warnings
// until fixed or deleted, both when found by the initial Get and when they
// arrive by the watch; keys of other services under the prefix are never
// seen; any id names an instance, whose address is the value's.
func TestMalformedAndForeignKeys(t *testing.T) {
	env := startEtcd(t)
	direct := env.Client(t)
	put := func(key, val string) {
		t.Helper()
		if _, err := direct.Put(ctxT(t), key, val); err != nil {
			t.Fatal(err)
		}
	}
	p := DefaultPrefix
	// Present before the watcher starts (found by Get).
	put(p+"web/127.0.0.1:9001", instanceValue("127.0.0.1:9001"))
	put(p+"web2/127.0.0.1:9201", instanceValue("127.0.0.1:9201")) // other service sharing a name prefix
	put(p+"webx", instanceValue("127.0.0.1:9202"))                // not under web/
	put(p+"api/127.0.0.1:9203", instanceValue("127.0.0.1:9203"))
	put(p+"web/127.0.0.1:9002", "not json")
	put(p+"web/127.0.0.1:9003", `{"Op":1,"Addr":"127.0.0.1:9003","Metadata":null}`)
	put(p+"web/127.0.0.1:9004", `{"Op":0,"Addr":"","Metadata":null}`)
	put(p+"web/127.0.0.1", `{"Op":0,"Addr":"127.0.0.1","Metadata":null}`)
	put(p+"web/heavy", `{"Op":0,"Addr":"127.0.0.1:9006","Metadata":{"weight":0}}`)
	put(p+"web/instance-1", `{"Op":0,"Addr":"127.0.0.1:9005","Metadata":{"weight":3}}`) // any id
	initialBad := 5

	core, logs := observer.New(zap.InfoLevel)
	lg := zap.New(core)
	w := newWatcher(t, newClient(t, env.Endpoints()), "web", lg)
	rec := startWatch(t, w)
	rec.waitSnap(t, wait, "127.0.0.1:9001", "127.0.0.1:9005")
	testenv.Eventually(t, "initial malformed values counted", wait, func() bool { return w.Malformed() == uint64(initialBad) })
	u, _ := rec.last()
	if len(u.snap.Warnings) != initialBad {
		t.Fatalf("warnings %v, want the %d malformed keys", u.snap.Warnings, initialBad)
	}
	for _, in := range u.snap.Instances {
		if in.Addr == "127.0.0.1:9005" && in.Weight != 3 {
			t.Fatalf("instance-1 has weight %d, want 3 from its metadata", in.Weight)
		}
	}

	// Arriving by the watch.
	put(p+"web/sub/127.0.0.1:9007", instanceValue("127.0.0.1:9007")) // an id with a slash: fine
	put(p+"web/127.0.0.1:0", instanceValue("127.0.0.1:0"))
	put(p+"web2/127.0.0.1:9204", instanceValue("127.0.0.1:9204"))
	put(p+"web/127.0.0.1:9008", instanceValue("127.0.0.1:9008")) // valid: a marker that all of the above was seen
	rec.waitSnap(t, wait, "127.0.0.1:9001", "127.0.0.1:9005", "127.0.0.1:9007", "127.0.0.1:9008")
	totalBad := initialBad + 1
	if got := w.Malformed(); got != uint64(totalBad) {
		t.Fatalf("Malformed() = %d, want %d", got, totalBad)
	}

	// A resync (etcd restarted) sees the same values at the same
	// revisions: not counted or logged again. Started again only once the
	// outage is reported: a restart can be over before the client's
	// connection notices (a CI run), and then no resync happens.
	env.Stop()
	rec.waitErr(t, wait, "the outage reported", func(err error) bool { return errors.Is(err, ErrUnavailable) })
	env.Start()
	put(p+"web/127.0.0.1:9009", instanceValue("127.0.0.1:9009"))
	rec.waitSnap(t, wait, "127.0.0.1:9001", "127.0.0.1:9005", "127.0.0.1:9007", "127.0.0.1:9008", "127.0.0.1:9009")
	if got := w.Malformed(); got != uint64(totalBad) {
		t.Fatalf("after resync Malformed() = %d, want still %d", got, totalBad)
	}

	// A valid instance overwritten with garbage drops out (and counts, and
	// is listed); fixing it brings it back and takes its warning away;
	// deleting a malformed key takes its warning away too.
	put(p+"web/127.0.0.1:9009", "{}")
	rec.waitSnap(t, wait, "127.0.0.1:9001", "127.0.0.1:9005", "127.0.0.1:9007", "127.0.0.1:9008")
	totalBad++
	if u, _ := rec.last(); len(u.snap.Warnings) != totalBad {
		t.Fatalf("warnings %v, want %d", u.snap.Warnings, totalBad)
	}
	put(p+"web/127.0.0.1:9009", instanceValue("127.0.0.1:9009"))
	if _, err := direct.Delete(ctxT(t), p+"web/127.0.0.1:9002"); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "fixed and deleted keys leave the warnings", wait, func() bool {
		u, _ := rec.last()
		return len(u.snap.Warnings) == totalBad-2 && len(u.snap.Instances) == 5
	})
	if got := w.Malformed(); got != uint64(totalBad) {
		t.Errorf("Malformed() = %d, want %d", got, totalBad)
	}
	logged := logs.FilterMessage("skipping malformed instance value").All()
	if len(logged) != totalBad {
		t.Errorf("logged %d malformed values, want %d", len(logged), totalBad)
	}
	for _, e := range logged {
		if k, _ := e.ContextMap()["key"].(string); !strings.HasPrefix(k, p+"web/") {
			t.Errorf("log entry without the key of service web: %v", e.ContextMap())
		}
	}
	for _, u := range rec.allUpdates() {
		for _, w := range u.snap.Warnings {
			if strings.Contains(w.Key, "/") && !strings.HasPrefix(w.Key, "sub/") {
				t.Errorf("warning names a key of another service: %v", w)
			}
		}
	}
	for _, err := range rec.allErrors() {
		if !errors.Is(err, ErrUnavailable) {
			t.Errorf("a malformed value was reported as a discovery error: %v", err)
		}
	}
}

func TestRegisterAfterFreshRestart(t *testing.T) {
	env := startEtcd(t)
	c := newClient(t, env.Endpoints())
	rec := startWatch(t, newWatcher(t, c, "web", nil))
	direct := env.Client(t)
	// Push the revision up, so that the fresh etcd starts far behind it.
	for range 20 {
		putInstance(t, direct, "127.0.0.1:9100")
	}
	deleteInstance(t, direct, "127.0.0.1:9100")

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Register(ctx, c, "", "web", "127.0.0.1:9001", 2*time.Second, zaptest.NewLogger(t)) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Register returned %v", err)
		}
	}()
	rec.waitSnap(t, wait, "127.0.0.1:9001")

	start := time.Now()
	env.RestartFresh()
	testenv.Eventually(t, "the key re-registered in the fresh etcd", wait, func() bool {
		resp, err := direct.Get(ctxT(t), DefaultPrefix+"web/127.0.0.1:9001")
		return err == nil && len(resp.Kvs) == 1 && resp.Kvs[0].Lease != 0
	})
	t.Logf("fresh restart -> key registered again: %s", time.Since(start))
	// The watcher may have seen the fresh, empty registry for a moment; it
	// must end up with the re-registered instance.
	rec.waitSnap(t, wait, "127.0.0.1:9001")
	t.Logf("fresh restart -> snapshot holds it again: %s", time.Since(start))

	// Later changes still arrive although the revisions restarted low.
	putInstance(t, direct, "127.0.0.1:9002")
	rec.waitSnap(t, wait, "127.0.0.1:9001", "127.0.0.1:9002")
}

// TestWatchClientClosed: Watch returns an error, not a busy loop, when
// its client is closed under it.
func TestWatchClientClosed(t *testing.T) {
	env := startEtcd(t)
	c, err := NewClient(Config{Endpoints: env.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	w := newWatcher(t, c, "web", nil)
	rec := &recorder{}
	done := make(chan error, 1)
	go func() { done <- w.Watch(context.Background(), rec) }()
	rec.waitSnap(t, wait)
	_ = c.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Watch returned nil after its client was closed")
		}
		t.Logf("Watch: %v", err)
	case <-time.After(wait):
		t.Fatal("Watch did not return after its client was closed")
	}
}

// A quiet watch still hears from its member (progress notifications on
// request), and says so: the registry is reachable, nothing changed.
func TestQuietWatchReportsSync(t *testing.T) {
	env := startEtcd(t)
	w := newWatcher(t, newClient(t, env.Endpoints()), "web", nil)
	rec := startWatch(t, w)
	rec.waitSnap(t, wait)
	before := rec.synced.Load()
	testenv.Eventually(t, "answers on a quiet watch", 5*time.Second, func() bool { return rec.synced.Load() >= before+3 })
	if errs := rec.allErrors(); len(errs) != 0 {
		t.Fatalf("errors on a healthy quiet watch: %v", errs)
	}
}

// A member that stops answering while its connection stays up (cut off,
// frozen) is noticed within a few seconds, not when gRPC's keepalive gives
// up 15 s later.
func TestFrozenMemberIsNoticed(t *testing.T) {
	env := startEtcd(t)
	u, _ := url.Parse(env.Endpoints()[0])
	p := startProxy(t, u.Host)
	w := newWatcher(t, newClient(t, []string{p.addr()}), "web", nil)
	rec := startWatch(t, w)
	rec.waitSnap(t, wait)
	p.freeze(true)
	frozen := time.Now()
	deadline := frozen.Add(10 * time.Second)
	for !slices.ContainsFunc(rec.allErrors(), func(err error) bool { return errors.Is(err, discovery.ErrStale) }) {
		if time.Now().After(deadline) {
			pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
			t.Fatalf("no stale watch reported 10s after the member froze; errors: %v", rec.allErrors())
		}
		time.Sleep(5 * time.Millisecond)
	}
	took := time.Since(frozen)
	t.Logf("frozen member noticed after %v", took)
	if took > 3*time.Second {
		t.Fatalf("a frozen member was noticed after %v", took)
	}
	p.freeze(false)
	p.set(pass) // cuts the frozen connections: the client reconnects
	putInstance(t, env.Client(t), "127.0.0.1:9301")
	rec.waitSnap(t, 15*time.Second, "127.0.0.1:9301")
}

// A key of a live registration deleted by hand is put back, on the same
// lease, while the registrant lives.
func TestRegisterKeepsItsKey(t *testing.T) {
	env := startEtcd(t)
	direct := env.Client(t)
	c := newClient(t, env.Endpoints())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- RegisterInstance(ctx, c, Registration{Service: "web", Addr: "127.0.0.1:9401", Weight: 7, TTL: 10 * time.Second}, zaptest.NewLogger(t))
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Register: %v", err)
		}
	}()
	key := DefaultPrefix + "web/127.0.0.1:9401"
	var lease int64
	testenv.Eventually(t, "the registration", wait, func() bool {
		resp, err := direct.Get(ctxT(t), key)
		if err != nil || len(resp.Kvs) != 1 {
			return false
		}
		lease = resp.Kvs[0].Lease
		return true
	})
	in, err := parseInstance(DefaultPrefix+"web/", []byte(key), mustGet(t, direct, key))
	if err != nil || in.Weight != 7 {
		t.Fatalf("registered %+v (%v), want weight 7 in its metadata", in, err)
	}
	for range 3 {
		if _, err := direct.Delete(ctxT(t), key); err != nil {
			t.Fatal(err)
		}
		deleted := time.Now()
		testenv.Eventually(t, "the key put back", wait, func() bool {
			resp, err := direct.Get(ctxT(t), key)
			return err == nil && len(resp.Kvs) == 1 && resp.Kvs[0].Lease == lease
		})
		t.Logf("deleted key put back after %v", time.Since(deleted))
	}
}

func mustGet(t *testing.T, c *clientv3.Client, key string) []byte {
	t.Helper()
	resp, err := c.Get(ctxT(t), key)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("get %s: %v", key, err)
	}
	return resp.Kvs[0].Value
}

// Two keys naming one address are one instance (gRPC's endpoints.Manager
// and rota register may both have written it), and the value's Metadata is
// kept as written, for what reads it beyond the weight.
func TestOneInstancePerAddressMetadataKept(t *testing.T) {
	env := startEtcd(t)
	direct := env.Client(t)
	p := DefaultPrefix
	for key, val := range map[string]string{
		p + "web/127.0.0.1:9001": instanceValue("127.0.0.1:9001"),
		p + "web/instance-1":     `{"Op":0,"Addr":"127.0.0.1:9001","Metadata":null}`,
		p + "web/zone-a":         `{"Op":0,"Addr":"127.0.0.1:9002","Metadata":{"weight":2,"zone":"a"}}`,
	} {
		if _, err := direct.Put(ctxT(t), key, val); err != nil {
			t.Fatal(err)
		}
	}
	w := newWatcher(t, newClient(t, env.Endpoints()), "web", zap.NewNop())
	rec := startWatch(t, w)
	rec.waitSnap(t, wait, "127.0.0.1:9001", "127.0.0.1:9002")
	u, _ := rec.last()
	if len(u.snap.Instances) != 2 {
		t.Fatalf("instances %+v, want one per address", u.snap.Instances)
	}
	for _, in := range u.snap.Instances {
		if in.Addr == "127.0.0.1:9002" && (in.Weight != 2 || !strings.Contains(string(in.Metadata), `"zone":"a"`)) {
			t.Fatalf("zone-a: weight %d, metadata %s; want 2 and the zone kept", in.Weight, in.Metadata)
		}
	}
}

// A registration cancelled the moment its key appears, while the put's
// answer may still be on its way, still removes the key at once instead of
// leaving it to its lease's TTL (which a demo backend's deregister wait
// caught: the key outlived the backend).
func TestCancelRightAfterTheKeyAppears(t *testing.T) {
	env := startEtcd(t)
	c := newClient(t, env.Endpoints())
	direct := env.Client(t)
	for i := range 20 {
		addr := fmt.Sprintf("127.0.0.1:%d", 9300+i)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- Register(ctx, c, "", "web", addr, time.Minute, zap.NewNop()) }()
		key := DefaultPrefix + "web/" + addr
		present := func() bool {
			gr, err := direct.Get(ctxT(t), key)
			return err == nil && gr.Count == 1
		}
		testenv.Eventually(t, "the key put", wait, present)
		cancel()
		if err := <-done; err != nil {
			t.Fatalf("Register = %v", err)
		}
		if present() {
			t.Fatalf("round %d: the key outlived its cancelled registration (a 1-minute lease)", i)
		}
	}
}
