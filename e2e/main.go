// Command e2e runs the docker-compose topology natively (no Docker here):
// a real Consul agent, a real etcd server, self-registering backend
// processes and two rota instances, all on 127.0.0.1, and checks what users
// of that topology rely on: scale out, graceful scale in, a backend killed
// under load, and a rota restart, each with zero failed client connections.
//
//	make e2e        (builds bin/rota, then go run ./e2e)
package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rota-proxy/rota/embedetcd"
	"github.com/rota-proxy/rota/internal/testenv"
)

type check struct {
	name, result string
	ok           bool
}

type env struct {
	dir     string
	rota    string
	etcd    string // host:port
	consul  string // host:port
	capi    *api.Client
	procs   []*exec.Cmd
	mu      sync.Mutex
	checks  []check
	backend map[string]*exec.Cmd
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
}

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "[%s] %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, a...))
}

// setup fails the program for testenv's helpers: what they cannot set up
// (a free port) leaves nothing to check.
type setup struct{}

func (setup) Helper() {}
func (setup) Fatalf(format string, args ...any) {
	panic(fmt.Sprintf(format, args...))
}

func freePort() string { return testenv.FreeAddr(setup{}) }

func run() error {
	e := &env{rota: "bin/rota", backend: map[string]*exec.Cmd{}}
	var err error
	if e.dir, err = os.MkdirTemp("", "rota-e2e-"); err != nil {
		return err
	}
	defer os.RemoveAll(e.dir)
	defer e.stopAll()

	// etcd: a real server, in this process.
	srv, err := embedetcd.Start(context.Background(), embedetcd.Config{DataDir: filepath.Join(e.dir, "etcd"), ClientURL: "http://" + freePort()})
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer srv.Close()
	e.etcd = strings.TrimPrefix(srv.Endpoints()[0], "http://")
	logf("etcd at %s", e.etcd)

	// Consul: a real dev agent.
	if err := e.startConsul(); err != nil {
		return err
	}
	logf("consul at %s", e.consul)

	// Backends: three in etcd, two in Consul.
	for i := 1; i <= 3; i++ {
		if err := e.startBackend(fmt.Sprintf("etcd-%d", i), true); err != nil {
			return err
		}
	}
	for i := 1; i <= 2; i++ {
		if err := e.startBackend(fmt.Sprintf("consul-%d", i), false); err != nil {
			return err
		}
	}

	// Two rota instances reading both registries.
	a, err := e.startRota("a")
	if err != nil {
		return err
	}
	b, err := e.startRota("b")
	if err != nil {
		return err
	}
	for _, r := range []*rota{a, b} {
		for _, l := range []struct {
			addr string
			want []string
		}{{r.web, []string{"etcd-1", "etcd-2", "etcd-3"}}, {r.webConsul, []string{"consul-1", "consul-2"}}} {
			if d, err := waitAll(l.addr, l.want, 15*time.Second); err != nil {
				return fmt.Errorf("rota %s: %w", r.name, err)
			} else {
				e.record(fmt.Sprintf("rota %s routes %d backends on %s", r.name, len(l.want), l.addr), fmt.Sprintf("all seen after %v", d.Round(time.Millisecond)), true)
			}
		}
	}

	targets := []string{a.web, b.web, a.webConsul, b.webConsul}
	ld := startLoad(targets, 8)

	// Scale out: new backends in both registries reach clients within a second.
	start := time.Now()
	if err := e.startBackend("etcd-4", true); err != nil {
		return err
	}
	for _, r := range []*rota{a, b} {
		_, err := waitAny(r.web, "etcd-4", 5*time.Second)
		took := time.Since(start)
		e.record("scale out (etcd): rota "+r.name+" routes etcd-4", fmt.Sprintf("%v after start", took.Round(time.Millisecond)), err == nil && took < time.Second)
	}
	start = time.Now()
	if err := e.startBackend("consul-3", false); err != nil {
		return err
	}
	for _, r := range []*rota{a, b} {
		_, err := waitAny(r.webConsul, "consul-3", 5*time.Second)
		took := time.Since(start)
		e.record("scale out (Consul): rota "+r.name+" routes consul-3", fmt.Sprintf("%v after start", took.Round(time.Millisecond)), err == nil && took < 2*time.Second)
	}

	// Scale in: graceful stops (deregister, then exit) cost no client.
	before := ld.Failed.Load()
	e.stopBackend("etcd-1", syscall.SIGTERM)
	e.stopBackend("consul-1", syscall.SIGTERM)
	time.Sleep(2 * time.Second) // keep the load running across the change
	e.record("scale in (SIGTERM etcd-1, consul-1) under load", fmt.Sprintf("%d failed client connections", ld.Failed.Load()-before), ld.Failed.Load() == before)

	// A backend killed with SIGKILL under load: retries cover it.
	before = ld.Failed.Load()
	e.stopBackend("etcd-2", syscall.SIGKILL)
	time.Sleep(2 * time.Second)
	e.record("SIGKILL etcd-2 under load", fmt.Sprintf("%d failed client connections", ld.Failed.Load()-before), ld.Failed.Load() == before)

	// Restart one rota: the other keeps serving without a failure.
	ld.Stop()
	ldB := startLoad([]string{b.web, b.webConsul}, 6)
	if err := a.stop(); err != nil {
		e.record("rota a drains on SIGTERM", err.Error(), false)
	}
	a2, err := e.startRota("a")
	if err != nil {
		return err
	}
	_, err = waitAll(a2.web, []string{"etcd-3", "etcd-4"}, 15*time.Second)
	ldB.Stop()
	e.record("restart rota a: rota b keeps serving", fmt.Sprintf("%d of %d client connections failed", ldB.Failed.Load(), ldB.OK.Load()+ldB.Failed.Load()), ldB.Failed.Load() == 0 && ldB.OK.Load() > 0)
	e.record("restarted rota a routes again", fmt.Sprint(errOr(err, "ok")), err == nil)
	e.record("load during scale out/in/kill", fmt.Sprintf("%d requests, %d failed", ld.OK.Load()+ld.Failed.Load(), ld.Failed.Load()), ld.Failed.Load() == 0)

	return e.summary()
}

