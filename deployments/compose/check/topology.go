package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"time"
)

// Deadlines of the waits below: generous for two shared cores, never
// slept through: every wait polls its condition.
const (
	upTimeout     = 3 * time.Minute
	routeTimeout  = 30 * time.Second
	healthTimeout = 2 * time.Minute
	// recoverTimeout bounds a registry cluster's recovery once its
	// majority is back (Consul's serf readmits a server within 30 s).
	recoverTimeout = 90 * time.Second
)

// scaled is the scale of the backend services and the plain app, given in
// full to every `up`.
type scaled struct{ etcd, consul, app int }

func (s scaled) m() map[string]int {
	return map[string]int{"backend": s.etcd, "backend-consul": s.consul, "app": s.app}
}

// checkTopology runs the checks of docker-compose.yml with local.yml.
func checkTopology(ctx context.Context, c *compose, r *report) error {
	f := &faults{}
	sc := scaled{2, 2, 2}
	start := time.Now()
	if err := c.up(ctx, sc.m()); err != nil {
		return r.fail("up", time.Since(start), err)
	}
	if _, err := c.waitHealthy(ctx, upTimeout); err != nil {
		return r.fail("up: every container healthy", time.Since(start), err)
	}
	r.record("up: every container healthy", time.Since(start), true, "backend=%d backend-consul=%d app=%d, consul, etcd, rota", sc.etcd, sc.consul, sc.app)

	if err := roundRobin(ctx, c, r, "backend", webAddr, sc.etcd); err != nil {
		return err
	}
	if err := roundRobin(ctx, c, r, "backend-consul", webConsulAddr, sc.consul); err != nil {
		return err
	}
	for _, rt := range appRoutes { // the plain app, registered nowhere
		if err := roundRobin(ctx, c, r, "app", rt.addr, sc.app); err != nil {
			return err
		}
	}

	// Scale out: the new instances are routed within seconds.
	before, _ := c.containers(ctx, "backend")
	start = time.Now()
	sc.etcd = 5
	if err := c.scale(ctx, sc.m()); err != nil {
		return r.fail("scale out backend=5", time.Since(start), err)
	}
	upTook := time.Since(start)
	all, err := c.containers(ctx, "backend")
	if err != nil {
		return err
	}
	if _, err := waitRouted(ctx, webAddr, hostnames(all), routeTimeout); err != nil {
		return r.fail("scale out backend=5", time.Since(start), err)
	}
	r.record("scale out backend=5: all 5 routed", time.Since(start), true, "%d new instances answer through :8080 (compose up took %v)",
		len(all)-len(before), upTook.Round(time.Millisecond))

	if err := appScaleOut(ctx, c, r, &sc, 5); err != nil {
		return err
	}

	// Client load from here on: every fault below happens under it.
	ld := startLoad(ctx, []string{webAddr, webConsulAddr, appDNSAddr, appDockerAddr}, 2)
	defer ld.stop()

	// Scale in under load: stopped backends deregister, then drain.
	m := ld.mark()
	start = time.Now()
	sc.etcd = 2
	if err := c.scale(ctx, sc.m()); err != nil {
		return r.fail("scale in backend=2 under load", time.Since(start), err)
	}
	left, err := c.containers(ctx, "backend")
	if err != nil {
		return err
	}
	if _, err := waitOnly(ctx, webAddr, hostnames(left), 20, routeTimeout); err != nil {
		return r.fail("scale in backend=2 under load", time.Since(start), err)
	}
	ok, failed := ld.since(m)
	r.record("scale in backend=2 under load", time.Since(start), failed == 0,
		"%d failed client connections of %d (slowest %v); only the 2 left answer", failed, ok+failed, ld.slow())

	// One backend killed (SIGKILL) under load: retries and replay cover it.
	m = ld.mark()
	start = time.Now()
	victim := left[0]
	if _, err := docker(ctx, "kill", victim.ID); err != nil {
		return r.fail("kill one backend under load", time.Since(start), err)
	}
	survivors := hostnames(left[1:])
	if _, err := waitOnly(ctx, webAddr, survivors, 20, routeTimeout); err != nil {
		return r.fail("kill one backend under load", time.Since(start), err)
	}
	// The killed backend never deregistered: its key stays until its
	// lease expires (10 s). Keep the load on until rota has dropped it.
	victimAddr := net.JoinHostPort(victim.ip(), "9000")
	if err := waitFor(ctx, routeTimeout, func() error { return notTarget(ctx, "web", victimAddr) }); err != nil {
		return r.fail("kill one backend under load", time.Since(start), err)
	}
	ok, failed = ld.since(m)
	r.record("docker kill one backend under load", time.Since(start), failed == 0,
		"%d failed client connections of %d (slowest %v); its lease expired and rota dropped it after %v",
		failed, ok+failed, ld.slow(), time.Since(start).Round(time.Millisecond))
	// Back to two: compose starts the killed container again.
	if err := c.scale(ctx, sc.m()); err != nil {
		return r.fail("restore backend=2", 0, err)
	}

	// The same two steps for the plain app, through DNS and labels.
	if err := appScaleIn(ctx, c, r, ld, &sc, 2); err != nil {
		return err
	}
	if err := appKill(ctx, c, r, ld, &sc); err != nil {
		return err
	}

	if err := registryOutage(ctx, c, r, ld, f, "etcd", "backend", webAddr, &sc, &sc.etcd); err != nil {
		return err
	}
	if err := registryOutage(ctx, c, r, ld, f, "consul", "backend-consul", webConsulAddr, &sc, &sc.consul); err != nil {
		return err
	}
	ld.stop()
	total, failedAll := ld.ok.Load()+ld.failed.Load(), ld.failed.Load()
	r.record("client load through scale in, kill and registry outages", 0, failedAll == 0,
		"%d requests from the host (a new connection each), %d failed", total, failedAll)

	if err := restartRota(ctx, c, r); err != nil {
		return err
	}
	return finalChecks(ctx, c, r, f)
}

