package consul_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/hashicorp/consul/api"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/discovery/consul"
	"github.com/rota-proxy/rota/internal/testenv"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// recorder is a discovery.Sink keeping every snapshot and error.
type recorder struct {
	synced  atomic.Int64
	mu      sync.Mutex
	snaps   []discovery.Snapshot
	errs    []error
	updates atomic.Int64
}

func (r *recorder) Update(s discovery.Snapshot) {
	r.mu.Lock()
	r.snaps = append(r.snaps, s)
	r.mu.Unlock()
	r.updates.Add(1)
}

func (r *recorder) Synced() { r.synced.Add(1) }

func (r *recorder) Error(err error) {
	r.mu.Lock()
	r.errs = append(r.errs, err)
	r.mu.Unlock()
}

func (r *recorder) last() ([]string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.snaps) == 0 {
		return nil, false
	}
	return r.snaps[len(r.snaps)-1].Addrs(), true
}

func (r *recorder) errors() []error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]error(nil), r.errs...)
}

func (r *recorder) waitAddrs(t *testing.T, what string, want ...string) time.Duration {
	t.Helper()
	slices.Sort(want)
	return testenv.Eventually(t, what, 20*time.Second, func() bool {
		got, ok := r.last()
		return ok && slices.Equal(got, want)
	})
}

// watch runs w until the test ends.
func watch(t *testing.T, w discovery.Watcher) *recorder {
	t.Helper()
	r := &recorder{}
	testenv.RunWatcher(t, w, r)
	return r
}

// register adds a service instance with a TTL check in the given status.
func register(t *testing.T, c *api.Client, id string, port int, status string, tags ...string) {
	t.Helper()
	err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: id, Name: "web", Port: port, Address: "127.0.0.1", Tags: tags,
		Check: &api.AgentServiceCheck{CheckID: "check-" + id, TTL: "1h", Status: status},
	})
	if err != nil {
		t.Fatal(err)
	}
}

func setCheck(t *testing.T, c *api.Client, id, status string) {
	t.Helper()
	if err := c.Agent().UpdateTTL("check-"+id, "test", status); err != nil {
		t.Fatal(err)
	}
}

func newWatcher(t *testing.T, addr string, tags ...string) *consul.Watcher {
	t.Helper()
	return newLoggedWatcher(t, addr, zaptest.NewLogger(t), tags...)
}

// newLoggedWatcher is newWatcher logging to log (an observer, to count
// what it says).
func newLoggedWatcher(t *testing.T, addr string, log *zap.Logger, tags ...string) *consul.Watcher {
	t.Helper()
	c, err := consul.NewClient(consul.ClientConfig{Address: addr})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	w, err := consul.NewWatcher(c.API, "web", tags, log)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func TestPassingInstancesAreRoutedAndChangesFollow(t *testing.T) {
	agent := testenv.StartConsul(t)
	c := agent.Client(t)
	register(t, c, "a", 9001, api.HealthPassing)
	register(t, c, "b", 9002, api.HealthCritical)
	r := watch(t, newWatcher(t, agent.Addr()))
	r.waitAddrs(t, "initial passing set", "127.0.0.1:9001")

	register(t, c, "c", 9003, api.HealthPassing)
	t.Logf("registered passing -> snapshot in %v", r.waitAddrs(t, "c added", "127.0.0.1:9001", "127.0.0.1:9003"))

	setCheck(t, c, "a", api.HealthCritical)
	t.Logf("turned critical -> snapshot in %v", r.waitAddrs(t, "a critical", "127.0.0.1:9003"))

	setCheck(t, c, "b", api.HealthPassing)
	t.Logf("turned passing -> snapshot in %v", r.waitAddrs(t, "b passing", "127.0.0.1:9002", "127.0.0.1:9003"))

	if err := c.Agent().ServiceDeregister("c"); err != nil {
		t.Fatal(err)
	}
	t.Logf("deregistered -> snapshot in %v", r.waitAddrs(t, "c deregistered", "127.0.0.1:9002"))

	// A critical instance was never in any snapshot while critical.
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, s := range r.snaps {
		for _, a := range s.Addrs() {
			if a == "127.0.0.1:9002" && i < len(r.snaps)-2 {
				t.Fatalf("critical instance b routed in snapshot %d: %v", i, s.Addrs())
			}
		}
	}
}

func TestTagsMustAllMatch(t *testing.T) {
	agent := testenv.StartConsul(t)
	c := agent.Client(t)
	register(t, c, "a", 9001, api.HealthPassing, "v2", "blue")
	register(t, c, "b", 9002, api.HealthPassing, "v2")
	register(t, c, "c", 9003, api.HealthPassing, "blue")
	both := watch(t, newWatcher(t, agent.Addr(), "v2", "blue"))
	one := watch(t, newWatcher(t, agent.Addr(), "v2"))
	both.waitAddrs(t, "v2+blue", "127.0.0.1:9001")
	one.waitAddrs(t, "v2", "127.0.0.1:9001", "127.0.0.1:9002")
}

func TestServiceAddressElseNodeAddress(t *testing.T) {
	agent := testenv.StartConsul(t)
	c := agent.Client(t)
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "n", Name: "web", Port: 9005}); err != nil {
		t.Fatal(err)
	}
	// The dev agent's node address is 127.0.0.1.
	watch(t, newWatcher(t, agent.Addr())).waitAddrs(t, "node address used", "127.0.0.1:9005")
}

