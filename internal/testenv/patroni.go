package testenv

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// PGBin is where Debian's PostgreSQL 15 keeps its programs.
const PGBin = "/usr/lib/postgresql/15/bin"

// Patroni is a two-node PostgreSQL 15 cluster run by Debian's patroni on
// loopback, its state in an etcd the test gives. Each node has its own
// loopback address (127.0.26.1, 127.0.26.2) and both use the same ports,
// as two hosts would: a check's `port:` then names one REST port for all.
// PostgreSQL refuses to run as root, so as root the nodes run as the
// `postgres` user the package creates. Cleanup stops every node.
type Patroni struct {
	PGPort, RESTPort string
	dir              string
	bin              string
	cred             *syscall.Credential
	nodes            []*patroniNode
}

type patroniNode struct {
	name, host, cfg, data, log string
	proc                       *os.Process
	done                       chan struct{}
}

// StartPatroni starts the cluster on etcd (host:port of a v3 endpoint) and
// waits until one node is the primary and the other a streaming replica.
func StartPatroni(t T, etcd string) *Patroni {
	t.Helper()
	p := &Patroni{bin: scriptPath(t, "patroni-bin")}
	hosts := []string{"127.0.26.1", "127.0.26.2"}
	var err error
	if p.PGPort, p.RESTPort, err = commonPorts(hosts); err != nil {
		t.Fatalf("testenv: patroni ports: %v", err)
	}
	// Not t.TempDir: its parents are root's alone, and the nodes may run
	// as postgres.
	if p.dir, err = os.MkdirTemp("", "rota-patroni-"); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(p.dir) })
	if err := os.Chmod(p.dir, 0o755); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	uid, gid := -1, -1
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatalf("testenv: PostgreSQL does not run as root and there is no postgres user: %v", err)
		}
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
		p.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	for i, h := range hosts {
		n := &patroniNode{name: fmt.Sprintf("node%d", i), host: h}
		nd := filepath.Join(p.dir, n.name)
		n.cfg, n.data, n.log = filepath.Join(nd, "patroni.yml"), filepath.Join(nd, "data"), filepath.Join(nd, "patroni.log")
		if err := os.Mkdir(nd, 0o700); err != nil {
			t.Fatalf("testenv: %v", err)
		}
		if err := os.WriteFile(n.cfg, []byte(p.config(n, nd, etcd)), 0o600); err != nil {
			t.Fatalf("testenv: %v", err)
		}
		if uid >= 0 {
			for _, f := range []string{nd, n.cfg} {
				if err := os.Chown(f, uid, gid); err != nil {
					t.Fatalf("testenv: %v", err)
				}
			}
		}
		p.nodes = append(p.nodes, n)
	}
	t.Cleanup(p.stop)
	for i := range p.nodes {
		p.Start(t, i)
	}
	if _, ok := Poll(90*time.Second, func() bool {
		pr := p.Primary()
		return pr >= 0 && p.Answers(1-pr, "replica")
	}); !ok {
		t.Fatalf("testenv: patroni: no primary and replica within 90 s\n%s", p.Logs())
	}
	return p
}

// config is node n's patroni.yml. Patroni's own minimum TTL (20 s) bounds
// how long a killed primary holds the leader key.
func (p *Patroni) config(n *patroniNode, dir, etcd string) string {
	return fmt.Sprintf(`scope: rota-test
name: %[1]s
log: {level: INFO}
restapi:
  listen: %[2]s:%[3]s
  connect_address: %[2]s:%[3]s
etcd3:
  hosts: %[4]s
bootstrap:
  dcs:
    ttl: 20
    loop_wait: 1
    retry_timeout: 5
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      parameters: {wal_log_hints: "on"}
  initdb: [{encoding: UTF8}]
postgresql:
  listen: %[2]s:%[5]s
  connect_address: %[2]s:%[5]s
  data_dir: %[6]s/data
  bin_dir: %[7]s
  pgpass: %[6]s/pgpass
  authentication:
    superuser: {username: postgres, password: secret}
    replication: {username: replicator, password: secret}
    rewind: {username: postgres, password: secret}
  parameters:
    unix_socket_directories: %[6]s
    fsync: "off"
    synchronous_commit: "off"
  pg_hba:
    - local all all trust
    - host all all 127.0.0.0/8 trust
    - host replication replicator 127.0.0.0/8 trust
`, n.name, n.host, p.RESTPort, etcd, p.PGPort, dir, PGBin)
}

// Start starts node i's patroni (after Kill: it rejoins as a replica,
// rewinding if it must).
func (p *Patroni) Start(t T, i int) {
	t.Helper()
	n := p.nodes[i]
	logf, err := os.OpenFile(n.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	defer logf.Close()
	cmd := exec.Command(p.bin, n.cfg)
	cmd.Dir = filepath.Dir(n.cfg)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: p.cred}
	if err := cmd.Start(); err != nil {
		t.Fatalf("testenv: start patroni: %v", err)
	}
	n.proc, n.done = cmd.Process, make(chan struct{})
	go func(done chan struct{}) { _ = cmd.Wait(); close(done) }(n.done)
}

// Host is node i's loopback address; PG its PostgreSQL address.
func (p *Patroni) Host(i int) string { return p.nodes[i].host }

// PG is node i's PostgreSQL address.
func (p *Patroni) PG(i int) string { return net.JoinHostPort(p.nodes[i].host, p.PGPort) }

