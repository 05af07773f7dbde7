package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/rota-proxy/rota/discovery/etcd"
	"github.com/rota-proxy/rota/internal/testenv"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const wait = 15 * time.Second

// get does one request on a fresh connection and returns status, body and
// the X-Backend header.
func get(t *testing.T, method, url string) (int, string, string) {
	t.Helper()
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(t.Context(), method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body), resp.Header.Get("X-Backend")
}

func refused(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return true
	}
	_ = c.Close()
	return false
}

func TestBackendAnswers(t *testing.T) {
	b, err := StartBackend(t.Context(), "backend-1", "")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(b.Addr(), "127.0.0.1:") || strings.HasSuffix(b.Addr(), ":0") {
		t.Fatalf("Addr() = %q, want 127.0.0.1 with a real port", b.Addr())
	}
	if b.Name() != "backend-1" || b.URL() != "http://"+b.Addr()+"/" {
		t.Fatalf("Name() %q URL() %q", b.Name(), b.URL())
	}
	for _, c := range []struct {
		method, path string
		status       int
		body         string
	}{
		{"GET", "/", 200, "backend-1\n"},
		{"HEAD", "/", 200, ""},
		{"GET", "/healthz", 200, "ok\n"},
		{"GET", "/nope", 404, ""},
		{"POST", "/", 405, ""},
	} {
		status, body, hdr := get(t, c.method, "http://"+b.Addr()+c.path)
		if status != c.status || (c.body != "" && body != c.body) {
			t.Errorf("%s %s = %d %q, want %d %q", c.method, c.path, status, body, c.status, c.body)
		}
		if hdr != "backend-1" {
			t.Errorf("%s %s: X-Backend %q", c.method, c.path, hdr)
		}
	}

	// An idle keep-alive connection does not hold up a graceful shutdown.
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(b.URL())
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()

	ctx, cancel := context.WithTimeout(t.Context(), wait)
	defer cancel()
	if err := b.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if !refused(b.Addr()) {
		t.Fatal("backend still accepts after Shutdown")
	}
	if err := b.Shutdown(ctx); err != nil {
		t.Errorf("second Shutdown: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Errorf("Close after Shutdown: %v", err)
	}
}

func TestBackendClose(t *testing.T) {
	b, err := StartBackend(t.Context(), "x", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// A connection in the middle of a request: Close cuts it.
	c, err := net.Dial("tcp", b.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("GET / HTTP/1.1\r\n")); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	_ = c.SetReadDeadline(time.Now().Add(wait))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("half-sent request still open after Close")
	}
	if !refused(b.Addr()) {
		t.Fatal("backend still accepts after Close")
	}
}

func TestStartBackendErrors(t *testing.T) {
	if _, err := StartBackend(t.Context(), "", ""); err == nil {
		t.Error("empty name accepted")
	}
	if _, err := StartBackend(t.Context(), "a\nb", ""); err == nil {
		t.Error("name with a newline accepted")
	}
	b, err := StartBackend(t.Context(), "a", "")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if _, err := StartBackend(t.Context(), "b", b.Addr()); err == nil {
		t.Error("second backend on a busy port started")
	}
}

// instances returns the addresses registered under /services/web/.
func instances(t *testing.T, c *clientv3.Client) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	resp, err := c.Get(ctx, etcd.DefaultPrefix+"web/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, kv := range resp.Kvs {
		out = append(out, strings.TrimPrefix(string(kv.Key), etcd.DefaultPrefix+"web/"))
	}
	slices.Sort(out)
	return out
}

func leases(t *testing.T, c *clientv3.Client) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	resp, err := c.Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return len(resp.Leases)
}

