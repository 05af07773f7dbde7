package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// proc is one running proxy (or nothing, for "direct").
type proc struct {
	name   string
	addr   string // where clients connect
	cmd    *exec.Cmd
	dir    string
	pidFn  func() []int // processes whose memory counts
	waitCh chan error
}

func (p *proc) stop() {
	if p.cmd == nil {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.waitCh:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.waitCh
	}
	// nginx workers are children of the master; make sure none is left.
	if p.name == "nginx" {
		exec.Command("pkill", "-f", "nginx: .*"+p.dir).Run()
	}
}

// procSum adds up, over the proxy's processes, what field takes from
// each one's /proc/<pid>/<file>.
func (p *proc) procSum(file string, field func(string) int64) int64 {
	var total int64
	for _, pid := range p.pidFn() {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, file)); err == nil {
			total += field(string(b))
		}
	}
	return total
}

// rss is the resident memory of the proxy's processes, in bytes.
func (p *proc) rss() int64 {
	return p.procSum("status", func(s string) int64 {
		for _, line := range strings.Split(s, "\n") {
			if f, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(f), "kB")), 10, 64)
				return kb * 1024
			}
		}
		return 0
	})
}

// cpu is the processor time (user and system) the proxy's processes have
// used, in seconds. The kernel's TCP work for their sockets counts too.
func (p *proc) cpu() float64 {
	ticks := p.procSum("stat", func(s string) int64 {
		// Fields after the command name, which is in parentheses and may
		// hold spaces: state is field 3, utime 14, stime 15.
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) <= 12 {
			return 0
		}
		u, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		return u + st
	})
	return float64(ticks) / 100 // USER_HZ
}

func freePort() int { return freePorts(1)[0] }

// freePorts returns n distinct free ports: each is held until all are
// found, so that the kernel cannot hand the same one out twice (a proxy's
// port and its admin port).
func freePorts(n int) []int {
	out := make([]int, n)
	for i := range out {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			panic(err)
		}
		defer ln.Close()
		out[i] = ln.Addr().(*net.TCPAddr).Port
	}
	return out
}

func startCmd(p *proc, name string, args []string, env []string) error {
	p.cmd = exec.Command(name, args...)
	p.cmd.Env = append(os.Environ(), env...)
	logf, err := os.Create(filepath.Join(p.dir, "proxy.log"))
	if err != nil {
		return err
	}
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if err := p.cmd.Start(); err != nil {
		return fmt.Errorf("%s: %w", p.name, err)
	}
	p.waitCh = make(chan error, 1)
	go func() { p.waitCh <- p.cmd.Wait(); logf.Close() }()
	return nil
}

// startProxy starts kind in front of targets with the given thread count.
// http says whether the targets speak HTTP (readiness is then a GET).
func startProxy(kind string, threads int, targets []string, o *options, http bool) (*proc, error) {
	if kind == "direct" {
		return &proc{name: kind, addr: targets[0], pidFn: func() []int { return nil }}, nil
	}
	ports := freePorts(2) // the proxy's, and rota's admin
	p := newProc(kind, "", ports[0], o)
	var err error
	adminAddr := ""
	switch kind {
	case "rota", "baseline", "rota+log", "rota+hash", "rota+http":
		adminAddr = fmt.Sprintf("127.0.0.1:%d", ports[1])
		if kind != "rota" && kind != "baseline" || len(targets) > 1000 {
			// A feature on (the access log as JSON to a file, a hash
			// listener, http checks), or more targets than one argument
			// holds (Linux: 128 KiB): the same settings as a file.
			var b strings.Builder
			fmt.Fprintf(&b, "admin: {listen: %q}\n", adminAddr)
			if kind == "rota+log" {
				fmt.Fprintf(&b, "access_log: {path: %q, format: json}\n", filepath.Join(p.dir, "access.log"))
			}
			fmt.Fprintf(&b, "listeners:\n  - listen: %q\n    discovery: static\n", p.addr)
			switch kind {
			case "rota+hash":
				b.WriteString("    balance: hash\n    hash_key: client_ip\n    health: {interval: 2s}\n")
			case "rota+http":
				b.WriteString("    health: {interval: 2s, check: http, path: /}\n")
			default:
				b.WriteString("    health: {interval: 2s}\n")
			}
			b.WriteString("    static:\n")
			for _, t := range targets {
				fmt.Fprintf(&b, "      - %s\n", t)
			}
			err = startRota(p, o.binFor(kind), b.String(), threads)
			break
		}
		err = startCmd(p, o.binFor(kind), []string{"serve", "--listen", p.addr, "--backend", strings.Join(targets, ","),
			"--admin", adminAddr, "--log-format", "json", "--log-level", "error", "--health-interval", "2s"},
			[]string{fmt.Sprintf("GOMAXPROCS=%d", threads)})
		p.pidFn = func() []int { return []int{p.cmd.Process.Pid} }
	case "haproxy", "haproxy+log", "haproxy+hash", "haproxy+http":
		var b strings.Builder
		fmt.Fprintf(&b, "global\n  nbthread %d\n  maxconn 7000\n  tune.maxaccept 64\n", threads)
		if kind == "haproxy+log" {
			// option tcplog to stdout, which startCmd sends to a file.
			b.WriteString("  log stdout format raw local0\n")
		}
		b.WriteString("defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n  option splice-auto\n")
		if kind == "haproxy+log" {
			b.WriteString("  log global\n  option tcplog\n")
		}
		fmt.Fprintf(&b, "frontend fe\n  bind %s\n  default_backend be\nbackend be\n", p.addr)
		switch kind {
		case "haproxy+hash":
			b.WriteString("  balance source\n  hash-type consistent\n")
		case "haproxy+http":
			b.WriteString("  balance roundrobin\n  option httpchk GET /\n")
		default:
			b.WriteString("  balance roundrobin\n")
		}
		for i, t := range targets {
			fmt.Fprintf(&b, "  server s%d %s check inter 2s\n", i, t)
		}
		err = startHAProxy(p, b.String())
	case "nginx":
		var b strings.Builder
		b.WriteString(nginxHead(p, threads) + "  upstream be {\n")
		for _, t := range targets {
			fmt.Fprintf(&b, "    server %s;\n", t)
		}
		fmt.Fprintf(&b, "  }\n  server { listen %s reuseport; proxy_pass be; proxy_connect_timeout 2s; proxy_timeout 1h; }\n}\n", p.addr)
		err = startNginx(p, b.String())
	default:
		return nil, fmt.Errorf("unknown proxy %q", kind)
	}
	if err != nil {
		return nil, err
	}
	if err := waitReady(p, adminAddr, http, len(targets)); err != nil {
		log, _ := os.ReadFile(filepath.Join(p.dir, "proxy.log"))
		p.stop()
		return nil, fmt.Errorf("%s not ready: %w\n%s", kind, err, log)
	}
	return p, nil
}

