package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"
)

// etcdMembers are the etcd members of cluster.yml, by compose service.
func etcdMembers() []string { return []string{"etcd", "etcd2", "etcd3"} }

// consulServers are the Consul servers of cluster.yml, by compose service.
func consulServers() []string {
	return []string{"consul-server-1", "consul-server-2", "consul-server-3"}
}

// checkCluster runs the checks of cluster.yml: with client load running,
// one member of each cluster is cut off its network and then the leader of
// each is killed, which leaves each cluster without a majority; rota keeps
// serving its last good sets. Then the cut member is connected again (the
// majority is back), a change must be routed, and the killed leader is
// started again.
func checkCluster(ctx context.Context, c *compose, r *report) error {
	f := &faults{}
	sc := scaled{2, 2, 1}
	start := time.Now()
	if err := c.up(ctx, sc.m()); err != nil {
		return r.fail("up", time.Since(start), err)
	}
	if _, err := c.waitHealthy(ctx, upTimeout); err != nil {
		return r.fail("up: every container healthy", time.Since(start), err)
	}
	ids, _ := c.allIDs(ctx)
	r.record("up: every container healthy", time.Since(start), true, "%d containers: 3 etcd members, 3 Consul servers and an agent, backends, rota", len(ids))
	if err := roundRobin(ctx, c, r, "backend", webAddr, sc.etcd); err != nil {
		return err
	}
	if err := roundRobin(ctx, c, r, "backend-consul", webConsulAddr, sc.consul); err != nil {
		return err
	}

	etcdLeader, etcdCut, err := etcdRoles(ctx, c)
	if err != nil {
		return r.fail("etcd leader", 0, err)
	}
	consulLeader, consulCut, err := consulRoles(ctx, c)
	if err != nil {
		return r.fail("consul leader", 0, err)
	}
	logf("etcd: leader %s, cutting off %s; consul: leader %s, cutting off %s",
		etcdLeader.service(), etcdCut.service(), consulLeader.service(), consulCut.service())

	ld := startLoad(ctx, []string{webAddr, webConsulAddr}, 2)
	defer ld.stop()
	closeWindow := f.open("cluster members cut off and killed")

	// A follower of each cluster cut off its network.
	name := "docker network disconnect one member of each cluster under load"
	m := ld.mark()
	start = time.Now()
	var reconnect []func(context.Context) error
	for _, ct := range []container{etcdCut, consulCut} {
		rc, err := disconnect(ctx, ct)
		if err != nil {
			return r.fail(name, time.Since(start), err)
		}
		reconnect = append(reconnect, rc)
	}
	if err := ld.waitRequests(ctx, webAddr, 200, routeTimeout); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	if err := ld.waitRequests(ctx, webConsulAddr, 200, routeTimeout); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	ok, failed := ld.since(m)
	r.record(name, time.Since(start), failed == 0, "%s and %s cut off: %d failed client connections of %d (slowest %v)",
		etcdCut.service(), consulCut.service(), failed, ok+failed, ld.slow())

	// Then the leaders killed: one member of three left on each side, no
	// majority, the registries cannot answer; rota keeps its last good sets.
	name = "docker kill the leaders: no majority left, last good sets serve"
	before := map[string]float64{}
	for _, l := range []string{"web", "web-consul"} {
		if before[l], err = discoveryErrors(ctx, l); err != nil {
			return r.fail(name, 0, err)
		}
	}
	m = ld.mark()
	start = time.Now()
	for _, ct := range []container{etcdLeader, consulLeader} {
		if _, err := docker(ctx, "kill", ct.ID); err != nil {
			return r.fail(name, time.Since(start), err)
		}
	}
	// Serve through both listeners without a majority, after rota has
	// seen etcd fail. Consul's client agent answers rota's blocking query
	// from the view it streams from the servers: it may stay parked,
	// serving the last data, so rota may see no Consul error at all; the
	// count is reported, not required.
	seen := map[string]float64{}
	n, err := waitDiscoveryErrors(ctx, "web", before["web"], recoverTimeout)
	if err != nil {
		return r.fail(name, time.Since(start), err)
	}
	seen["web"] = n - before["web"]
	for _, addr := range []string{webAddr, webConsulAddr} {
		if err := ld.waitRequests(ctx, addr, 500, routeTimeout); err != nil {
			return r.fail(name, time.Since(start), err)
		}
	}
	if n, err := discoveryErrors(ctx, "web-consul"); err == nil {
		seen["web-consul"] = n - before["web-consul"]
	}
	noQuorum := c.noQuorum(ctx)
	ok, failed = ld.since(m)
	r.record(name, time.Since(start), failed == 0 && noQuorum == nil,
		"%s and %s killed: %d failed client connections of %d (slowest %v) in %v without a majority; rota counted %v etcd and %v Consul discovery errors; no quorum read answered: %v",
		etcdLeader.service(), consulLeader.service(), failed, ok+failed, ld.slow(), time.Since(start).Round(time.Millisecond),
		seen["web"], seen["web-consul"], errOr(noQuorum, "confirmed"))

	// The majority recovers: the cut members are back on their network.
	name = "majority recovers: cut members connected again, a new leader each"
	m = ld.mark()
	start = time.Now()
	for _, rc := range reconnect {
		if err := rc(ctx); err != nil {
			return r.fail(name, time.Since(start), err)
		}
	}
	remaining := otherThan(etcdMembers(), etcdLeader.service(), etcdCut.service())
	if err := waitFor(ctx, recoverTimeout, func() error { return etcdQuorum(ctx, c, remaining) }); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	etcdBack := time.Since(start)
	// Consul: raft elects a leader within seconds, but a server cut off
	// is used again only once serf has readmitted it (it retries failed
	// members every 30 s), so consistent reads can take longer.
	var raftLeader time.Duration
	if err := waitFor(ctx, recoverTimeout, func() error {
		if raftLeader == 0 {
			if a, err := consulLeaderAddr(ctx); err == nil && !strings.HasPrefix(a, consulLeader.ip()+":") {
				raftLeader = time.Since(start)
			}
		}
		if err := consulQuorum(ctx)(); err != nil {
			return err
		}
		if raftLeader == 0 { // elected between the two questions
			raftLeader = time.Since(start)
		}
		return nil
	}); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	ok, failed = ld.since(m)
	r.record(name, time.Since(start), failed == 0, "etcd answers a quorum read after %v; Consul reports a raft leader after %v and answers a consistent read after %v; %d failed client connections of %d",
		etcdBack.Round(time.Millisecond), raftLeader.Round(time.Millisecond), time.Since(start).Round(time.Millisecond), failed, ok+failed)

	// Changes are routed again: one more backend of each kind.
	name = "after recovery: new instances of both services routed"
	m = ld.mark()
	start = time.Now()
	sc.etcd, sc.consul = 3, 3
	if err := c.scale(ctx, sc.m()); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	scaledAt := time.Now()
	for _, s := range []struct{ service, addr string }{{"backend", webAddr}, {"backend-consul", webConsulAddr}} {
		cs, err := c.containers(ctx, s.service)
		if err != nil {
			return err
		}
		if _, err := waitRouted(ctx, s.addr, hostnames(cs), routeTimeout); err != nil {
			return r.fail(name, time.Since(start), err)
		}
	}
	ok, failed = ld.since(m)
	r.record(name, time.Since(start), failed == 0, "3 + 3 instances routed %v after the scale-up; %d failed client connections of %d",
		time.Since(scaledAt).Round(time.Millisecond), failed, ok+failed)

	// The killed leaders start again and rejoin.
	name = "killed leaders started again: every container healthy"
	m = ld.mark()
	start = time.Now()
	for _, ct := range []container{etcdLeader, consulLeader} {
		if _, err := docker(ctx, "start", ct.ID); err != nil {
			return r.fail(name, time.Since(start), err)
		}
	}
	if _, err := c.waitHealthy(ctx, healthTimeout); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	// Load on for a while after the rejoin: a member that rejoins behind
	// the others must not make rota route less.
	for _, addr := range []string{webAddr, webConsulAddr} {
		if err := ld.waitRequests(ctx, addr, 500, routeTimeout); err != nil {
			return r.fail(name, time.Since(start), err)
		}
	}
	closeWindow()
	ld.stop()
	ok, failed = ld.since(m)
	r.record(name, time.Since(start), failed == 0, "rejoined; %d failed client connections of %d", failed, ok+failed)
	total, failedAll := ld.ok.Load()+ld.failed.Load(), ld.failed.Load()
	if failedAll > 0 {
		// What rota saw of its pools, to tell why clients failed.
		if out, err := c.run(ctx, "logs", "--no-color", "rota"); err == nil {
			for _, line := range strings.Split(out, "\n") {
				if strings.Contains(line, `"level":"warn"`) || strings.Contains(line, "instances changed") ||
					strings.Contains(line, "empty") || strings.Contains(line, "refusing") || strings.Contains(line, "served again") {
					logf("rota: %s", line)
				}
			}
		}
	}
	r.record("client load through the partition, the lost majority and the recovery", 0, failedAll == 0,
		"%d requests from the host (a new connection each), %d failed%s", total, failedAll, ld.firstErrors())
	return finalChecks(ctx, c, r, f)
}

