package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/discovery/consul"
)

// consulRegistry is a real `consul agent -dev` (scripts/consul-bin). Each
// backend is a service instance with a TTL check: Register turns the check
// passing (registering the instance the first time), Deregister turns it
// critical, so what is measured is a health change reaching routing.
type consulRegistry struct {
	dir     string
	cmd     *exec.Cmd
	client  *consul.Client
	watcher *consul.Watcher
	known   map[string]bool
}

func startConsul(ctx context.Context, log *zap.Logger) (*consulRegistry, error) {
	out, err := exec.CommandContext(ctx, "scripts/consul-bin").Output()
	if err != nil {
		return nil, fmt.Errorf("scripts/consul-bin (run from the repository root): %w", err)
	}
	dir, err := os.MkdirTemp("", "rota-bench-consul-")
	if err != nil {
		return nil, err
	}
	r := &consulRegistry{dir: dir, known: map[string]bool{}}
	port := func() string {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		defer ln.Close()
		return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	}
	httpPort := port()
	r.cmd = exec.Command(strings.TrimSpace(string(out)), "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
		"-http-port", httpPort, "-dns-port", "-1", "-grpc-port", "-1", "-grpc-tls-port", "-1",
		"-serf-lan-port", port(), "-serf-wan-port", port(), "-server-port", port(),
		"-data-dir", dir, "-log-level", "error")
	if err := r.cmd.Start(); err != nil {
		r.Close()
		return nil, err
	}
	if err := r.connect("127.0.0.1:"+httpPort, log); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

// connect makes r's client and watcher for the agent at addr, once it has
// a leader.
func (r *consulRegistry) connect(addr string, log *zap.Logger) error {
	var err error
	if r.client, err = consul.NewClient(consul.ClientConfig{Address: addr}); err != nil {
		return err
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		if leader, err := r.client.API.Status().Leader(); err == nil && leader != "" {
			break
		}
		if time.Now().After(deadline) {
			return errors.New("consul: no leader after 60s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	r.watcher, err = consul.NewWatcher(r.client.API, service, nil, log)
	return err
}

func (r *consulRegistry) Describe() string {
	return "Consul 1.20.1 dev agent (scripts/consul-bin), discovery/consul blocking queries; a change is a TTL check turning passing or critical"
}

func (r *consulRegistry) Watcher() discovery.Watcher { return r.watcher }

func (r *consulRegistry) Register(ctx context.Context, addr string) error {
	if !r.known[addr] {
		host, p, _ := net.SplitHostPort(addr)
		port, _ := strconv.Atoi(p)
		err := r.client.API.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: addr, Name: service, Address: host, Port: port,
			Check: &api.AgentServiceCheck{CheckID: "ttl-" + addr, TTL: "1h", Status: api.HealthPassing},
		})
		if err != nil {
			return fmt.Errorf("consul: register %s: %w", addr, err)
		}
		r.known[addr] = true
		return nil
	}
	return r.client.API.Agent().UpdateTTL("ttl-"+addr, "bench", api.HealthPassing)
}

func (r *consulRegistry) Deregister(ctx context.Context, addr string) error {
	return r.client.API.Agent().UpdateTTL("ttl-"+addr, "bench", api.HealthCritical)
}

func (r *consulRegistry) Close() {
	if r.client != nil {
		r.client.Close()
	}
	if r.cmd != nil && r.cmd.Process != nil {
		r.cmd.Process.Kill()
		r.cmd.Wait()
	}
	os.RemoveAll(r.dir)
}