// TestFleetRegistersAndDeregisters: three backends with distinct names
// register in etcd; Shutdown removes their keys and leases before it
// stops the servers.
func TestFleetRegistersAndDeregisters(t *testing.T) {
	env := testenv.StartEtcd(t)
	client, err := etcd.NewClient(etcd.Config{Endpoints: env.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	direct := env.Client(t)

	f, err := StartFleet(t.Context(), FleetOptions{
		Register: EtcdRegistrar(client, "", "web", 5*time.Second, zaptest.NewLogger(t)),
		Logger:   zaptest.NewLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	want := f.Addrs()
	slices.Sort(want)
	if len(want) != DefaultFleetSize {
		t.Fatalf("%d backends, want %d", len(want), DefaultFleetSize)
	}
	testenv.Eventually(t, "the fleet registered", wait, func() bool { return slices.Equal(instances(t, direct), want) })

	names := map[string]bool{}
	for _, b := range f.Backends() {
		_, body, _ := get(t, "GET", b.URL())
		names[strings.TrimSpace(body)] = true
	}
	for i := 1; i <= DefaultFleetSize; i++ {
		if !names[fmt.Sprintf("backend-%d", i)] {
			t.Errorf("no backend answered backend-%d: %v", i, names)
		}
	}

	ctx, cancel := context.WithTimeout(t.Context(), wait)
	defer cancel()
	if err := f.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if got := instances(t, direct); len(got) != 0 {
		t.Errorf("keys left after Shutdown: %v", got)
	}
	if n := leases(t, direct); n != 0 {
		t.Errorf("%d leases left after Shutdown", n)
	}
	for _, a := range want {
		if !refused(a) {
			t.Errorf("backend %s still accepts after Shutdown", a)
		}
	}
	if err := f.Close(); err != nil {
		t.Errorf("Close after Shutdown: %v", err)
	}
}

func TestFleetOptions(t *testing.T) {
	f, err := StartFleet(t.Context(), FleetOptions{N: 2, NamePrefix: "web-"})
	if err != nil {
		t.Fatal(err)
	}
	bs := f.Backends()
	if len(bs) != 2 || bs[0].Name() != "web-1" || bs[1].Name() != "web-2" {
		t.Fatalf("backends %v", f.Addrs())
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}

	// A busy address fails the start and stops what was started.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	freeAddr := free.Addr().String()
	_ = free.Close()
	if _, err := StartFleet(t.Context(), FleetOptions{Addrs: []string{freeAddr, busy.Addr().String()}}); err == nil {
		t.Fatal("fleet on a busy address started")
	}
	if !refused(freeAddr) {
		t.Error("first backend left running after a failed start")
	}
}

// TestFleetRegistrationError: a registration that fails for good is
// reported by Shutdown; the backends keep serving meanwhile.
func TestFleetRegistrationError(t *testing.T) {
	boom := errors.New("registry says no")
	f, err := StartFleet(t.Context(), FleetOptions{N: 1, Register: func(context.Context, string) error { return boom }})
	if err != nil {
		t.Fatal(err)
	}
	if _, body, _ := get(t, "GET", f.Backends()[0].URL()); body != "backend-1\n" {
		t.Errorf("body %q", body)
	}
	if err := f.Close(); !errors.Is(err, boom) {
		t.Fatalf("Close = %v, want the registration error", err)
	}
}

// runningBackend is a ServeBackend that a test runs: cancel stops it, and
// wait returns what it returned.
type runningBackend struct {
	addr   string
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
	err    error
}

// startBackend runs ServeBackend with o (and a test logger) until the test
// ends or cancel, and returns once the backend is ready, failing the test
// if ServeBackend returns first.
func startBackend(t *testing.T, o BackendOptions) *runningBackend {
	t.Helper()
	ready := make(chan string, 1)
	o.Ready = func(addr string) { ready <- addr }
	o.Logger = zaptest.NewLogger(t)
	ctx, cancel := context.WithCancel(t.Context())
	b := &runningBackend{cancel: cancel, done: make(chan error, 1)}
	go func() { b.done <- ServeBackend(ctx, o) }()
	t.Cleanup(func() {
		b.cancel()
		b.wait()
	})
	select {
	case b.addr = <-ready:
	case err := <-b.done:
		b.once.Do(func() { b.err = err })
		t.Fatalf("ServeBackend returned %v before ready", err)
	}
	return b
}

func (b *runningBackend) wait() error {
	b.once.Do(func() { b.err = <-b.done })
	return b.err
}

// TestServeBackendEtcd: `rota demo-backend --etcd`: registered while it
// runs, deregistered (key deleted, lease revoked) on ctx cancel, then
// returns nil.
func TestServeBackendEtcd(t *testing.T) {
	env := testenv.StartEtcd(t)
	direct := env.Client(t)
	b := startBackend(t, BackendOptions{
		Name:    "backend-7",
		Etcd:    etcd.Config{Endpoints: env.Endpoints()},
		Service: "web",
		TTL:     5 * time.Second,
	})
	addr := b.addr
	testenv.Eventually(t, "the backend registered", wait, func() bool { return slices.Equal(instances(t, direct), []string{addr}) })
	if _, body, _ := get(t, "GET", "http://"+addr+"/"); body != "backend-7\n" {
		t.Errorf("body %q", body)
	}

	b.cancel()
	if err := b.wait(); err != nil {
		t.Fatalf("ServeBackend = %v, want nil", err)
	}
	if got := instances(t, direct); len(got) != 0 {
		t.Errorf("key left after stop: %v", got)
	}
	if n := leases(t, direct); n != 0 {
		t.Errorf("%d leases left after stop", n)
	}
	if !refused(addr) {
		t.Error("backend still accepts after ServeBackend returned")
	}
}

// TestServeBackendPlain: without etcd it just serves until ctx is done.
func TestServeBackendPlain(t *testing.T) {
	ready := make(chan string, 1)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- ServeBackend(ctx, BackendOptions{Name: "solo", Ready: func(a string) { ready <- a }})
	}()
	addr := <-ready
	if _, body, _ := get(t, "GET", "http://"+addr+"/"); body != "solo\n" {
		t.Errorf("body %q", body)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("ServeBackend = %v", err)
	}
	if !refused(addr) {
		t.Error("backend still accepts after ServeBackend returned")
	}
}

func TestServeBackendInvalid(t *testing.T) {
	for name, o := range map[string]BackendOptions{
		"no name":           {},
		"etcd, no service":  {Name: "a", Etcd: etcd.Config{Endpoints: []string{"127.0.0.1:1"}}},
		"bad service":       {Name: "a", Service: "a/b", Etcd: etcd.Config{Endpoints: []string{"127.0.0.1:1"}}},
		"bad advertise":     {Name: "a", Service: "web", Advertise: "nope", Etcd: etcd.Config{Endpoints: []string{"127.0.0.1:1"}}},
		"listen impossible": {Name: "a", Listen: "127.0.0.1:99999"},
	} {
		ctx, cancel := context.WithTimeout(t.Context(), wait)
		err := ServeBackend(ctx, o)
		cancel()
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestAdvertiseAddr(t *testing.T) {
	if got := advertiseAddr("127.0.0.1:9000"); got != "127.0.0.1:9000" {
		t.Errorf("specified host changed: %s", got)
	}
	for _, l := range []string{"0.0.0.0:9000", "[::]:9000"} {
		got := advertiseAddr(l)
		host, port, err := net.SplitHostPort(got)
		if err != nil || port != "9000" || net.ParseIP(host) == nil || net.ParseIP(host).IsUnspecified() {
			t.Errorf("advertiseAddr(%s) = %s", l, got)
		}
	}
}

// TestServeBackendDeregisterWait: on stop, the backend deregisters first
// and keeps answering for the deregister wait, so that a proxy that has
// not yet seen the deregistration still reaches it; then it stops. The
// wait is long enough that seeing the deletion and the GET after it fit
// in it on a loaded machine.
func TestServeBackendDeregisterWait(t *testing.T) {
	const deregisterWait = 5 * time.Second
	env := testenv.StartEtcd(t)
	direct := env.Client(t)
	b := startBackend(t, BackendOptions{
		Name:           "backend-w",
		Etcd:           etcd.Config{Endpoints: env.Endpoints()},
		Service:        "web",
		DeregisterWait: deregisterWait,
	})
	addr := b.addr
	testenv.Eventually(t, "the backend registered", wait, func() bool { return slices.Equal(instances(t, direct), []string{addr}) })

	b.cancel()
	stopped := time.Now()
	testenv.Eventually(t, "the deregistration", wait, func() bool { return len(instances(t, direct)) == 0 })
	// Deregistered, and still answering: without the wait the listener
	// would close right after the deletion.
	if _, body, _ := get(t, "GET", "http://"+addr+"/"); body != "backend-w\n" {
		t.Fatalf("%v after the stop, with the key deleted: body %q", time.Since(stopped), body)
	}
	if err := b.wait(); err != nil {
		t.Fatalf("ServeBackend = %v", err)
	}
	if !refused(addr) {
		t.Error("backend still accepts after ServeBackend returned")
	}
}

// A down file turns /healthz to 503 while it exists, and back.
func TestDownFile(t *testing.T) {
	b, err := StartBackend(t.Context(), "x", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	path := filepath.Join(t.TempDir(), "down")
	b.SetDownFile(path)
	status := func() int {
		resp, err := http.Get("http://" + b.Addr() + "/healthz")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if s := status(); s != 200 {
		t.Fatalf("no down file: %d", s)
	}
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if s := status(); s != 503 {
		t.Fatalf("down file present: %d", s)
	}
	os.Remove(path)
	if s := status(); s != 200 {
		t.Fatalf("down file removed: %d", s)
	}
	// Shutting down: /healthz fails while / still answers.
	b.SetDraining()
	if s := status(); s != 503 {
		t.Fatalf("draining: /healthz %d", s)
	}
	resp, err := http.Get("http://" + b.Addr() + "/")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("draining: / %v %v", resp, err)
	}
	resp.Body.Close()
}
