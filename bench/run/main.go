// Command run benchmarks rota side by side with HAProxy and nginx (stream)
// and a direct connection, against the same backends and load generators,
// in one run on one machine. See bench/README.md.
//
//	go run ./bench/run            # full run (~10 min)
//	go run ./bench/run -quick     # about six minutes
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// proxyKinds are the proxies measured; a baseline rota goes after rota.
var proxyKinds = []string{"direct", "rota", "haproxy", "nginx"}

type options struct {
	quick   bool
	reps    int
	dur     time.Duration
	idle    int
	threads []int
	conc    []int
	targets []int
	// idleWindow is how long an idle proxy's CPU is measured (health
	// checking cost).
	idleWindow time.Duration
	rotaBin    string
	baseline   string   // an earlier rota binary, measured beside rota
	only       string   // "targets": only the health-checking phase
	proxies    []string // what is measured, in order
	out        string
	tmp        string
	backends   *backendSet
}

func main() {
	if len(os.Args) > 2 && os.Args[1] == "-backend-mode" {
		n, _ := strconv.Atoi(os.Args[2])
		host, kind := "127.0.0.1", "http"
		if len(os.Args) > 3 {
			host = os.Args[3] // bench/probe-cpu: an address in another namespace
		}
		if len(os.Args) > 4 {
			kind = os.Args[4] // bench/probe-cpu: http, https or grpc
		}
		if err := runBackends(n, host, kind); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) > 3 && os.Args[1] == "-probe-floor-mode" {
		mode := ""
		if len(os.Args) > 4 {
			mode = os.Args[4] // bench/probe-cpu's FLOOR
		}
		if err := runProbeFloor(os.Args[2], os.Args[3], mode); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "-syscall-cost" {
		if err := runSyscallCost(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "-tls-backend-mode" {
		if err := runTLSBackends(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) > 3 && os.Args[1] == "-plain-bulk-mode" {
		secs, _ := strconv.Atoi(os.Args[3])
		if err := runPlainBulk(os.Args[2], secs); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) > 3 && os.Args[1] == "-tls-bulk-mode" {
		secs, _ := strconv.Atoi(os.Args[3])
		if err := runTLSBulk(os.Args[2], secs); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "-ok-backend-mode" {
		if err := runOKBackends(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) > 4 && os.Args[1] == "-tls-client-mode" {
		secs, _ := strconv.Atoi(os.Args[3])
		conns, _ := strconv.Atoi(os.Args[4])
		mode := ""
		if len(os.Args) > 5 {
			mode = os.Args[5]
		}
		if err := runTLSClient(os.Args[2], secs, conns, mode); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	var o options
	flag.BoolVar(&o.quick, "quick", false, "short run (about six minutes)")
	flag.StringVar(&o.rotaBin, "rota", "bin/rota", "rota binary")
	flag.StringVar(&o.baseline, "baseline", "", "an earlier rota binary to measure beside rota (before/after a change)")
	flag.StringVar(&o.out, "out", "bench/results", "directory for the report and chart")
	flag.StringVar(&o.only, "only", "", `"targets": run only the health-checking phase (new connections and probe CPU at 3 to 10,000 targets); "accesslog": only the access log's cost; "ab": rota against -baseline only, many interleaved repetitions (a data-path change's before/after); "conn": keep-alive and new connections at 1 and 2 threads, rota against HAProxy (and -baseline) and direct, 6 interleaved repetitions with every sample; "features": the access log, a hash listener, 1,000 http-checked targets, a routed TLS-passthrough listener and TLS termination, each beside its plain case, rota and HAProxy; "tls": TLS passthrough by SNI only; "term": TLS termination only; "orig": TLS origination only`)
	flag.Parse()
	o.proxies = proxyKinds
	if o.baseline != "" {
		o.proxies = []string{"direct", "rota", "baseline", "haproxy", "nginx"}
	}
	raiseNoFile()
	if o.quick {
		o.reps, o.dur, o.idle, o.idleWindow = 1, 2*time.Second, 2000, 4*time.Second
		o.threads, o.conc, o.targets = []int{1, 2}, []int{1, 1000}, []int{3, 1000, 10000}
	} else {
		o.reps, o.dur, o.idle, o.idleWindow = 3, 4*time.Second, 5000, 10*time.Second
		o.threads, o.conc, o.targets = []int{1, 2}, []int{1, 10, 100, 1000, 4000}, []int{3, 100, 1000, 10000}
	}
	if err := run(&o); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// results holds every sample: key -> values over repetitions.
type results map[string][]float64

func (r results) add(key string, v float64) { r[key] = append(r[key], v) }

func (r results) median(key string) (float64, bool) {
	v := slices.Clone(r[key])
	if len(v) == 0 {
		return 0, false
	}
	slices.Sort(v)
	if n := len(v); n%2 == 0 {
		return (v[n/2-1] + v[n/2]) / 2, true // an even count: the middle two's mean
	}
	return v[len(v)/2], true
}

func key(parts ...any) string {
	s := make([]string, len(parts))
	for i, p := range parts {
		s[i] = fmt.Sprint(p)
	}
	return strings.Join(s, "/")
}

func run(o *options) error {
	start := time.Now()
	tmp, err := os.MkdirTemp("", "rota-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	o.tmp = tmp
	maxTargets := slices.Max(o.targets)
	bs, err := startBackends(maxTargets)
	if err != nil {
		return err
	}
	defer bs.stop()
	o.backends = bs
	iperfPort := freePort()
	iperf := exec.Command("iperf3", "-s", "-p", strconv.Itoa(iperfPort))
	if err := iperf.Start(); err != nil {
		return fmt.Errorf("iperf3: %w", err)
	}
	defer func() { iperf.Process.Kill(); iperf.Wait() }()
	iperfAddr := fmt.Sprintf("127.0.0.1:%d", iperfPort)
	waitDial(iperfAddr)

	res := results{}
	three := bs.addrs[:3]
	if o.only != "" {
		o.threads = nil // a part of the run only
	}
	if o.only == "targets" {
		o.conc = nil
	}
	for _, th := range o.threads {
		for rep := range o.reps {
			// Interleave: each repetition starts with a different proxy.
			order := rotated(o.proxies, rep)
			for _, px := range order {
				logf("pass %d thread(s), rep %d: %s", th, rep+1, px)
				p, err := startProxy(px, th, three, o, true)
				if err != nil {
					return err
				}
				cpu0 := p.cpu()
				if m, err := wrk(p.addr, 64, o.dur, false); err == nil {
					res.add(key(th, "ka_rps", px), m.rps)
					res.add(key(th, "ka_p50", px), m.p50)
					res.add(key(th, "ka_p99", px), m.p99)
					if px != "direct" && m.n > 0 {
						res.add(key(th, "ka_cpu", px), (p.cpu()-cpu0)*1e6/m.n)
					}
				} else {
					logf("  keep-alive: %v", err)
				}
				cpu0 = p.cpu()
				if m, err := wrk(p.addr, 64, o.dur, true); err == nil {
					res.add(key(th, "close_rps", px), m.rps)
					res.add(key(th, "close_p99", px), m.p99)
					if px != "direct" && m.n > 0 {
						res.add(key(th, "close_cpu", px), (p.cpu()-cpu0)*1e6/m.n)
					}
				} else {
					logf("  close: %v", err)
				}
				p.stop()
				if px != "direct" && rep == 0 {
					// A fresh process: memory pooled by the load runs
					// would otherwise absorb the idle connections' growth.
					ip, err := startProxy(px, th, three, o, true)
					if err != nil {
						return err
					}
					if v, err := idleMemory(ip, o.idle); err == nil {
						res.add(key(th, "idle_kib", px), v)
					} else {
						logf("  idle: %v", err)
					}
					ip.stop()
				}

				bp, err := startProxy(px, th, []string{iperfAddr}, o, false)
				if err != nil {
					return err
				}
				if v, err := iperfBulk(bp.addr, o.dur); err == nil {
					res.add(key(th, "bulk_gbps", px), v)
				} else {
					logf("  bulk: %v", err)
				}
				bp.stop()
			}
		}
	}
	if o.only == "" || o.only == "accesslog" {
		benchAccessLog(o, res, three)
	}
	if o.only == "ab" {
		if o.baseline == "" {
			return errors.New("-only ab needs -baseline")
		}
		benchAB(o, res, three)
	}
	if o.only == "" || o.only == "conn" {
		benchConn(o, res, three)
	}
	if o.only == "" || o.only == "features" {
		benchFeatures(o, res)
	}
	if o.only == "accesslog" || o.only == "ab" || o.only == "conn" || o.only == "features" || o.only == "tls" || o.only == "term" || o.only == "orig" {
		o.conc, o.targets = nil, nil
	}
	if o.only == "" || o.only == "tls" {
		if err := benchTLS(o, res); err != nil {
			logf("TLS passthrough: %v", err) // one missing table, not a lost run
		}
	}
	if o.only == "" || o.only == "term" {
		if err := benchTerm(o, res); err != nil {
			logf("TLS termination: %v", err)
		}
	}
	if o.only == "" || o.only == "orig" {
		if err := benchOrig(o, res); err != nil {
			logf("TLS origination: %v", err)
		}
	}
	// Scaling, one thread each: concurrency, then number of targets.
	for _, c := range o.conc {
		for _, px := range o.proxies {
			logf("concurrency %d: %s", c, px)
			p, err := startProxy(px, 1, three, o, true)
			if err != nil {
				logf("  %v", err) // one missing cell, not a lost run
				continue
			}
			if m, err := wrk(p.addr, c, o.dur, false); err == nil {
				res.add(key("conc", c, px), m.rps)
			} else {
				logf("  %v", err)
			}
			p.stop()
		}
	}
	for _, n := range o.targets {
		if n >= 1000 {
			// The same probes with nothing but the system calls: what
			// the kernel charges whoever sends them.
			if v, err := probeFloor(bs.addrs[:n], o.idleWindow); err == nil {
				res.add(key("healthcpu", n, "floor"), v)
			} else {
				logf("  probe floor: %v", err)
			}
		}
		for _, px := range o.proxies[1:] {
			logf("targets %d: %s", n, px)
			p, err := startProxy(px, 1, bs.addrs[:n], o, true)
			if err != nil {
				logf("  %v", err) // one missing cell, not a lost run
				continue
			}
			if n >= 1000 && px != "nginx" {
				// What probing n targets every 2 s costs an idle proxy
				// (nginx's open-source edition does not probe).
				time.Sleep(2 * time.Second) // past the first round of probes
				c0, t0 := p.cpu(), time.Now()
				time.Sleep(o.idleWindow)
				res.add(key("healthcpu", n, px), 100*(p.cpu()-c0)/time.Since(t0).Seconds())
			}
			if m, err := wrk(p.addr, 64, o.dur, true); err == nil {
				res.add(key("targets", n, px), m.rps)
			} else {
				logf("  %v", err)
			}
			p.stop()
		}
	}
	report := renderReport(o, res, time.Since(start))
	fmt.Print(report)
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	date := time.Now().Format("2006-01-02")
	if o.quick {
		date += "-quick"
	}
	if o.only != "" {
		date += "-" + o.only // a part, beside the day's full run
	}
	// A second run of the day gets a name of its own (-2, -3, ...): a
	// result in the repository is never overwritten.
	for n, base := 2, date; ; n++ {
		if _, err := os.Stat(filepath.Join(o.out, date+".md")); errors.Is(err, fs.ErrNotExist) {
			break
		}
		date = fmt.Sprintf("%s-%d", base, n)
	}
	md := filepath.Join(o.out, date+".md")
	png := filepath.Join(o.out, date+".png")
	report = strings.Replace(report, "<!--chart-->", fmt.Sprintf("![ratios](%s)\n", filepath.Base(png)), 1)
	if err := os.WriteFile(md, []byte(report), 0o644); err != nil {
		return err
	}
	raw, _ := json.MarshalIndent(res, "", " ")
	os.WriteFile(filepath.Join(o.out, date+".json"), raw, 0o644)
	if err := writeChart(png, o, res); err != nil {
		return err
	}
	logf("wrote %s and %s", md, png)
	return nil
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// backendSet is the child process serving the HTTP backends.
type backendSet struct {
	cmd   *exec.Cmd
	addrs []string
}

func startBackends(n int) (*backendSet, error) {
	return startBackendChild("-backend-mode", strconv.Itoa(n))
}

// startBackendChild runs this program again in a backend mode (args) and
// collects the ports it prints until "ready".
func startBackendChild(args ...string) (*backendSet, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, args...)
	// The backends get their own CPU budget like any upstream service.
	cmd.Env = append(os.Environ(), "GOMAXPROCS=2")
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	bs := &backendSet{cmd: cmd}
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if sc.Text() == "ready" {
			return bs, nil
		}
		bs.addrs = append(bs.addrs, "127.0.0.1:"+sc.Text())
	}
	cmd.Process.Kill()
	return nil, fmt.Errorf("backends (%s) exited early", args[0])
}

func (b *backendSet) stop() {
	b.cmd.Process.Kill()
	b.cmd.Wait()
}

func waitDial(addr string) {
	for range 500 {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type wrkResult struct{ rps, p50, p99, n float64 } // latencies in milliseconds; n requests

var (
	reRPS = regexp.MustCompile(`Requests/sec:\s+([\d.]+)`)
	reN   = regexp.MustCompile(`(\d+) requests in`)
	reLat = regexp.MustCompile(`(?m)^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$`)
)

// wrk runs one load generator thread (the other core is the proxy's).
func wrk(addr string, conns int, d time.Duration, closeEach bool) (wrkResult, error) {
	args := []string{"-t1", fmt.Sprintf("-c%d", conns), fmt.Sprintf("-d%ds", int(d.Seconds())), "--latency", "--timeout", "5s"}
	if closeEach {
		args = append(args, "-H", "Connection: close")
	}
	args = append(args, "http://"+addr+"/")
	out, err := exec.Command("wrk", args...).CombinedOutput()
	if err != nil {
		return wrkResult{}, fmt.Errorf("wrk: %v: %s", err, out)
	}
	var r wrkResult
	m := reRPS.FindSubmatch(out)
	if m == nil {
		return r, fmt.Errorf("wrk: no Requests/sec in %s", out)
	}
	r.rps, _ = strconv.ParseFloat(string(m[1]), 64)
	if m := reN.FindSubmatch(out); m != nil {
		r.n, _ = strconv.ParseFloat(string(m[1]), 64)
	}
	for _, l := range reLat.FindAllSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(string(l[2]), 64)
		switch string(l[3]) {
		case "us":
			v /= 1000
		case "s":
			v *= 1000
		}
		if string(l[1]) == "50" {
			r.p50 = v
		} else {
			r.p99 = v
		}
	}
	if strings.Contains(string(out), "Socket errors") || strings.Contains(string(out), "Non-2xx") {
		logf("  wrk reported errors: %s", strings.TrimSpace(string(out)))
	}
	return r, nil
}

func iperfBulk(addr string, d time.Duration) (float64, error) {
	host, port, _ := net.SplitHostPort(addr)
	out, err := exec.Command("iperf3", "-c", host, "-p", port, "-t", strconv.Itoa(int(d.Seconds())), "-J").Output()
	if err != nil {
		return 0, fmt.Errorf("iperf3: %v: %s", err, out)
	}
	var doc struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return 0, err
	}
	return doc.End.SumReceived.BitsPerSecond / 1e9, nil
}

// idleMemory opens n idle connections through p and returns the growth of
// the proxy's resident memory per connection, in KiB.
func idleMemory(p *proc, n int) (float64, error) {
	before := p.rss()
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range n {
		c, err := net.DialTimeout("tcp", p.addr, 5*time.Second)
		if err != nil {
			return 0, fmt.Errorf("after %d connections: %w", len(conns), err)
		}
		conns = append(conns, c)
	}
	// Let the proxy accept and connect upstream for all of them, and the
	// memory settle: take the highest of a few readings a little apart.
	var after int64
	for range 10 {
		time.Sleep(150 * time.Millisecond)
		after = max(after, p.rss())
	}
	return float64(after-before) / float64(n) / 1024, nil
}

// benchAccessLog measures what the access log costs: rota and HAProxy,
// each with its connection log off and on (rota: JSON to a file; HAProxy:
// option tcplog to a file), new connection per request, 1 and 2 threads,
// interleaved.
func benchAccessLog(o *options, res results, targets []string) {
	kinds := []string{"rota", "rota+log", "haproxy", "haproxy+log"}
	// The figure is a 3 % one: more samples.
	interleaved(o, "access log", []int{1, 2}, o.reps+2, kinds, targets, func(th int, px string, p *proc) {
		wrkInto(res, p, px, o.dur, true, "alog", th)
	})
}

// benchAB measures rota against the baseline binary alone, one thread,
// interleaved many times: the before/after of a change to the data path,
// with the spread, since a two-core machine's noise is larger than most
// such changes.
func benchAB(o *options, res results, targets []string) {
	interleaved(o, "a/b", []int{1}, 8, []string{"rota", "baseline"}, targets, func(_ int, px string, p *proc) {
		for _, close := range []bool{false, true} {
			wrkInto(res, p, px, o.dur, close, "ab", map[bool]string{false: "ka", true: "close"}[close])
		}
	})
}
