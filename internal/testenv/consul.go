package testenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// Consul is a real `consul agent -dev` for one test, on 127.0.0.1 ports
// picked at start. Kill and Start bring it down and up again on the same
// HTTP address with a fresh state, the way an agent restarted without its
// data comes back. The test's cleanup stops it.
type Consul struct {
	t        testing.TB
	bin      string
	httpAddr string

	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{}
	logs    *bytes.Buffer
	dnsAddr string
}

// ConsulBinary returns the path of the consul binary the tests run, built
// on first use by scripts/consul-bin. ROTA_SKIP_CONSUL=1 skips the test
// instead of building.
func ConsulBinary(t T) string {
	t.Helper()
	if os.Getenv("ROTA_SKIP_CONSUL") == "1" {
		if s, ok := t.(interface{ Skip(...any) }); ok {
			s.Skip("ROTA_SKIP_CONSUL=1")
		}
		t.Fatalf("ROTA_SKIP_CONSUL=1")
	}
	return scriptPath(t, "consul-bin")
}

// scriptPath runs scripts/name, which installs or builds a program on first
// use, and returns the path it prints.
func scriptPath(t T, name string) string {
	t.Helper()
	root, err := repoRoot()
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	var stderr bytes.Buffer
	cmd := exec.Command(filepath.Join(root, "scripts", name))
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("testenv: scripts/%s failed (run `make tools`): %v\n%s", name, err, stderr.String())
	}
	return strings.TrimSpace(string(out))
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "scripts", "consul-bin")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("repository root (with scripts/consul-bin) not found above the working directory")
		}
		dir = parent
	}
}

// StartConsul starts a dev agent and waits until it has a leader.
func StartConsul(t testing.TB) *Consul {
	t.Helper()
	c := &Consul{t: t, bin: ConsulBinary(t)}
	var lastErr error
	for range 10 {
		ports, err := freePorts(1)
		if err != nil {
			t.Fatalf("testenv: pick a port for consul: %v", err)
		}
		c.httpAddr = ports[0]
		if lastErr = c.start(); lastErr == nil {
			t.Cleanup(c.Kill)
			return c
		}
		if !strings.Contains(lastErr.Error(), "address already in use") {
			break
		}
	}
	t.Fatalf("testenv: start consul: %v", lastErr)
	return nil
}

// Addr is the agent's HTTP address, host:port.
func (c *Consul) Addr() string { return c.httpAddr }

// DNSAddr is the agent's DNS interface (UDP and TCP), host:port; it
// changes when the agent is started again.
func (c *Consul) DNSAddr() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dnsAddr
}

// Client returns an API client for the agent.
func (c *Consul) Client(t testing.TB) *api.Client {
	t.Helper()
	cfg := api.DefaultConfig()
	cfg.Address = c.httpAddr
	cfg.Token = ""
	cl, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return cl
}

// Kill stops the agent with SIGKILL and waits for it to exit.
func (c *Consul) Kill() {
	c.mu.Lock()
	cmd, done := c.cmd, c.done
	c.cmd = nil
	c.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Kill()
	<-done
}

// Start starts a fresh agent on the same HTTP address after Kill.
func (c *Consul) Start() {
	c.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := c.start()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("testenv: restart consul: %v", err)
		}
		time.Sleep(100 * time.Millisecond) // the port may linger briefly
	}
}

func (c *Consul) start() error {
	// The HTTP port, picked once for the agent's life, is not listening
	// now: the kernel may hand it out again among the other four, and the
	// agent refuses to start with two of its ports the same ("HTTP address
	// ... already configured for DNS", a CI run).
	var ports []string
	for {
		var err error
		if ports, err = freePorts(4); err != nil {
			return err
		}
		if !slices.Contains(ports, c.httpAddr) {
			break
		}
	}
	port := func(hp string) string { return hp[strings.LastIndex(hp, ":")+1:] }
	dataDir, err := os.MkdirTemp("", "rota-consul-")
	if err != nil {
		return err
	}
	logs := &bytes.Buffer{}
	cmd := exec.Command(c.bin, "agent", "-dev",
		"-bind", "127.0.0.1", "-client", "127.0.0.1", "-advertise", "127.0.0.1",
		"-data-dir", dataDir,
		"-http-port", port(c.httpAddr),
		"-dns-port", port(ports[3]), "-grpc-port", "-1", "-grpc-tls-port", "-1",
		"-serf-lan-port", port(ports[0]), "-serf-wan-port", port(ports[1]),
		"-server-port", port(ports[2]),
		"-log-level", "warn",
	)
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dataDir)
		return err
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		os.RemoveAll(dataDir)
		close(done)
	}()
	c.mu.Lock()
	c.cmd, c.done, c.logs, c.dnsAddr = cmd, done, logs, ports[3]
	c.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for {
		select {
		case <-done:
			c.mu.Lock()
			c.cmd = nil
			c.mu.Unlock()
			return fmt.Errorf("consul exited: %s", logs.String())
		case <-ctx.Done():
			c.Kill()
			return fmt.Errorf("consul not ready in 60s: %s", logs.String())
		case <-time.After(50 * time.Millisecond):
		}
		resp, err := http.Get("http://" + c.httpAddr + "/v1/status/leader")
		if err != nil {
			continue
		}
		var b bytes.Buffer
		b.ReadFrom(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK && strings.Trim(strings.TrimSpace(b.String()), `"`) != "" {
			return nil
		}
	}
}