func TestAgentKilledKeepsLastSetThenFollowsNewAgent(t *testing.T) {
	agent := testenv.StartConsul(t)
	c := agent.Client(t)
	register(t, c, "a", 9001, api.HealthPassing)
	register(t, c, "b", 9002, api.HealthPassing)
	w := newWatcher(t, agent.Addr())
	w.BackoffMax = 200 * time.Millisecond
	r := watch(t, w)
	r.waitAddrs(t, "a and b", "127.0.0.1:9001", "127.0.0.1:9002")
	updates := r.updates.Load()

	agent.Kill()
	testenv.Eventually(t, "errors reported", 20*time.Second, func() bool { return len(r.errors()) >= 3 })
	if got, _ := r.last(); len(got) != 2 || r.updates.Load() != updates {
		t.Fatalf("an outage changed the routed set: %v", got)
	}

	// A new agent with fresh state (its index starts low again): the
	// watcher follows what it reports, without a hot loop.
	agent.Start()
	c = agent.Client(t)
	register(t, c, "z", 9009, api.HealthPassing)
	t.Logf("new agent's set routed %v after its registration", r.waitAddrs(t, "new agent's set", "127.0.0.1:9009"))
	q := w.Queries()
	// Give a hot loop the chance to show: at most a handful of queries
	// may pass in this window (blocking queries wait for changes).
	deadline := time.Now().Add(500 * time.Millisecond)
	for time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond) // observation window, not synchronisation
	}
	if n := w.Queries() - q; n > 5 {
		t.Fatalf("%d queries in 500ms with nothing changing: hot loop", n)
	}
}