func errOr(err error, s string) string {
	if err != nil {
		return err.Error()
	}
	return s
}

func (e *env) record(name, result string, ok bool) {
	e.mu.Lock()
	e.checks = append(e.checks, check{name, result, ok})
	e.mu.Unlock()
	mark := "ok  "
	if !ok {
		mark = "FAIL"
	}
	logf("%s %s: %s", mark, name, result)
}

func (e *env) summary() error {
	fmt.Println("\n| check | result | |\n|---|---|---|")
	failed := 0
	for _, c := range e.checks {
		mark := "ok"
		if !c.ok {
			mark, failed = "FAIL", failed+1
		}
		fmt.Printf("| %s | %s | %s |\n", c.name, c.result, mark)
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d checks failed", failed, len(e.checks))
	}
	fmt.Printf("\nall %d checks passed\n", len(e.checks))
	return nil
}

func (e *env) spawn(name string, args ...string) (*exec.Cmd, error) {
	cmd := exec.Command(name, args...)
	f, err := os.Create(filepath.Join(e.dir, fmt.Sprintf("%s-%d.log", filepath.Base(name), len(e.procs))))
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	e.procs = append(e.procs, cmd)
	return cmd, nil
}

func (e *env) stopAll() {
	for _, p := range e.procs {
		if p.ProcessState == nil {
			p.Process.Kill()
			p.Wait()
		}
	}
}

func (e *env) startConsul() error {
	out, err := exec.Command("scripts/consul-bin").Output()
	if err != nil {
		return fmt.Errorf("scripts/consul-bin: %w", err)
	}
	e.consul = freePort()
	port := func(a string) string { return a[strings.LastIndex(a, ":")+1:] }
	if _, err := e.spawn(strings.TrimSpace(string(out)), "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
		"-http-port", port(e.consul), "-dns-port", "-1", "-grpc-port", "-1", "-grpc-tls-port", "-1",
		"-serf-lan-port", port(freePort()), "-serf-wan-port", port(freePort()), "-server-port", port(freePort()),
		"-data-dir", filepath.Join(e.dir, "consul"), "-log-level", "warn"); err != nil {
		return err
	}
	cfg := api.DefaultConfig()
	cfg.Address = e.consul
	if e.capi, err = api.NewClient(cfg); err != nil {
		return err
	}
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if leader, err := e.capi.Status().Leader(); err == nil && leader != "" {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.New("consul: no leader after 60s")
}

// startBackend runs `rota demo-backend`; etcd backends register themselves,
// Consul ones are registered through the agent API with an HTTP check, as
// deployments/compose/consul-register.sh does.
func (e *env) startBackend(name string, inEtcd bool) error {
	addr := freePort()
	args := []string{"demo-backend", "--name", name, "--listen", addr, "--log-format", "json"}
	if inEtcd {
		args = append(args, "--etcd", e.etcd, "--service", "web", "--ttl", "5s")
	}
	cmd, err := e.spawn(e.rota, args...)
	if err != nil {
		return err
	}
	e.backend[name] = cmd
	if !inEtcd {
		host, p, _ := net.SplitHostPort(addr)
		var port int
		fmt.Sscan(p, &port)
		err := e.capi.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: name, Name: "web-consul", Address: host, Port: port,
			Check: &api.AgentServiceCheck{HTTP: "http://" + addr + "/healthz", Interval: "500ms", Timeout: "1s"},
		})
		if err != nil {
			return fmt.Errorf("consul register %s: %w", name, err)
		}
	}
	return nil
}

