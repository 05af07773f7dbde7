// Command convergence measures how fast rota's routing follows its
// registry: the time from a registry write to the first client connection
// through the proxy that is routed accordingly — a newly registered backend
// answers, or a removed one has stopped answering for good.
//
// It runs everything in-process on loopback: the registry (an embedded
// etcd server), N demo backends (HTTP, `GET /` answers the backend's name),
// and one rota listener assembled from discovery watcher, health checker,
// round-robin balancer and proxy. It makes -changes registry writes,
// alternately registering and deregistering backends beyond a stable base
// set, and prints a markdown report to stdout. Logs go to stderr.
//
//	go run ./bench/convergence                # 200 changes against embedded etcd
//	go run ./bench/convergence -changes 50 -v
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/rota-proxy/rota/demo"
	"github.com/rota-proxy/rota/health"
)

type options struct {
	registry  string
	changes   int
	backends  int
	base      int
	timeout   time.Duration
	perChange time.Duration
	check     string
	goalP99   time.Duration
	verbose   bool
	scale     int           // > 0: the scale measurement with this many instances
	rate      int           // its changes a second
	dur       time.Duration // how long the changes go on
}

func main() {
	var o options
	flag.StringVar(&o.registry, "registry", "etcd", "registry to measure: etcd, consul, etcd-cluster (3 members), consul-cluster (3 servers), dns (SRV records, 1 s TTL) or kubernetes (EndpointSlices on a real kube-apiserver; backends in a network namespace, needs root); with -scale: etcd, dns (A records), dns-srv or docker (this many containers on the local engine)")
	flag.IntVar(&o.changes, "changes", 200, "registry changes to make (alternating register/deregister)")
	flag.IntVar(&o.backends, "backends", 4, "demo backends in all")
	flag.IntVar(&o.base, "base", 2, "backends registered throughout (the rest are registered and deregistered in turn)")
	flag.DurationVar(&o.timeout, "timeout", 55*time.Second, "bound on the whole measurement; a partial report is printed when it is reached")
	flag.DurationVar(&o.perChange, "change-timeout", 5*time.Second, "give up when one change has not converged after this long")
	flag.StringVar(&o.check, "check", health.CheckTCP, "health check of the listener: tcp, http or none")
	flag.DurationVar(&o.goalP99, "goal", 100*time.Millisecond, "p99 goal stated in the report")
	flag.BoolVar(&o.verbose, "v", false, "log at info level (default: warnings only)")
	flag.IntVar(&o.scale, "scale", 0, "measure discovery at scale instead: this many instances registered at once, then churn")
	flag.IntVar(&o.rate, "rate", 1000, "with -scale: changes a second during the churn")
	flag.DurationVar(&o.dur, "churn", 10*time.Second, "with -scale: how long the churn goes on")
	flag.Parse()
	if err := o.validate(); err != nil {
		fmt.Fprintln(os.Stderr, "convergence:", err)
		os.Exit(2)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if o.scale > 0 {
		run := runScale
		switch o.registry {
		case "dns", "dns-srv":
			run = runDNSScale
		case "docker":
			run = runDockerScale
		}
		if err := run(ctx, o, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "convergence:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "convergence:", err)
		os.Exit(1)
	}
}

func (o options) validate() error {
	switch {
	case !slices.Contains([]string{"etcd", "consul", "etcd-cluster", "consul-cluster", "dns", "kubernetes"}, o.registry) && (o.scale == 0 || !slices.Contains([]string{"dns-srv", "docker"}, o.registry)):
		return fmt.Errorf("-registry %q: want etcd, consul, etcd-cluster, consul-cluster, dns or kubernetes", o.registry)
	case o.changes < 1:
		return errors.New("-changes must be at least 1")
	case o.base < 1 || o.backends <= o.base:
		return errors.New("need -base >= 1 and -backends > -base (someone must be left to register and deregister)")
	}
	return nil
}

func newLogger(verbose bool) *zap.Logger {
	level := zapcore.WarnLevel
	if verbose {
		level = zapcore.InfoLevel
	}
	cfg := zap.NewDevelopmentConfig()
	cfg.Level = zap.NewAtomicLevelAt(level)
	cfg.DisableStacktrace = true
	lg, err := cfg.Build()
	if err != nil {
		return zap.NewNop()
	}
	return lg
}

func run(ctx context.Context, o options) error {
	log := newLogger(o.verbose)
	defer func() { _ = log.Sync() }()

	setupStart := time.Now()
	var reg registry
	var err error
	switch o.registry {
	case "consul":
		reg, err = startConsul(ctx, log)
	case "etcd-cluster":
		reg, err = startEtcdCluster(ctx, log)
	case "consul-cluster":
		reg, err = startConsulCluster(ctx, log)
	case "dns":
		reg, err = startDNS(log)
	case "kubernetes":
		reg, err = startKubernetes(ctx, o.backends, log)
	default:
		reg, err = startEtcd(ctx, log)
	}
	if err != nil {
		return err
	}
	defer reg.Close()

	var backends []*demo.Backend
	defer func() {
		for _, b := range backends {
			_ = b.Close()
		}
	}()
	for i := range o.backends {
		name := fmt.Sprintf("backend-%d", i+1)
		if nl, ok := reg.(netListener); ok {
			ln, err := nl.Listen(i)
			if err != nil {
				return err
			}
			backends = append(backends, demo.StartBackendOn(name, ln))
			continue
		}
		b, err := demo.StartBackend(ctx, name, "127.0.0.1:0")
		if err != nil {
			return err
		}
		backends = append(backends, b)
	}

	rt, err := startRouter(reg.Watcher(), o.check, log)
	if err != nil {
		return err
	}
	defer rt.stop(log)

	// The base set, registered before the clock starts.
	for _, b := range backends[:o.base] {
		if err := reg.Register(ctx, b.Addr()); err != nil {
			return err
		}
	}
	m := &measurement{o: o, rt: rt, reg: reg, backends: backends, removed: map[string]bool{}}
	if err := m.waitBase(ctx); err != nil {
		return err
	}
	log.Info("set up", zap.Duration("took", time.Since(setupStart)), zap.String("proxy", rt.addr))

	mctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	runErr := m.run(mctx)
	if lk, ok := reg.(leaderKiller); ok && runErr == nil {
		m.leaderLoss, runErr = m.leaderLosses(mctx, lk, 3)
	}
	m.report(os.Stdout, runErr)
	if runErr != nil && ctx.Err() != nil {
		return runErr
	}
	return nil
}

// change is one registry write and what followed it.
type change struct {
	register bool
	backend  *demo.Backend
	acked    time.Duration // the registry acknowledged the write
	snapshot time.Duration // the watcher delivered a snapshot reflecting it
	live     time.Duration // the balancer got a live set reflecting it
	routed   time.Duration // the first client connection routed accordingly
	conns    int           // client connections made until then
}

type measurement struct {
	o        options
	rt       *router
	reg      registry
	backends []*demo.Backend

	done    []change
	conns   int
	failed  int
	stale   int             // answers from a backend after its removal had converged
	removed map[string]bool // backend names whose removal has converged
	runTime time.Duration
	// leaderLoss: from a killed leader to the first client routed to a
	// backend registered as soon as the registry took writes again.
	leaderLoss []time.Duration
}

// waitBase waits until the base backends answer through the proxy.
func (m *measurement) waitBase(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	want := map[string]bool{}
	for _, b := range m.backends[:m.o.base] {
		want[b.Name()] = true
	}
	// Probing before the base set is live would only log "no live target".
	for m.rt.live() < m.o.base {
		if ctx.Err() != nil {
			return fmt.Errorf("base backends never all live: %w", ctx.Err())
		}
		time.Sleep(time.Millisecond) // start-up poll interval
	}
	seen := map[string]bool{}
	for len(seen) < len(want) {
		if ctx.Err() != nil {
			return fmt.Errorf("base backends did not all answer through the proxy (saw %v): %w", seen, ctx.Err())
		}
		if name, err := m.probe(ctx); err == nil && want[name] {
			seen[name] = true
		} else {
			time.Sleep(time.Millisecond) // start-up poll interval
		}
	}
	return nil
}

// run makes the registry changes. The backends after the base set take
// turns: each is registered, then deregistered.
func (m *measurement) run(ctx context.Context) error {
	start := time.Now()
	defer func() { m.runTime = time.Since(start) }()
	flappers := m.backends[m.o.base:]
	for i := range m.o.changes {
		if ctx.Err() != nil {
			return fmt.Errorf("stopped after %d of %d changes: %w", i, m.o.changes, ctx.Err())
		}
		b := flappers[(i/2)%len(flappers)]
		c, err := m.change(ctx, i%2 == 0, b)
		if err != nil {
			return fmt.Errorf("change %d (%s %s): %w", i+1, verb(i%2 == 0), b.Name(), err)
		}
		m.done = append(m.done, c)
	}
	return nil
}

func verb(register bool) string {
	if register {
		return "register"
	}
	return "deregister"
}

// change makes one write and drives client connections through the proxy
// until the routing reflects it.
func (m *measurement) change(ctx context.Context, register bool, b *demo.Backend) (change, error) {
	ctx, cancel := context.WithTimeout(ctx, m.o.perChange)
	defer cancel()
	c := change{register: register, backend: b}
	addr := b.Addr()
	if register {
		delete(m.removed, b.Name())
	}

	start := time.Now()
	var err error
	if register {
		err = m.reg.Register(ctx, addr)
	} else {
		err = m.reg.Deregister(ctx, addr)
	}
	if err != nil {
		return c, err
	}
	c.acked = time.Since(start)

	if register {
		for {
			name, err := m.probeCounted(ctx)
			c.conns++
			if err != nil && ctx.Err() != nil {
				return c, fmt.Errorf("never answered through the proxy: %w", ctx.Err())
			}
			if err == nil && name == b.Name() {
				c.routed = time.Since(start)
				break
			}
		}
	} else {
		// Converged at the first answer from another backend on a
		// connection that started once the balancer had dropped b (so no
		// later connection can reach it).
		for {
			dropped := !m.rt.balancerHas(addr)
			name, err := m.probeCounted(ctx)
			c.conns++
			if err != nil && ctx.Err() != nil {
				return c, fmt.Errorf("still routed to it: %w", ctx.Err())
			}
			if err == nil && name != b.Name() && dropped {
				c.routed = time.Since(start)
				break
			}
		}
		m.removed[b.Name()] = true
	}

	has := func(addrs []string) bool { return slices.Contains(addrs, addr) == register }
	if at, ok := m.rt.firstSince(&m.rt.snaps, start, has); ok {
		c.snapshot = at.Sub(start)
	}
	if at, ok := m.rt.firstSince(&m.rt.lives, start, has); ok {
		c.live = at.Sub(start)
	}
	return c, nil
}

// probeCounted is probe with bookkeeping: connections, failures, answers
// from removed backends.
func (m *measurement) probeCounted(ctx context.Context) (string, error) {
	name, err := m.probe(ctx)
	m.conns++
	if err != nil {
		if ctx.Err() == nil {
			m.failed++
		}
		return "", err
	}
	if m.removed[name] {
		m.stale++
	}
	return name, nil
}

// probe makes one client connection through the proxy, sends an HTTP/1.0
// GET / and returns the body's first line: the name of the backend that
// answered.
func (m *measurement) probe(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", m.rt.addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if _, err := io.WriteString(conn, "GET / HTTP/1.0\r\nHost: bench\r\n\r\n"); err != nil {
		return "", err
	}
	resp, err := io.ReadAll(conn)
	if err != nil {
		return "", err
	}
	_, body, ok := bytes.Cut(resp, []byte("\r\n\r\n"))
	if !ok || !bytes.HasPrefix(resp, []byte("HTTP/1.")) {
		return "", fmt.Errorf("not an HTTP response: %q", truncate(resp, 80))
	}
	name, _, _ := strings.Cut(string(body), "\n")
	if name == "" {
		return "", errors.New("empty answer")
	}
	return name, nil
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// report prints the markdown snippet.
func (m *measurement) report(w io.Writer, runErr error) {
	bw := bufio.NewWriter(w)
	defer bw.Flush()
	p := func(format string, a ...any) { fmt.Fprintf(bw, format, a...) }

	var regs, deregs, all []change
	for _, c := range m.done {
		all = append(all, c)
		if c.register {
			regs = append(regs, c)
		} else {
			deregs = append(deregs, c)
		}
	}
	p("### Registry convergence: %s\n\n", m.o.registry)
	p("%d registry changes (%d registrations, %d deregistrations) of %d backends beside %d registered throughout; "+
		"each change waits for the previous one to converge. Registry: %s. "+
		"Health check `%s`; a new instance is live after its first successful probe. "+
		"Time is measured from just before the registry write to the end of the first client connection "+
		"through the proxy routed accordingly (the new backend answered; for a removal, another backend answered "+
		"on a connection opened after the balancer dropped the removed one).\n\n",
		len(all), len(regs), len(deregs), m.o.backends-m.o.base, m.o.base, m.reg.Describe(), m.o.check)

	p("| change | n | p50 | p99 | max |\n|---|---:|---:|---:|---:|\n")
	for _, row := range []struct {
		name string
		cs   []change
	}{{"register", regs}, {"deregister", deregs}, {"all", all}} {
		d := pick(row.cs, func(c change) time.Duration { return c.routed })
		p("| %s | %d | %s | %s | %s |\n", row.name, len(row.cs), ms(pct(d, 50)), ms(pct(d, 99)), ms(pct(d, 100)))
	}

	p("\nWhere the time goes (all changes, from the start of the write):\n\n")
	p("| stage | p50 | p99 | max |\n|---|---:|---:|---:|\n")
	for _, st := range []struct {
		name string
		f    func(change) time.Duration
	}{
		{"registry acknowledged the write", func(c change) time.Duration { return c.acked }},
		{"watcher delivered the snapshot", func(c change) time.Duration { return c.snapshot }},
		{"balancer got the live set", func(c change) time.Duration { return c.live }},
		{"first client connection routed accordingly", func(c change) time.Duration { return c.routed }},
	} {
		d := pick(all, st.f)
		p("| %s | %s | %s | %s |\n", st.name, ms(pct(d, 50)), ms(pct(d, 99)), ms(pct(d, 100)))
	}

	if len(m.leaderLoss) > 0 {
		p("\nLeader loss: the leader killed (SIGKILL), a backend registered as soon as the registry took writes again; " +
			"from the kill to the first client connection routed to it:")
		for _, d := range m.leaderLoss {
			p(" %s", ms(d))
		}
		p(" (the killed member restarted between rounds).\n")
	}
	p("\nClient connections through the proxy: %d, failed: %d; answers from a removed backend after its removal converged: %d. ",
		m.conns, m.failed, m.stale)
	p("Measurement took %s.\n", m.runTime.Round(time.Millisecond))
	if runErr != nil {
		p("\n**Incomplete:** %v.\n", runErr)
	}
	if len(all) > 0 {
		p99 := pct(pick(all, func(c change) time.Duration { return c.routed }), 99)
		verdict := "met"
		if p99 >= m.o.goalP99 {
			verdict = "**not met**"
		}
		p("\nGoal p99 < %s: %s (p99 %s).\n", m.o.goalP99, verdict, ms(p99))
	}
	p("\nMachine: %s, %d CPUs, GOMAXPROCS %d, %s %s/%s.\n",
		cpuModel(), runtime.NumCPU(), runtime.GOMAXPROCS(0), runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

func pick(cs []change, f func(change) time.Duration) []time.Duration {
	out := make([]time.Duration, 0, len(cs))
	for _, c := range cs {
		out = append(out, f(c))
	}
	slices.Sort(out)
	return out
}

// pct is the nearest-rank percentile of sorted durations.
func pct(sorted []time.Duration, q int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := (q*len(sorted) + 99) / 100 // ceil(q/100 * n)
	return sorted[max(rank, 1)-1]
}

func ms(d time.Duration) string {
	return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown CPU"
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}