// roundRobin checks that requests through addr reach every running
// container of service, and only those.
func roundRobin(ctx context.Context, c *compose, r *report, service, addr string, n int) error {
	name := fmt.Sprintf("round-robin through %s over %d %s containers", addr, n, service)
	start := time.Now()
	cs, err := c.containers(ctx, service)
	if err != nil {
		return r.fail(name, 0, err)
	}
	if len(cs) != n {
		return r.fail(name, 0, fmt.Errorf("%d containers, want %d", len(cs), n))
	}
	want := hostnames(cs)
	if _, err := waitRouted(ctx, addr, want, routeTimeout); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	seen := map[string]int{}
	for range 4 * n {
		got, err := get(ctx, addr)
		if err != nil {
			return r.fail(name, time.Since(start), err)
		}
		seen[got]++
	}
	for got := range seen {
		if !slices.Contains(want, got) {
			return r.fail(name, time.Since(start), fmt.Errorf("answered by %q, not one of %v", got, want))
		}
	}
	r.record(name, time.Since(start), len(seen) == n, "%d requests reached %v", 4*n, seen)
	return nil
}

// registryOutage stops a registry under load, checks the last good set
// keeps serving, starts it again and checks that a change (one more
// backend) is routed.
func registryOutage(ctx context.Context, c *compose, r *report, ld *load, f *faults, registry, service, addr string, sc *scaled, n *int) error {
	name := fmt.Sprintf("compose stop %s under load: last good set serves", registry)
	listener := map[string]string{"etcd": "web", "consul": "web-consul"}[registry]
	errsBefore, err := discoveryErrors(ctx, listener)
	if err != nil {
		return r.fail(name, 0, err)
	}
	m := ld.mark()
	start := time.Now()
	closeWindow := f.open(registry + " stopped")
	if _, err := c.run(ctx, "stop", registry); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	stopTook := time.Since(start)
	exit := "?"
	if regs, err := c.containers(ctx, registry); err == nil && len(regs) == 1 {
		exit = fmt.Sprint(regs[0].State.ExitCode) // 137: killed at compose's stop timeout
	}
	// Traffic through the registry's listener while it is down, and
	// after rota has seen it down: both backends keep answering.
	errsNow, err := waitDiscoveryErrors(ctx, listener, errsBefore, routeTimeout)
	if err != nil {
		return r.fail(name, time.Since(start), err)
	}
	cs, err := c.containers(ctx, service)
	if err != nil {
		return err
	}
	if _, err := waitRouted(ctx, addr, hostnames(cs), routeTimeout); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	if err := ld.waitRequests(ctx, addr, 300, routeTimeout); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	ok, failed := ld.since(m)
	r.record(name, time.Since(start), failed == 0, "%d failed client connections of %d (slowest %v) while %s was down and rota counted %v discovery errors (stop took %v, exit code %s)",
		failed, ok+failed, ld.slow(), registry, errsNow-errsBefore, stopTook.Round(time.Millisecond), exit)

	name = fmt.Sprintf("compose start %s: a new %s instance is routed", registry, service)
	start = time.Now()
	if _, err := c.run(ctx, "start", registry); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	if _, err := c.waitHealthy(ctx, healthTimeout); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	healthy := time.Since(start)
	closeWindow()
	*n++
	if err := c.scale(ctx, sc.m()); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	all, err := c.containers(ctx, service)
	if err != nil {
		return err
	}
	if len(all) != *n {
		return r.fail(name, time.Since(start), fmt.Errorf("%d %s containers, want %d", len(all), service, *n))
	}
	scaledAt := time.Now()
	if _, err := waitRouted(ctx, addr, hostnames(all), routeTimeout); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	r.record(name, time.Since(start), true, "%s healthy after %v; %d instances routed %v after the scale-up",
		registry, healthy.Round(time.Millisecond), *n, time.Since(scaledAt).Round(time.Millisecond))
	return nil
}