func (e *env) stopBackend(name string, sig syscall.Signal) {
	cmd := e.backend[name]
	if strings.HasPrefix(name, "consul-") && sig == syscall.SIGTERM {
		e.capi.Agent().ServiceDeregister(name) // what the registration script's trap does
	}
	cmd.Process.Signal(sig)
	cmd.Wait()
}

type rota struct {
	name, web, webConsul, admin string
	cmd                         *exec.Cmd
}

func (e *env) startRota(name string) (*rota, error) {
	r := &rota{name: name, web: freePort(), webConsul: freePort(), admin: freePort()}
	cfg := fmt.Sprintf(`admin:
  listen: %s
registries:
  etcd:
    endpoints: [%s]
  consul:
    address: %s
listeners:
  - name: web
    listen: %s
    service: web
    discovery: etcd
    health: {check: http, path: /healthz, interval: 500ms, rise: 1, fall: 2}
    drain_timeout: 5s
    replay_on_reset: true   # GETs are idempotent: a killed backend's requests go to the next
  - name: web-consul
    listen: %s
    service: web-consul
    discovery: consul
    health: {check: http, path: /healthz, interval: 500ms, rise: 1, fall: 2}
    drain_timeout: 5s
    replay_on_reset: true   # GETs are idempotent: a killed backend's requests go to the next
`, r.admin, e.etcd, e.consul, r.web, r.webConsul)
	file := filepath.Join(e.dir, "rota-"+name+".yaml")
	if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	if out, err := exec.Command(e.rota, "check", "--config", file).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("rota check: %s", out)
	}
	cmd, err := e.spawn(e.rota, "serve", "--config", file, "--log-format", "json")
	if err != nil {
		return nil, err
	}
	r.cmd = cmd
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get("http://" + r.admin + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return r, nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil, fmt.Errorf("rota %s not ready", name)
}

func (r *rota) stop() error {
	r.cmd.Process.Signal(syscall.SIGTERM)
	err := r.cmd.Wait()
	if err != nil {
		return fmt.Errorf("rota %s exit: %w", r.name, err)
	}
	return nil
}

var hc = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

func get(addr string) (string, error) {
	resp, err := hc.Get("http://" + addr + "/")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(bufio.NewReader(resp.Body))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != 200 {
		return "", fmt.Errorf("status %d", resp.StatusCode)
	}
	return strings.TrimSpace(string(b)), nil
}

// waitAll waits until requests through addr reach every name in want.
func waitAll(addr string, want []string, timeout time.Duration) (time.Duration, error) {
	seen := map[string]bool{}
	took, ok := testenv.Poll(timeout, func() bool {
		if name, err := get(addr); err == nil {
			seen[name] = true
		}
		for _, w := range want {
			if !seen[w] {
				return false
			}
		}
		return true
	})
	if !ok {
		return 0, fmt.Errorf("%s: saw %v, want %v", addr, seen, want)
	}
	return took, nil
}

func waitAny(addr, name string, timeout time.Duration) (time.Duration, error) {
	return waitAll(addr, []string{name}, timeout)
}

// startLoad makes back-to-back requests (a new connection each) through
// addrs, worker i through addrs[i % len(addrs)], logging each failure.
func startLoad(addrs []string, workers int) *testenv.Load {
	return testenv.StartLoad(workers, 100000, func(w int) (string, error) {
		addr := addrs[w%len(addrs)]
		ans, err := get(addr)
		if err != nil {
			logf("client error via %s: %v", addr, err)
		}
		return ans, err
	})
}
