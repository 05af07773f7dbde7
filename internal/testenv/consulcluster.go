package testenv

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
)

// ConsulCluster is a real Consul cluster on loopback for one test: n
// servers and one client agent (what rota talks to, as on a real node), each
// its own process with its own ports. Servers can be killed and started
// again on their ports and data. The test's cleanup kills every agent.
type ConsulCluster struct {
	t       T
	bin     string
	servers []*consulAgent
	client  *consulAgent
	join    []string // serf LAN addresses of the servers
}

type consulAgent struct {
	name, dir                   string
	http, serf, serfWAN, server string // host:port

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	logs bytes.Buffer
}

// StartConsulCluster starts n servers (raft_multiplier 1, so a lost leader
// is replaced within seconds) and a client agent, and returns once the
// cluster has a leader and the client agent has joined.
func StartConsulCluster(t T, n int) *ConsulCluster {
	t.Helper()
	c := &ConsulCluster{t: t, bin: ConsulBinary(t)}
	ports, err := freePorts(4 * (n + 1))
	if err != nil {
		t.Fatalf("testenv: ports for a consul cluster: %v", err)
	}
	agent := func(i int, name string) *consulAgent {
		p := ports[4*i : 4*i+4]
		return &consulAgent{name: name, dir: t.TempDir(), http: p[0], serf: p[1], serfWAN: p[2], server: p[3]}
	}
	for i := range n {
		a := agent(i, fmt.Sprintf("server-%d", i))
		c.servers = append(c.servers, a)
		c.join = append(c.join, a.serf)
	}
	c.client = agent(n, "client")
	t.Cleanup(func() {
		c.kill(c.client)
		for i := range c.servers {
			c.Kill(i)
		}
	})
	for i := range n {
		c.spawn(c.servers[i], true, n)
	}
	c.spawn(c.client, false, n)
	c.waitLeader(30 * time.Second)
	c.waitJoined()
	return c
}

// Addr is the client agent's HTTP address.
func (c *ConsulCluster) Addr() string { return c.client.http }

// ServerAddr is server i's HTTP address.
func (c *ConsulCluster) ServerAddr(i int) string { return c.servers[i].http }

// KillClient kills the client agent (SIGKILL: it does not leave, so the
// servers see its node fail by gossip).
func (c *ConsulCluster) KillClient() { c.kill(c.client) }

// Client returns an API client of the client agent.
func (c *ConsulCluster) Client(t T) *api.Client {
	t.Helper()
	cfg := api.DefaultConfig()
	cfg.Address = c.client.http
	cfg.Token = ""
	cl, err := api.NewClient(cfg)
	if err != nil {
		t.Fatalf("testenv: consul client: %v", err)
	}
	return cl
}

func (c *ConsulCluster) spawn(a *consulAgent, server bool, expect int) {
	c.t.Helper()
	port := func(hp string) string { return hp[strings.LastIndex(hp, ":")+1:] }
	args := []string{"agent", "-node", a.name, "-data-dir", a.dir,
		"-bind", "127.0.0.1", "-client", "127.0.0.1", "-advertise", "127.0.0.1",
		"-http-port", port(a.http), "-dns-port", "-1", "-grpc-port", "-1", "-grpc-tls-port", "-1",
		"-serf-lan-port", port(a.serf), "-serf-wan-port", port(a.serfWAN), "-server-port", port(a.server),
		"-hcl", "performance { raft_multiplier = 1 }", "-log-level", "warn"}
	if server {
		args = append(args, "-server", "-bootstrap-expect", fmt.Sprint(expect))
	}
	for _, j := range c.join {
		if j != a.serf {
			args = append(args, "-retry-join", j, "-retry-interval", "1s")
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd != nil {
		return
	}
	a.logs.Reset()
	cmd := exec.Command(c.bin, args...)
	cmd.Stdout, cmd.Stderr = &a.logs, &a.logs
	if err := cmd.Start(); err != nil {
		c.t.Fatalf("testenv: start consul %s: %v", a.name, err)
	}
	a.cmd, a.done = cmd, make(chan struct{})
	go func(done chan struct{}) {
		cmd.Wait()
		close(done)
	}(a.done)
}

// Leader is the index of the server that leads now; -1 when none does.
func (c *ConsulCluster) Leader() int {
	hc := &http.Client{Timeout: time.Second}
	for _, a := range append([]*consulAgent{c.client}, c.servers...) {
		resp, err := hc.Get("http://" + a.http + "/v1/status/leader")
		if err != nil {
			continue
		}
		var leader string
		err = json.NewDecoder(resp.Body).Decode(&leader)
		resp.Body.Close()
		if err != nil || leader == "" {
			continue
		}
		for i, s := range c.servers {
			if strings.HasSuffix(leader, ":"+s.server[strings.LastIndex(s.server, ":")+1:]) {
				return i
			}
		}
	}
	return -1
}

// waitLeader waits until the cluster has a leader.
func (c *ConsulCluster) waitLeader(timeout time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for c.Leader() < 0 {
		if time.Now().After(deadline) {
			c.t.Fatalf("testenv: no consul leader after %v:\n%s", timeout, c.logs())
		}
		time.Sleep(100 * time.Millisecond) // polling separate processes
	}
}

// waitJoined waits until the client agent sees every server.
func (c *ConsulCluster) waitJoined() {
	c.t.Helper()
	cl := c.Client(c.t)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ms, err := cl.Agent().Members(false)
		alive := 0
		for _, m := range ms {
			if m.Status == 1 {
				alive++
			}
		}
		if err == nil && alive == len(c.servers)+1 {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("testenv: consul client agent joined %d of %d: %v\n%s", alive, len(c.servers)+1, err, c.logs())
		}
		time.Sleep(100 * time.Millisecond) // polling separate processes
	}
}

// Kill kills server i (SIGKILL; its data stays).
func (c *ConsulCluster) Kill(i int) { c.kill(c.servers[i]) }

func (c *ConsulCluster) kill(a *consulAgent) {
	a.mu.Lock()
	cmd, done := a.cmd, a.done
	a.cmd = nil
	a.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Kill()
	<-done
}

// Start starts killed server i again on its ports and data, and waits for
// the cluster to have a leader.
func (c *ConsulCluster) Start(i int) {
	c.t.Helper()
	c.spawn(c.servers[i], true, len(c.servers))
	c.waitLeader(30 * time.Second)
}

func (c *ConsulCluster) logs() string {
	var b strings.Builder
	for _, a := range append(c.servers, c.client) {
		a.mu.Lock()
		fmt.Fprintf(&b, "--- %s\n%s\n", a.name, a.logs.String())
		a.mu.Unlock()
	}
	return b.String()
}