// answerOneInstance is a fake agent's answer of one instance of web
// (10.0.0.1:9001) at index 7, blocking like a real agent's when asked to
// wait past index 7, until the test moves on.
func answerOneInstance(w http.ResponseWriter, r *http.Request) {
	if r.URL.Query().Get("index") == "7" {
		select {
		case <-r.Context().Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
	w.Header().Set("X-Consul-Index", "7")
	fmt.Fprint(w, `[{"Node":{"Node":"n1","Address":"10.0.0.1"},"Service":{"ID":"a","Service":"web","Address":"","Port":9001}}]`)
}

// watchFake watches web through a fake agent (cfg's address), retrying
// every 50 ms at most, once its first answer (answerOneInstance) is in.
func watchFake(t *testing.T, cfg consul.ClientConfig) *recorder {
	t.Helper()
	c, err := consul.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	w, err := consul.NewWatcher(c.API, "web", nil, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	w.BackoffMax = 50 * time.Millisecond
	r := watch(t, w)
	r.waitAddrs(t, "first answer", "10.0.0.1:9001")
	return r
}

// The error paths below need answers a dev agent will not give on demand
// (no leader, ACL denial); a plain HTTP server on loopback plays Consul for
// them. Everything else in this file runs against a real agent.
func TestErrorsKeepLastSetAndNeverLeakToken(t *testing.T) {
	var mode atomic.Int32 // 0: good answer, 1: 500 no leader, 2: 403
	var hits atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		switch mode.Load() {
		case 1:
			http.Error(w, "No cluster leader", http.StatusInternalServerError)
			return
		case 2:
			http.Error(w, "Permission denied", http.StatusForbidden)
			return
		}
		answerOneInstance(w, r)
	}))
	defer srv.Close()
	secret := "s3cr3t-token-value"
	tokenFile := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tokenFile, []byte(secret), 0o600)
	r := watchFake(t, consul.ClientConfig{Address: srv.URL, TokenFile: tokenFile})
	for _, m := range []int32{1, 2} {
		before := len(r.errors())
		mode.Store(m)
		testenv.Eventually(t, "errors reported", 20*time.Second, func() bool { return len(r.errors()) >= before+3 })
		if got, _ := r.last(); !slices.Equal(got, []string{"10.0.0.1:9001"}) {
			t.Fatalf("after errors the routed set is %v", got)
		}
	}
	for _, err := range r.errors() {
		if strings.Contains(err.Error(), secret) {
			t.Fatalf("token leaked into an error: %v", err)
		}
	}
	errs := r.errors()
	if !strings.Contains(errs[len(errs)-1].Error(), "403") {
		t.Fatalf("last error %v, want the 403", errs[len(errs)-1])
	}
	// The first answer after recovery is a resync (delivered, marked so);
	// identical answers after it only say the agent answered.
	n := r.updates.Load()
	synced := r.synced.Load()
	h := hits.Load()
	mode.Store(0)
	testenv.Eventually(t, "three good queries after recovery", 20*time.Second, func() bool { return hits.Load() >= h+3 })
	testenv.Eventually(t, "the answers reported", 20*time.Second, func() bool { return r.synced.Load() >= synced+2 })
	if got := r.updates.Load(); got != n+1 {
		t.Fatalf("%d snapshots delivered after recovery, want the one resync", got-n)
	}
	r.mu.Lock()
	resync := r.snaps[len(r.snaps)-1].Resync
	r.mu.Unlock()
	if !resync {
		t.Fatal("the first answer after recovery was not marked as a resync")
	}
}

// An agent that answers no instances while the cluster has no leader (an
// election after a partition, which took 20 s in the compose cluster's
// check) cannot have its answer confirmed: that is an outage, and the
// last known set stays for as long as it lasts, not for empty_hold. Once
// the leader confirms the emptiness, it is delivered.
func TestUnconfirmableEmptyAnswerKeepsLastSet(t *testing.T) {
	var mode atomic.Int32 // 0: one instance; 1: the agent says none, no leader; 2: the leader says none too
	var consistent atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, leader := r.URL.Query()["consistent"]
		if leader {
			consistent.Add(1)
		}
		m := mode.Load()
		switch {
		case m == 1 && leader:
			http.Error(w, "rpc error making call: Raft leader not found in server lookup mapping", http.StatusInternalServerError)
			return
		case m >= 1:
			w.Header().Set("X-Consul-Index", strconv.Itoa(int(8+m)))
			fmt.Fprint(w, `[]`)
			return
		}
		answerOneInstance(w, r)
	}))
	defer srv.Close()
	r := watchFake(t, consul.ClientConfig{Address: srv.URL})
	updates := r.updates.Load()
	mode.Store(1)
	testenv.Eventually(t, "five failed confirmations", 20*time.Second, func() bool { return len(r.errors()) >= 5 })
	if n := r.updates.Load(); n != updates {
		got, _ := r.last()
		t.Fatalf("%d snapshots delivered while the emptiness could not be confirmed (last: %v), want none", n-updates, got)
	}
	errs := r.errors()
	if e := errs[len(errs)-1].Error(); !strings.Contains(e, "could not be confirmed with the leader") || !strings.Contains(e, "Raft leader not found") {
		t.Fatalf("error %q", e)
	}
	mode.Store(2)
	r.waitAddrs(t, "the emptiness confirmed by the leader: delivered")
	if consistent.Load() == 0 {
		t.Fatal("no consistent query asked the leader")
	}
}