// restartRota restarts the proxy and waits for its healthcheck, then for
// /readyz from the host.
func restartRota(ctx context.Context, c *compose, r *report) error {
	name := "compose restart rota: healthy, /readyz 200"
	start := time.Now()
	before, err := c.containers(ctx, "rota")
	if err != nil || len(before) != 1 {
		return r.fail(name, 0, fmt.Errorf("rota containers %v: %v", before, err))
	}
	if _, err := c.run(ctx, "restart", "rota"); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	restarted := time.Since(start)
	for {
		cs, err := inspect(ctx, before[0].ID)
		if err != nil {
			return r.fail(name, time.Since(start), err)
		}
		if cs[0].State.StartedAt.After(before[0].State.StartedAt) && cs[0].health() == "healthy" {
			break
		}
		if time.Since(start) > healthTimeout {
			return r.fail(name, time.Since(start), fmt.Errorf("rota is %s", cs[0].health()))
		}
		if err := pause(ctx, 100*time.Millisecond); err != nil {
			return err
		}
	}
	healthy := time.Since(start)
	code, err := status(ctx, "http://"+adminAddr+"/readyz")
	if err != nil || code != 200 {
		return r.fail(name, time.Since(start), fmt.Errorf("/readyz: %d %v", code, err))
	}
	if _, err := get(ctx, webAddr); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	r.record(name, time.Since(start), true, "restart returned after %v, healthcheck passed after %v, /readyz 200, :8080 routes",
		restarted.Round(time.Millisecond), healthy.Round(time.Millisecond))
	return nil
}

// finalChecks: every container healthy, and no error in rota's log that
// the faults do not explain.
func finalChecks(ctx context.Context, c *compose, r *report, f *faults) error {
	start := time.Now()
	ids, err := c.allIDs(ctx)
	if err != nil {
		return err
	}
	if _, err := c.waitHealthy(ctx, healthTimeout); err != nil {
		return r.fail("every container healthy", time.Since(start), err)
	}
	r.record("every container healthy", time.Since(start), true, "%d containers", len(ids))

	start = time.Now()
	scan, err := errorLines(ctx, c, "rota", f)
	if err != nil {
		return r.fail("rota's log", time.Since(start), err)
	}
	for _, l := range scan.unexplained {
		logf("unexplained error line: %s", l)
	}
	r.record("rota's log: no error lines but the faults'", time.Since(start), scan.lines > 0 && len(scan.unexplained) == 0,
		"%d JSON lines read (%d warnings); %d error lines unexplained; explained by the faults: %s",
		scan.lines, scan.warnings, len(scan.unexplained), describeExplained(scan.explained))
	return nil
}

// notTarget is the condition that rota's admin API no longer lists addr
// among the targets of listener.
func notTarget(ctx context.Context, listener, addr string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+adminAddr+"/api/v1/targets", nil)
	if err != nil {
		return err
	}
	resp, err := do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var doc struct {
		Listeners []struct {
			Name    string
			Targets []struct{ Addr, State string }
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		return fmt.Errorf("/api/v1/targets: %w", err)
	}
	for _, l := range doc.Listeners {
		if l.Name != listener {
			continue
		}
		for _, t := range l.Targets {
			if t.Addr == addr {
				return fmt.Errorf("rota still lists %s (%s)", addr, t.State)
			}
		}
		return nil
	}
	return fmt.Errorf("rota has no listener %s", listener)
}