// disconnect cuts a container off its network and returns the function
// that connects it again with the same address and aliases.
func disconnect(ctx context.Context, ct container) (func(context.Context) error, error) {
	if len(ct.NetworkSettings.Networks) != 1 {
		return nil, fmt.Errorf("%s is on %d networks, want 1", ct.Name, len(ct.NetworkSettings.Networks))
	}
	for network, n := range ct.NetworkSettings.Networks {
		if _, err := docker(ctx, "network", "disconnect", network, ct.ID); err != nil {
			return nil, err
		}
		args := []string{"network", "connect", "--ip", n.IPAddress}
		for _, a := range n.Aliases {
			if !strings.HasPrefix(ct.ID, a) { // docker adds the short ID itself
				args = append(args, "--alias", a)
			}
		}
		args = append(args, network, ct.ID)
		return func(ctx context.Context) error {
			_, err := docker(ctx, args...)
			return err
		}, nil
	}
	return nil, errors.New("unreachable")
}

// etcdRoles returns the etcd leader and a follower to cut off.
func etcdRoles(ctx context.Context, c *compose) (leader, follower container, err error) {
	members := map[string]container{} // by IP
	var eps []string
	var first container
	for _, s := range etcdMembers() {
		cs, err := c.containers(ctx, s)
		if err != nil || len(cs) != 1 {
			return leader, follower, fmt.Errorf("etcd member %s: %d containers, %v", s, len(cs), err)
		}
		if first.ID == "" {
			first = cs[0]
		}
		members[cs[0].ip()] = cs[0]
		eps = append(eps, "http://"+net.JoinHostPort(cs[0].ip(), "2379"))
	}
	// etcdctl is in the member images, and the members' ports are not
	// published: ask from inside one of them.
	out, err := docker(ctx, "exec", first.ID, "etcdctl", "--endpoints="+strings.Join(eps, ","), "endpoint", "status", "-w", "json")
	if err != nil {
		return leader, follower, err
	}
	var st []struct {
		Endpoint string
		Status   struct {
			Header struct {
				MemberID uint64 `json:"member_id"`
			} `json:"header"`
			Leader uint64 `json:"leader"`
		}
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return leader, follower, fmt.Errorf("etcdctl endpoint status: %w: %s", err, out)
	}
	for _, s := range st {
		host, _, _ := net.SplitHostPort(strings.TrimPrefix(s.Endpoint, "http://"))
		if s.Status.Header.MemberID == s.Status.Leader && s.Status.Leader != 0 {
			leader = members[host]
		} else if follower.ID == "" {
			follower = members[host]
		}
	}
	if leader.ID == "" || follower.ID == "" {
		return leader, follower, fmt.Errorf("no leader and follower in %s", out)
	}
	return leader, follower, nil
}