// childPIDs are nginx's workers (the master holds no connections).
func childPIDs(pid int) []int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err != nil {
		return nil
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out
}

func waitReady(p *proc, adminAddr string, isHTTP bool, targets int) error {
	// A target whose first probes failed (1,000 targets probed at once
	// after minutes of load) is re-probed on backoff: allow for it.
	deadline := time.Now().Add(30*time.Second + time.Duration(targets)*60*time.Millisecond)
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for time.Now().Before(deadline) {
		select {
		case err := <-p.waitCh:
			p.waitCh <- err
			return fmt.Errorf("exited: %v", err)
		default:
		}
		ok := false
		switch {
		case adminAddr != "":
			// rota: every target up (probed) before measuring.
			ok = rotaAllUp(hc, adminAddr, targets)
		case isHTTP:
			resp, err := hc.Get("http://" + p.addr + "/")
			ok = err == nil && resp.StatusCode == 200
			if resp != nil {
				resp.Body.Close()
			}
		default:
			c, err := net.DialTimeout("tcp", p.addr, time.Second)
			if err == nil {
				c.Close()
				ok = true
			}
		}
		if ok {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return errors.New("timeout")
}

func rotaAllUp(hc *http.Client, admin string, n int) bool {
	resp, err := hc.Get("http://" + admin + "/api/v1/targets")
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var doc struct {
		Listeners []struct{ Targets []struct{ State string } }
	}
	if json.NewDecoder(resp.Body).Decode(&doc) != nil || len(doc.Listeners) == 0 {
		return false
	}
	up := 0
	for _, t := range doc.Listeners[0].Targets {
		if t.State == "up" {
			up++
		}
	}
	return up == n
}

// newProc is a proc for kind listening on port, with a directory of its
// own in o.tmp; what names the measurement ("sni", "term", "orig"; "" for
// the plain ones).
func newProc(kind, what string, port int, o *options) *proc {
	p := &proc{name: kind, addr: fmt.Sprintf("127.0.0.1:%d", port)}
	dir := fmt.Sprintf("%s-%d", kind, port)
	if what != "" {
		dir = fmt.Sprintf("%s-%s-%d", kind, what, port)
	}
	p.dir = filepath.Join(o.tmp, dir)
	os.MkdirAll(p.dir, 0o755)
	return p
}

// binFor is the rota binary of kind: the baseline's, or rota's.
func (o *options) binFor(kind string) string {
	if kind == "baseline" {
		return o.baseline
	}
	return o.rotaBin
}

// startRota writes config as p's rota.yaml and runs bin serve on it with
// GOMAXPROCS=threads. startHAProxy and startNginx do the same for theirs:
// every measurement starts each proxy alike.
func startRota(p *proc, bin, config string, threads int) error {
	cfg := filepath.Join(p.dir, "rota.yaml")
	os.WriteFile(cfg, []byte(config), 0o644)
	err := startCmd(p, bin, []string{"serve", "--config", cfg, "--log-format", "json", "--log-level", "error"}, []string{fmt.Sprintf("GOMAXPROCS=%d", threads)})
	p.pidFn = func() []int { return []int{p.cmd.Process.Pid} }
	return err
}

func startHAProxy(p *proc, config string) error {
	cfg := filepath.Join(p.dir, "haproxy.cfg")
	os.WriteFile(cfg, []byte(config), 0o644)
	err := startCmd(p, "haproxy", []string{"-db", "-f", cfg}, nil)
	p.pidFn = func() []int { return []int{p.cmd.Process.Pid} }
	return err
}

// startNginx runs nginx on config (nginxHead's, then the stream block's
// body and its closing brace); its workers hold the connections.
func startNginx(p *proc, config string) error {
	cfg := filepath.Join(p.dir, "nginx.conf")
	os.WriteFile(cfg, []byte(config), 0o644)
	err := startCmd(p, "nginx", []string{"-p", p.dir, "-c", cfg, "-e", filepath.Join(p.dir, "error.log")}, nil)
	p.pidFn = func() []int { return childPIDs(p.cmd.Process.Pid) }
	return err
}

// nginxHead is an nginx configuration's start up to an open stream block:
// the stream module, workers, p's own pid and error files, the limits.
func nginxHead(p *proc, workers int) string {
	return "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n" +
		fmt.Sprintf("worker_processes %d;\ndaemon off;\npid %s/nginx.pid;\nerror_log %s/error.log error;\nworker_rlimit_nofile 20000;\n", workers, p.dir, p.dir) +
		"events { worker_connections 18000; multi_accept on; }\nstream {\n"
}