// Answers tells whether node i's REST API answers 200 on /<role>
// ("primary", "replica"), as a health check would ask it.
func (p *Patroni) Answers(i int, role string) bool {
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get("http://" + net.JoinHostPort(p.nodes[i].host, p.RESTPort) + "/" + role)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// Primary is the one node answering /primary, -1 for none or both.
func (p *Patroni) Primary() int {
	found := -1
	for i := range p.nodes {
		if p.Answers(i, "primary") {
			if found >= 0 {
				return -1
			}
			found = i
		}
	}
	return found
}

// Switchover asks Patroni (patronictl) to hand the primary role from node
// from to node to, once node to has replayed what the primary wrote
// (Patroni refuses a candidate lagging by more than
// maximum_lag_on_failover, and patronictl then says so but exits 0); it
// returns when patronictl does, and fails the test unless Patroni
// switched over.
func (p *Patroni) Switchover(t T, from, to int) {
	t.Helper()
	Eventually(t, fmt.Sprintf("node %d caught up with the primary", to), time.Minute, func() bool {
		return p.Answers(to, "replica?lag=16kB")
	})
	ctl := filepath.Join(filepath.Dir(p.bin), "patronictl")
	out, err := exec.Command(ctl, "-c", p.nodes[to].cfg, "switchover",
		"--leader", p.nodes[from].name, "--candidate", p.nodes[to].name, "--force").CombinedOutput()
	// Done, or handed to the DCS when the API call failed (Patroni then
	// switches over on its own); a refusal is neither.
	if err != nil || !strings.Contains(string(out), "Successfully switched over") && !strings.Contains(string(out), "falling back to DCS") {
		t.Fatalf("testenv: patronictl switchover: %v\n%s", err, out)
	}
}

// Kill kills node i as a crash would: patroni and PostgreSQL at once,
// nothing handed over (the leader key stays until its TTL ends).
func (p *Patroni) Kill(i int) {
	n := p.nodes[i]
	if n.proc == nil {
		return
	}
	pm := p.postmaster(i)
	_ = syscall.Kill(-n.proc.Pid, syscall.SIGKILL)
	if pm > 0 {
		// The postmaster leads its own session (patroni detaches it).
		_ = syscall.Kill(-pm, syscall.SIGKILL)
	}
	<-n.done
	n.proc = nil
}

// postmaster is node i's PostgreSQL server pid, 0 when it has none.
func (p *Patroni) postmaster(i int) int {
	b, err := os.ReadFile(filepath.Join(p.nodes[i].data, "postmaster.pid"))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]))
	// A crashed server leaves its pid file: make sure the pid is still its.
	if comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); pid <= 0 || err != nil || strings.TrimSpace(string(comm)) != "postgres" {
		return 0
	}
	return pid
}

// stop stops every node: patroni stops its PostgreSQL on SIGTERM; what
// does not end within 20 s is killed.
func (p *Patroni) stop() {
	for _, n := range p.nodes {
		if n.proc != nil {
			_ = n.proc.Signal(syscall.SIGTERM)
		}
	}
	for i, n := range p.nodes {
		if n.proc == nil {
			continue
		}
		select {
		case <-n.done:
		case <-time.After(20 * time.Second):
			_ = syscall.Kill(-n.proc.Pid, syscall.SIGKILL)
			<-n.done
		}
		n.proc = nil
		if pm := p.postmaster(i); pm > 0 { // left running
			_ = syscall.Kill(-pm, syscall.SIGKILL)
		}
	}
}

// Logs is what every node's patroni printed.
func (p *Patroni) Logs() string {
	var b bytes.Buffer
	for _, n := range p.nodes {
		out, _ := os.ReadFile(n.log)
		fmt.Fprintf(&b, "--- %s (%s)\n%s", n.name, n.host, out)
	}
	return b.String()
}

// PSQL runs one statement on addr (host:port, a node or rota in front of
// one) as the superuser and returns psql's unaligned answer.
func PSQL(addr, sql string) (string, error) {
	host, port, _ := net.SplitHostPort(addr)
	cmd := exec.Command(filepath.Join(PGBin, "psql"), "-h", host, "-p", port, "-U", "postgres", "-d", "postgres",
		"-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql)
	cmd.Env = append(os.Environ(), "PGCONNECT_TIMEOUT=3", "PGPASSWORD=secret")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("psql %s: %w: %s", addr, err, bytes.TrimSpace(out))
	}
	return strings.TrimSpace(string(out)), nil
}

// commonPorts finds two ports free on every host.
func commonPorts(hosts []string) (string, string, error) {
	var got []string
	var held []net.Listener
	defer func() {
		for _, l := range held {
			_ = l.Close()
		}
	}()
	for tries := 0; len(got) < 2 && tries < 50; tries++ {
		l, err := net.Listen("tcp", net.JoinHostPort(hosts[0], "0"))
		if err != nil {
			return "", "", err
		}
		held = append(held, l)
		_, port, _ := net.SplitHostPort(l.Addr().String())
		ok := true
		for _, h := range hosts[1:] {
			l2, err := net.Listen("tcp", net.JoinHostPort(h, port))
			if err != nil {
				ok = false
				break
			}
			held = append(held, l2)
		}
		if ok {
			got = append(got, port)
		}
	}
	if len(got) < 2 {
		return "", "", fmt.Errorf("no two ports free on all of %v", hosts)
	}
	return got[0], got[1], nil
}