// consulRoles returns the Consul leader and a follower server to cut off,
// from the leader's address as the agent reports it.
func consulRoles(ctx context.Context, c *compose) (leader, follower container, err error) {
	addr, err := consulLeaderAddr(ctx)
	if err != nil {
		return leader, follower, err
	}
	host, _, _ := net.SplitHostPort(addr)
	for _, s := range consulServers() {
		cs, err := c.containers(ctx, s)
		if err != nil || len(cs) != 1 {
			return leader, follower, fmt.Errorf("consul server %s: %d containers, %v", s, len(cs), err)
		}
		if cs[0].ip() == host {
			leader = cs[0]
		} else if follower.ID == "" {
			follower = cs[0]
		}
	}
	if leader.ID == "" {
		return leader, follower, fmt.Errorf("consul leader %s is none of the servers", addr)
	}
	return leader, follower, nil
}

// consulLeaderAddr asks the agent published on the host for the leader.
func consulLeaderAddr(ctx context.Context) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+consulAddr+"/v1/status/leader", nil)
	if err != nil {
		return "", err
	}
	resp, err := do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var leader string
	if err := json.NewDecoder(resp.Body).Decode(&leader); err != nil {
		return "", fmt.Errorf("consul /v1/status/leader: %w", err)
	}
	if leader == "" {
		return "", errors.New("consul has no leader")
	}
	return leader, nil
}

