package testenv

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// EtcdBinary returns the path of the etcd binary cluster tests run, built
// on first use by scripts/etcd-bin.
func EtcdBinary(t T) string {
	t.Helper()
	root, err := repoRoot()
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	var stderr bytes.Buffer
	cmd := exec.Command(filepath.Join(root, "scripts", "etcd-bin"))
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("testenv: scripts/etcd-bin failed (run `make tools`): %v\n%s", err, stderr.String())
	}
	return strings.SplitN(strings.TrimSpace(string(out)), "\n", 2)[0]
}

// EtcdCluster is a multi-member etcd cluster of real etcd processes on
// loopback ports, for one test. A member can be killed (SIGKILL) and
// started again on its ports and data, or frozen (SIGSTOP: its connections
// stay up and nothing answers, like a member cut off by the network) and
// thawed. The test's cleanup kills every member.
type EtcdCluster struct {
	t       T
	bin     string
	members []*etcdMember
	initial string
}

type etcdMember struct {
	name, dir, clientURL, peerURL string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	logs bytes.Buffer
}

// StartEtcdCluster starts an n-member cluster (heartbeat 50 ms, election
// timeout 500 ms, so a lost leader is replaced within a second or so) and
// returns once every member answers.
func StartEtcdCluster(t T, n int) *EtcdCluster {
	t.Helper()
	c := &EtcdCluster{t: t, bin: EtcdBinary(t)}
	ports, err := freePorts(2 * n)
	if err != nil {
		t.Fatalf("testenv: ports for an etcd cluster: %v", err)
	}
	var initial []string
	for i := range n {
		m := &etcdMember{
			name: fmt.Sprintf("m%d", i), dir: t.TempDir(),
			clientURL: "http://" + ports[2*i], peerURL: "http://" + ports[2*i+1],
		}
		c.members = append(c.members, m)
		initial = append(initial, m.name+"="+m.peerURL)
	}
	c.initial = strings.Join(initial, ",")
	t.Cleanup(func() {
		for i := range c.members {
			c.Kill(i)
		}
	})
	for i := range n {
		c.spawn(i)
	}
	for i := range n {
		c.waitAnswers(i)
	}
	return c
}

// Endpoints are every member's client URL.
func (c *EtcdCluster) Endpoints() []string {
	var out []string
	for _, m := range c.members {
		out = append(out, m.clientURL)
	}
	return out
}

// Endpoint is member i's client URL.
func (c *EtcdCluster) Endpoint(i int) string { return c.members[i].clientURL }

// Client returns a client of the given endpoints (every member when none),
// closed by t's cleanup.
func (c *EtcdCluster) Client(t T, endpoints ...string) *clientv3.Client {
	t.Helper()
	if len(endpoints) == 0 {
		endpoints = c.Endpoints()
	}
	cl, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatalf("testenv: etcd cluster client: %v", err)
	}
	t.Cleanup(func() { _ = cl.Close() })
	return cl
}

func (c *EtcdCluster) spawn(i int) {
	c.t.Helper()
	m := c.members[i]
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd != nil {
		return
	}
	m.logs.Reset()
	cmd := exec.Command(c.bin,
		"--name", m.name, "--data-dir", m.dir,
		"--listen-client-urls", m.clientURL, "--advertise-client-urls", m.clientURL,
		"--listen-peer-urls", m.peerURL, "--initial-advertise-peer-urls", m.peerURL,
		"--initial-cluster", c.initial, "--initial-cluster-state", "new",
		"--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "warn")
	cmd.Stdout, cmd.Stderr = &m.logs, &m.logs
	if err := cmd.Start(); err != nil {
		c.t.Fatalf("testenv: start etcd member %d: %v", i, err)
	}
	m.cmd, m.done = cmd, make(chan struct{})
	go func(done chan struct{}) {
		cmd.Wait()
		close(done)
	}(m.done)
}

// waitAnswers waits until member i answers a status request.
func (c *EtcdCluster) waitAnswers(i int) {
	c.t.Helper()
	m := c.members[i]
	cl := c.Client(c.t, m.clientURL)
	defer cl.Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		st, err := cl.Status(ctx, m.clientURL)
		cancel()
		if err == nil && st.Leader != 0 {
			return
		}
		if time.Now().After(deadline) {
			m.mu.Lock()
			logs := m.logs.String()
			m.mu.Unlock()
			c.t.Fatalf("testenv: etcd member %d not ready: %v\n%s", i, err, logs)
		}
		time.Sleep(20 * time.Millisecond) // polling a separate process
	}
}

// Kill kills member i (SIGKILL; its data stays); a no-op when it is down.
func (c *EtcdCluster) Kill(i int) {
	m := c.members[i]
	m.mu.Lock()
	cmd, done := m.cmd, m.done
	m.cmd = nil
	m.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGCONT) // a frozen process must run to die
	cmd.Process.Kill()
	<-done
}

// Start starts killed member i again, on its ports and data, and waits
// until it answers.
func (c *EtcdCluster) Start(i int) {
	c.t.Helper()
	c.spawn(i)
	c.waitAnswers(i)
}

// Freeze stops member i (SIGSTOP): its sockets stay open and nothing
// answers, for clients and peers alike. Thaw resumes it.
func (c *EtcdCluster) Freeze(i int) { c.signal(i, syscall.SIGSTOP) }

// Thaw resumes a frozen member.
func (c *EtcdCluster) Thaw(i int) { c.signal(i, syscall.SIGCONT) }

func (c *EtcdCluster) signal(i int, sig os.Signal) {
	m := c.members[i]
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd != nil {
		m.cmd.Process.Signal(sig)
	}
}

// Leader is the index of the member that leads now, asking the members
// that answer; -1 when none does.
func (c *EtcdCluster) Leader(t T) int {
	t.Helper()
	for i, m := range c.members {
		cl := c.Client(t, m.clientURL)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		st, err := cl.Status(ctx, m.clientURL)
		cancel()
		_ = cl.Close()
		if err == nil && st.Leader != 0 && st.Leader == st.Header.MemberId {
			return i
		}
	}
	return -1
}
