package docker_test

import (
	"crypto/rand"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/rota-proxy/rota/discovery/docker"
	"github.com/rota-proxy/rota/internal/testenv"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// app starts a plain demo backend container of service on network, with
// extra docker run arguments (after "--": the backend's), and returns its
// ID.
func app(d *testenv.Docker, network, service string, extra ...string) string {
	return appOf(d, d.Image(), network, service, extra...)
}

func appOf(d *testenv.Docker, image, network, service string, extra ...string) string {
	var own []string
	for i, a := range extra {
		if a == "--" {
			extra, own = extra[:i], extra[i+1:]
			break
		}
	}
	args := append([]string{"--network", network, "--label", docker.LabelService + "=" + service}, extra...)
	args = append(args, image, "demo-backend", "--listen", ":9000", "--down-file", "/down", "--log-format", "json")
	return d.Container(append(args, own...)...)
}

// Labels choose the port and weight, the listener's port stands in for a
// missing rota.port, a bad label is a warning for that container alone,
// and other services' containers are not listed.
func TestLabelsPortsAndWarnings(t *testing.T) {
	d := testenv.StartDocker(t)
	n := d.Network()
	svc := "app-" + rand.Text()[:8]
	a := app(d, n, svc, "--label", "rota.port=9000", "--label", "rota.weight=3")
	b := app(d, n, svc)
	app(d, n, svc, "--name", "bad-"+svc, "--label", "rota.port=http")
	app(d, n, "other-"+svc, "--label", "rota.port=9000")

	w, err := docker.NewWatcher(docker.Config{}, docker.Match{Service: svc, Port: 9000}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	r := testenv.Watch(t, w)
	want := []string{d.IP(a, n) + ":9000", d.IP(b, n) + ":9000"}
	if want[1] < want[0] {
		want[0], want[1] = want[1], want[0]
	}
	s := r.WaitAddrs(t, "a and b", want...)
	for _, in := range s.Instances {
		wantW := 0
		if in.Addr == d.IP(a, n)+":9000" {
			wantW = 3
		}
		if in.Weight != wantW {
			t.Errorf("%s: weight %d, want %d", in.Addr, in.Weight, wantW)
		}
	}
	if len(s.Warnings) != 1 || s.Warnings[0].Key != "bad-"+svc || !strings.Contains(s.Warnings[0].Reason, `rota.port="http"`) {
		t.Fatalf("warnings %+v, want one for bad-%s's port label", s.Warnings, svc)
	}
}

// A container with a healthcheck is an instance once healthy and leaves
// as soon as it turns unhealthy; docker stop takes a container out on the
// signal, while it still runs; a restarted container comes back with its
// address.
func TestHealthStopAndRestart(t *testing.T) {
	d := testenv.StartDocker(t)
	n := d.Network()
	svc := "app-" + rand.Text()[:8]
	a := appOf(d, d.HealthImage(), n, svc, "--label", "rota.port=9000")
	w, err := docker.NewWatcher(docker.Config{}, docker.Match{Service: svc, Port: 9000}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	r := testenv.Watch(t, w)
	addrA := d.IP(a, n) + ":9000"
	r.WaitAddrs(t, "a once healthy", addrA)

	// Unhealthy: the down file makes /healthz answer 503.
	down := filepath.Join(t.TempDir(), "down")
	if err := os.WriteFile(down, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	d.Run("cp", down, a+":/down")
	r.WaitAddrs(t, "a out once unhealthy")
	if d.Run("inspect", "-f", "{{.State.Running}}", a) != "true" {
		t.Fatal("a stopped: the test wanted it running and unhealthy")
	}

	// docker stop: b serves 5 s after SIGTERM; it leaves before it exits.
	b := app(d, n, svc, "--", "--deregister-wait", "5s")
	addrB := d.IP(b, n) + ":9000"
	r.WaitAddrs(t, "b", addrB)
	// Running is not yet serving: a SIGTERM before demo-backend has set
	// up its signal handling (it does so before it listens) ends it at
	// once, and then it exits before rota can have seen the signal.
	testenv.Eventually(t, "b serving", 10*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", addrB, time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { d.Try("stop", "-t", "10", b) })
	r.WaitAddrs(t, "b out on the stop signal")
	out := time.Now()
	wg.Wait()
	// Compared with its exit once it exited: the docker CLI can take
	// seconds under load, so asking whether it still runs would race.
	exited, err := time.Parse(time.RFC3339Nano, d.Run("inspect", "-f", "{{.State.FinishedAt}}", b))
	if err != nil {
		t.Fatal(err)
	}
	if !out.Before(exited) {
		t.Fatalf("b left at %v, after it exited at %v: it should leave on the signal", out, exited)
	}

	// docker restart: out, then back with its (new) address.
	c := app(d, n, svc)
	r.WaitAddrs(t, "c", d.IP(c, n)+":9000")
	_, before, _ := r.Last()
	d.Run("restart", "-t", "1", c)
	r.WaitAddrs(t, "c back after its restart", d.IP(c, n)+":9000")
	if _, after, _ := r.Last(); after < before+2 {
		t.Fatalf("%d updates across the restart, want at least 2 (out, back)", after-before)
	}
}

// The engine's socket going away (here a forwarding socket rota is pointed
// at, closed and reopened) keeps the last set, says why, and recovers with
// a fresh list, marked Resync.
func TestEngineGoneKeepsTheLastSet(t *testing.T) {
	d := testenv.StartDocker(t)
	n := d.Network()
	svc := "app-" + rand.Text()[:8]
	a := app(d, n, svc, "--label", "rota.port=9000")
	sock := filepath.Join(t.TempDir(), "docker.sock")
	fwd := forward(t, sock, "/var/run/docker.sock")
	w, err := docker.NewWatcher(docker.Config{Host: "unix://" + sock}, docker.Match{Service: svc}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	r := testenv.Watch(t, w)
	addrA := d.IP(a, n) + ":9000"
	r.WaitAddrs(t, "a", addrA)
	_, n0, e0 := r.Last()
	fwd.stop()
	testenv.Eventually(t, "the outage reported", 10*time.Second, func() bool { _, _, e := r.Last(); return e > e0 })
	b := app(d, n, svc, "--label", "rota.port=9000") // a change while rota cannot see
	if s, n1, _ := r.Last(); n1 != n0 || len(s.Instances) != 1 {
		t.Fatalf("during the outage: %d updates, set %v; want the last set kept", n1-n0, s.Addrs())
	}
	fwd.start()
	want := []string{addrA, d.IP(b, n) + ":9000"}
	if want[1] < want[0] {
		want[0], want[1] = want[1], want[0]
	}
	s := r.WaitAddrs(t, "a and b after the engine came back", want...)
	if !s.Resync {
		t.Fatal("the first list after the outage was not marked Resync")
	}
}

// forwarder is a unix socket that forwards each connection to another,
// which a test closes (every connection with it) and opens again.
type forwarder struct {
	t        *testing.T
	path, to string
	mu       sync.Mutex
	ln       net.Listener
	conns    map[net.Conn]bool
	wg       sync.WaitGroup
}

func forward(t *testing.T, path, to string) *forwarder {
	f := &forwarder{t: t, path: path, to: to, conns: map[net.Conn]bool{}}
	f.start()
	t.Cleanup(f.stop)
	return f
}

func (f *forwarder) start() {
	ln, err := net.Listen("unix", f.path)
	if err != nil {
		f.t.Fatal(err)
	}
	f.mu.Lock()
	f.ln = ln
	f.mu.Unlock()
	f.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("unix", f.to)
			if err != nil {
				c.Close()
				continue
			}
			f.mu.Lock()
			f.conns[c], f.conns[up] = true, true
			f.mu.Unlock()
			f.wg.Go(func() { io.Copy(up, c); up.Close() })
			f.wg.Go(func() { io.Copy(c, up); c.Close() })
		}
	})
}

// stop closes the socket and every connection through it, as an engine
// that goes away does.
func (f *forwarder) stop() {
	f.mu.Lock()
	if f.ln != nil {
		f.ln.Close()
		f.ln = nil
	}
	for c := range f.conns {
		c.Close()
	}
	clear(f.conns)
	f.mu.Unlock()
	f.wg.Wait()
}