// consulQuorum is the condition that Consul answers a consistent read of
// the service rota watches.
func consulQuorum(ctx context.Context) func() error {
	return func() error {
		code, err := status(ctx, "http://"+consulAddr+"/v1/health/service/web-consul?passing&consistent")
		if err != nil {
			return err
		}
		if code != http.StatusOK {
			return fmt.Errorf("consul health query: status %d", code)
		}
		return nil
	}
}

// etcdQuorum is the condition that the named members answer a
// linearizable read (etcdctl endpoint health).
func etcdQuorum(ctx context.Context, c *compose, members []string) error {
	for _, s := range members {
		cs, err := c.containers(ctx, s)
		if err != nil || len(cs) != 1 {
			return fmt.Errorf("etcd member %s: %v", s, err)
		}
		if _, err := docker(ctx, "exec", cs[0].ID, "etcdctl", "--endpoints=http://127.0.0.1:2379",
			"--command-timeout=2s", "endpoint", "health"); err != nil {
			return err
		}
	}
	return nil
}

// noQuorum confirms that neither registry can answer a quorum read while
// the majority is gone, so that the check above tested what it says.
func (c *compose) noQuorum(ctx context.Context) error {
	var alive []string
	for _, s := range etcdMembers() {
		cs, err := c.containers(ctx, s)
		if err == nil && len(cs) == 1 && cs[0].State.Running && len(cs[0].NetworkSettings.Networks) == 1 {
			alive = append(alive, s)
		}
	}
	if len(alive) != 1 {
		return fmt.Errorf("etcd members running and connected: %v, want one", alive)
	}
	if etcdQuorum(ctx, c, alive) == nil {
		return errors.New("etcd still answers a quorum read")
	}
	if consulQuorum(ctx)() == nil {
		return errors.New("consul still answers a consistent read")
	}
	return nil
}

func otherThan(all []string, not ...string) []string {
	var out []string
	for _, s := range all {
		skip := false
		for _, n := range not {
			skip = skip || s == n
		}
		if !skip {
			out = append(out, s)
		}
	}
	return out
}

// waitFor polls cond until it returns nil or timeout passes.
func waitFor(ctx context.Context, timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %v: %w", timeout, err)
		}
		if err := pause(ctx, 200*time.Millisecond); err != nil {
			return err
		}
	}
}

func errOr(err error, s string) string {
	if err != nil {
		return err.Error()
	}
	return s
}

// freeSubnet picks a /24 for cluster.yml's network that no Docker network
// on this machine overlaps, and returns its first three octets.
func freeSubnet(ctx context.Context) (string, error) {
	out, err := docker(ctx, "network", "ls", "-q")
	if err != nil {
		return "", err
	}
	var used []*net.IPNet
	for _, id := range strings.Fields(out) {
		sub, err := docker(ctx, "network", "inspect", "-f", "{{range .IPAM.Config}}{{.Subnet}} {{end}}", id)
		if err != nil {
			continue
		}
		for _, s := range strings.Fields(sub) {
			if _, n, err := net.ParseCIDR(s); err == nil {
				used = append(used, n)
			}
		}
	}
	for third := 117; third < 117+100; third++ {
		prefix := fmt.Sprintf("172.30.%d", third%256)
		ip := net.ParseIP(prefix + ".0")
		_, mine, _ := net.ParseCIDR(prefix + ".0/24")
		free := true
		for _, n := range used {
			if n.Contains(ip) || mine.Contains(n.IP) {
				free = false
				break
			}
		}
		if free {
			return prefix, nil
		}
	}
	return "", errors.New("no free /24 in 172.30.0.0/16 for the cluster network")
}