// A malformed entry (here a port of 0) is a warning, logged once while it
// lasts, never a failure: the good instances are routed, and the warning
// goes when the entry does. Removing the last instance from a healthy
// agent applies at once (no hold: the watch never failed).
func TestMalformedEntriesAreWarningsLoggedOnce(t *testing.T) {
	agent := testenv.StartConsul(t)
	c := agent.Client(t)
	register(t, c, "good", 9101, api.HealthPassing)
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "bad", Name: "web", Port: 0, Address: "127.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.WarnLevel)
	w := newLoggedWatcher(t, agent.Addr(), zap.New(core))
	w.MinBetween = 5 * time.Millisecond
	r := watch(t, w)
	r.waitAddrs(t, "the good instance routed", "127.0.0.1:9101")
	warned := func() []discovery.Warning {
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.snaps[len(r.snaps)-1].Warnings
	}
	if ws := warned(); len(ws) != 1 || ws[0].Key != "bad" || !strings.Contains(ws[0].Reason, "port 0") {
		t.Fatalf("warnings = %+v", ws)
	}
	// More answers (another instance's check flapping) log nothing new.
	register(t, c, "other", 9102, api.HealthPassing)
	r.waitAddrs(t, "another instance routed", "127.0.0.1:9101", "127.0.0.1:9102")
	if n := logs.FilterMessage("malformed registry entry skipped").Len(); n != 1 {
		t.Fatalf("malformed entry logged %d times, want once", n)
	}
	if err := c.Agent().ServiceDeregister("bad"); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "the warning gone with its entry", 20*time.Second, func() bool { return len(warned()) == 0 })
	for _, id := range []string{"good", "other"} {
		if err := c.Agent().ServiceDeregister(id); err != nil {
			t.Fatal(err)
		}
	}
	r.waitAddrs(t, "the last instance removed at once")
	r.mu.Lock()
	last := r.snaps[len(r.snaps)-1]
	r.mu.Unlock()
	if last.Resync {
		t.Fatal("an empty answer on a healthy watch was marked as a resync (it would be held)")
	}
}

// A node whose agent the leader cannot reach by gossip fails its serfHealth
// check, and every instance on it stops passing. When that empties the pool
// it is held like a resync: a leader just elected reports the members it was
// cut off from that way until gossip catches up (a compose check saw a pool
// emptied for 40-140 ms after a Consul majority recovered), and rota probes
// the instances itself. Here the node's agent is really killed; the answer
// is held, not dropped, and stays empty.
func TestEmptyBecauseNodeUnreachableIsHeld(t *testing.T) {
	cl := testenv.StartConsulCluster(t, 1)
	register(t, cl.Client(t), "a", 9301, api.HealthPassing)
	core, logs := observer.New(zap.WarnLevel)
	w := newLoggedWatcher(t, cl.ServerAddr(0), zap.New(core))
	r := watch(t, w)
	r.waitAddrs(t, "the instance on the client agent's node routed", "127.0.0.1:9301")
	cl.KillClient()
	testenv.Eventually(t, "the node failed by gossip and the instance gone", 60*time.Second, func() bool {
		got, ok := r.last()
		return ok && len(got) == 0
	})
	r.mu.Lock()
	last := r.snaps[len(r.snaps)-1]
	r.mu.Unlock()
	if !last.Resync {
		t.Fatal("an empty answer caused only by serfHealth was applied at once (not marked as a resync to hold)")
	}
	if n := logs.FilterMessageSnippet("cannot reach their nodes by gossip").Len(); n != 1 {
		t.Fatalf("the hold logged %d times, want once", n)
	}
}
