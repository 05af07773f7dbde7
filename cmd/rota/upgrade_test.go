//go:build linux

package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rota-proxy/rota/internal/testenv"
)

// procExited reports whether process pid has exited (gone, or a zombie
// its new parent has yet to reap).
func procExited(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// pid (comm) S ...: the state follows the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] == 'Z' || s[i+2] == 'X'
}

func readPID(t *testing.T, file string) int {
	b, err := os.ReadFile(file)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// adminGet returns the body of GET path on a rota's admin address.
func adminGet(admin, path string) string {
	resp, err := http.Get("http://" + admin + path)
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// upgradeRun is a rota serving a configuration file across upgrades: the
// process the test started and each one an upgrade started (read from
// pid_file), all killed when the test ends, and their log (they share one
// file), shown then if the test failed.
type upgradeRun struct {
	cfgFile, pidFile, log string
	first                 *exec.Cmd
	exited                chan error // the first process's exit status
	pids                  []int      // every process that took over, oldest first
}

// startUpgradable writes cfg, which names pidFile as its pid_file, to dir
// and runs bin serve on it. The log goes to a file: the processes an
// upgrade starts write there too, and outlive the one started here.
func startUpgradable(t *testing.T, dir, bin, cfg, pidFile string) *upgradeRun {
	t.Helper()
	r := &upgradeRun{cfgFile: filepath.Join(dir, "rota.yaml"), pidFile: pidFile, log: filepath.Join(dir, "rota.log"), exited: make(chan error, 1)}
	if err := os.WriteFile(r.cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	logFile, err := os.Create(r.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close() // the processes have their own copies
	r.first = exec.Command(bin, "serve", "--config", r.cfgFile, "--log-format", "json")
	r.first.Stdout, r.first.Stderr = logFile, logFile
	if err := r.first.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { r.exited <- r.first.Wait() }() // the later ones are reparented
	r.pids = []int{r.first.Process.Pid}
	t.Cleanup(func() {
		for _, pid := range r.pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		if t.Failed() {
			b := r.logText()
			t.Logf("rota's log (the last 8 KiB):\n%s", b[max(0, len(b)-8192):])
		}
	})
	return r
}

// last is the process that took over last (the first, before any).
func (r *upgradeRun) last() int { return r.pids[len(r.pids)-1] }

// takeover waits until another process than the last writes pid_file,
// and returns it.
func (r *upgradeRun) takeover(t *testing.T, what string, within time.Duration) int {
	t.Helper()
	old := r.last()
	var pid int
	testenv.Eventually(t, what, within, func() bool {
		pid = readPID(t, r.pidFile)
		return pid != old && pid != 0
	})
	r.pids = append(r.pids, pid)
	return pid
}

// logText is what every process has logged so far.
func (r *upgradeRun) logText() []byte {
	b, _ := os.ReadFile(r.log)
	return b
}

// targetInfo is what a test reads of a target in /api/v1/targets.
type targetInfo struct {
	Addr, State         string
	ConsecutiveFailures int    `json:"consecutive_failures"`
	Draining            bool   `json:"draining"`
	DrainSource         string `json:"drain_source"`
}

// targetInfos are the targets of a rota's /api/v1/targets, by address.
func targetInfos(admin string) map[string]targetInfo {
	resp, err := http.Get("http://" + admin + "/api/v1/targets")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	var doc struct {
		Listeners []struct{ Targets []targetInfo }
	}
	if json.NewDecoder(resp.Body).Decode(&doc) != nil {
		return nil
	}
	out := map[string]targetInfo{}
	for _, l := range doc.Listeners {
		for _, tg := range l.Targets {
			out[tg.Addr] = tg
		}
	}
	return out
}

// states are the targets' states in a rota's /api/v1/targets, by address.
func states(admin string) map[string]string {
	out := map[string]string{}
	for a, ti := range targetInfos(admin) {
		out[a] = ti.State
	}
	return out
}

// echoServer echoes each connection until its client closes.
func echoServer(t *testing.T) string {
	return testenv.Serve(t, func(c net.Conn) {
		defer c.Close()
		io.Copy(c, c)
	})
}

// 20 binary upgrades in a row, alternating two builds, while clients open
// new connections back to back and 50 long-lived streams move data: no
// client connection is refused or fails, every stream completes on the
// process it started on, each new process serves its parent's targets
// with none left checking, and one process is left at the end.
func TestUpgradeUnderLoad(t *testing.T) {
	dir := t.TempDir()
	// Two builds with different versions, copied in turn to the path the
	// running process upgrades from.
	other := filepath.Join(dir, "rota-b")
	if out, err := exec.Command("go", "build", "-ldflags", "-X main.version=upgrade-b", "-o", other, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	builds := []struct{ bin, version string }{{rotaBin, version}, {other, "upgrade-b"}}
	bin := filepath.Join(dir, "rota")
	install := func(src string) {
		t.Helper()
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		tmp := bin + ".new"
		if err := os.WriteFile(tmp, b, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, bin); err != nil { // as a package manager does
			t.Fatal(err)
		}
	}
	install(builds[0].bin)

	web := []*testenv.Backend{testenv.StartBackend(t, "b1"), testenv.StartBackend(t, "b2"), testenv.StartBackend(t, "b3")}
	echo := echoServer(t)
	dead := testenv.FreeAddr(t) // nothing listens: down, and must stay down
	webAddr, streamAddr, admin := testenv.FreeAddr(t), testenv.FreeAddr(t), testenv.FreeAddr(t)
	pidFile := filepath.Join(dir, "rota.pid")
	cfg := fmt.Sprintf(`admin: {listen: %s}
pid_file: %s
access_log: {path: %s}
listeners:
  - name: web
    listen: %s
    discovery: static
    static: [%s, %s, %s, %s]
    health: {interval: 200ms}
    drain_timeout: 10s
  - name: streams
    listen: %s
    discovery: static
    static: [%s]
    health: {interval: 200ms}
    drain_timeout: 10s
`, admin, pidFile, filepath.Join(dir, "access.log"), webAddr, web[0].Addr, web[1].Addr, web[2].Addr, dead, streamAddr, echo)
	run := startUpgradable(t, dir, bin, cfg, pidFile)
	testenv.Eventually(t, "the first process serving", 20*time.Second, func() bool {
		return readPID(t, pidFile) == run.first.Process.Pid && states(admin)[echo] == "up"
	})
	// b3 drained through the admin API (a local mark): every process
	// after keeps it.
	resp, err := http.Post("http://"+admin+"/api/v1/listeners/web/targets/"+web[2].Addr+"/drain", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("drain: %d", resp.StatusCode)
	}
	b3Hits := web[2].Hits.Load()

	// New connections back to back.
	load := testenv.StartLoad(2, 1<<30, func(int) (string, error) { return testenv.Request(webAddr) })
	// 50 streams at a time, each moving 64 KiB in 1 KiB writes over about
	// half a second, then closing; a new one replaces each.
	var streamsOK, streamsFailed atomic.Int64
	var streamErr atomic.Pointer[error]
	stop := make(chan struct{})
	var streams sync.WaitGroup
	for range 50 {
		streams.Go(func() {
			chunk := bytes.Repeat([]byte("x"), 1024)
			got := make([]byte, 1024)
			for {
				select {
				case <-stop:
					return
				default:
				}
				err := func() error {
					c, err := net.DialTimeout("tcp", streamAddr, 5*time.Second)
					if err != nil {
						return err
					}
					defer c.Close()
					c.SetDeadline(time.Now().Add(20 * time.Second))
					for range 64 {
						if _, err := c.Write(chunk); err != nil {
							return err
						}
						if _, err := io.ReadFull(c, got); err != nil {
							return err
						}
						time.Sleep(8 * time.Millisecond) // a slow stream
					}
					return nil
				}()
				if err != nil {
					streamsFailed.Add(1)
					streamErr.Store(&err)
				} else {
					streamsOK.Add(1)
				}
			}
		})
	}

	const upgrades = 20
	var took []time.Duration
	deadFailures := 0
	for i := range upgrades {
		old := run.last()
		next := builds[(i+1)%2]
		install(next.bin)
		start := time.Now()
		if err := syscall.Kill(old, syscall.SIGUSR2); err != nil {
			t.Fatal(err)
		}
		run.takeover(t, fmt.Sprintf("upgrade %d: the new process takes over", i+1), 30*time.Second)
		took = append(took, time.Since(start))
		// Right after the takeover: the parent's states, none checking;
		// the dead target down.
		st := targetInfos(admin)
		for addr, ti := range st {
			if ti.State == "checking" {
				t.Errorf("upgrade %d: %s is checking right after the takeover", i+1, addr)
			}
		}
		if st[dead].State != "down" || st[web[0].Addr].State != "up" || st[echo].State != "up" {
			t.Errorf("upgrade %d: states right after the takeover: %v", i+1, st)
		}
		if b3 := st[web[2].Addr]; !b3.Draining || b3.DrainSource != "local" {
			t.Errorf("upgrade %d: b3 lost its drain mark: %+v", i+1, b3)
		}
		testenv.Eventually(t, fmt.Sprintf("upgrade %d: version %s answers", i+1, next.version), 10*time.Second, func() bool {
			return strings.Contains(adminGet(admin, "/metrics"), `rota_build_info{version="`+next.version+`"} 1`)
		})
		testenv.Eventually(t, fmt.Sprintf("upgrade %d: the old process %d drains and exits", i+1, old), 20*time.Second, func() bool { return procExited(old) })
		// The dead target's failures go on counting from the parent's: its
		// state was handed over, not probed afresh. (Read once the old
		// process is gone: until it closes its admin API, either process
		// may answer on the socket they share, and the old one probes on
		// while it drains.)
		if f := targetInfos(admin)[dead].ConsecutiveFailures; f < deadFailures {
			t.Errorf("upgrade %d: the dead target's consecutive failures went from %d to %d", i+1, deadFailures, f)
		} else {
			deadFailures = f
		}
	}
	close(stop)
	streams.Wait()
	load.Stop()

	t.Logf("%d upgrades, SIGUSR2 to takeover: %v", upgrades, took)
	t.Logf("%d new connections, %d failed; %d streams completed, %d failed", load.OK.Load(), load.Failed.Load(), streamsOK.Load(), streamsFailed.Load())
	load.AssertNoFailures(t)
	if n := web[2].Hits.Load() - b3Hits; n > 0 {
		t.Errorf("the drained b3 got %d requests across the upgrades", n)
	}
	if n := streamsFailed.Load(); n > 0 {
		t.Errorf("%d streams failed; last: %v", n, *streamErr.Load())
	}
	if streamsOK.Load() == 0 || load.OK.Load() == 0 {
		t.Error("no traffic")
	}
	for _, pid := range run.pids[:len(run.pids)-1] {
		if !procExited(pid) {
			t.Errorf("process %d still runs", pid)
		}
	}
	last := run.last()
	if procExited(last) {
		t.Fatal("no process left")
	}
	syscall.Kill(last, syscall.SIGTERM)
	testenv.Eventually(t, "the last process exits on SIGTERM", 20*time.Second, func() bool { return procExited(last) })
}

// A new process that exits at once (its configuration became invalid
// between the two) fails the upgrade: the old process serves on, says so
// in its log, and a later upgrade works.
func TestUpgradeFailsAndServesOn(t *testing.T) {
	dir := t.TempDir()
	b := testenv.StartBackend(t, "b1")
	webAddr, other, admin := testenv.FreeAddr(t), testenv.FreeAddr(t), testenv.FreeAddr(t)
	pidFile := filepath.Join(dir, "rota.pid")
	// A listener named like the admin socket, with the names' separator
	// in it: the sockets handed over must not mix up.
	cfg := fmt.Sprintf("admin: {listen: %s}\npid_file: %s\nlisteners:\n  - {name: \"admin:web\", listen: %s, discovery: static, static: [%s], health: {interval: 200ms}}\n  - {name: admin, listen: %s, discovery: static, static: [%s], health: {interval: 200ms}}\n", admin, pidFile, webAddr, b.Addr, other, b.Addr)
	run := startUpgradable(t, dir, rotaBin, cfg, pidFile)
	testenv.Eventually(t, "serving", 20*time.Second, func() bool { _, err := testenv.Request(webAddr); return err == nil })
	// The admin API opens after the listeners: asked at once, it may not
	// listen yet (a fresh clone's CI was refused so).
	testenv.Eventually(t, "the admin API answering", 20*time.Second, func() bool {
		resp, err := http.Get("http://" + admin + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return true
	})

	os.WriteFile(run.cfgFile, []byte("listeners: [{listen: nope}]\n"), 0o600)
	resp, err := http.Post("http://"+admin+"/api/v1/upgrade", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("POST /api/v1/upgrade: %d", resp.StatusCode)
	}
	testenv.Eventually(t, "the failure logged", 20*time.Second, func() bool {
		return bytes.Contains(run.logText(), []byte("upgrade failed; serving on"))
	})
	if name, err := testenv.Request(webAddr); err != nil || name != "b1" {
		t.Fatalf("after the failed upgrade: %q, %v", name, err)
	}
	select {
	case err := <-run.exited:
		t.Fatalf("the old process exited: %v", err)
	default:
	}

	os.WriteFile(run.cfgFile, []byte(cfg), 0o600)
	if code, out, errOut := runCLI("upgrade", "--pid-file", pidFile); code != 0 {
		t.Fatalf("rota upgrade: %d %s %s", code, out, errOut)
	}
	run.takeover(t, "the new process takes over", 20*time.Second)
	select {
	case err := <-run.exited:
		if err != nil {
			t.Fatalf("the old process exited with %v after the takeover", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the old process did not exit after the takeover")
	}
	for _, addr := range []string{webAddr, other} {
		if name, err := testenv.Request(addr); err != nil || name != "b1" {
			t.Fatalf("through the new process at %s: %q, %v", addr, name, err)
		}
	}
	if n := bytes.Count(run.logText(), []byte(`"msg":"listening on the inherited socket"`)); n != 2 {
		t.Errorf("the new process took %d listeners' sockets over, want 2", n)
	}
}

// Socket activation as systemd does it: the listening socket passed as
// descriptor 3 with LISTEN_FDS, LISTEN_FDNAMES (the listener's name) and
// LISTEN_PID; rota serves on it (this test keeps its own copy open, so a
// socket of rota's own on that address could not even be bound).
func TestSocketActivation(t *testing.T) {
	b := testenv.StartBackend(t, "b1")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dir := t.TempDir()
	cfgFile := filepath.Join(dir, "rota.yaml")
	cfg := fmt.Sprintf("admin: {listen: ''}\nlisteners:\n  - {name: web, listen: %s, discovery: static, static: [%s], health: {interval: 200ms}}\n", ln.Addr(), b.Addr)
	os.WriteFile(cfgFile, []byte(cfg), 0o600)
	// sh sets LISTEN_PID to its own pid, which exec keeps for rota.
	cmd := exec.Command("/bin/sh", "-c", `LISTEN_PID=$$ exec "$0" serve --config "$1"`, rotaBin, cfgFile)
	cmd.Env = append(os.Environ(), "LISTEN_FDS=1", "LISTEN_FDNAMES=web")
	cmd.ExtraFiles = []*os.File{f}
	var out bytes.Buffer
	cmd.Stderr = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		<-done
		if t.Failed() {
			t.Logf("rota's log:\n%s", out.String())
		}
	}()
	testenv.Eventually(t, "rota serves on the passed socket", 20*time.Second, func() bool {
		name, err := testenv.Request(ln.Addr().String())
		return err == nil && name == "b1"
	})
}

// An upgrade while the registry is down: the new process starts from the
// instances its parent had discovered (handed over), so it gets ready and
// takes over without a registry answer, and every request is served.
func TestUpgradeWhileRegistryDown(t *testing.T) {
	e := testenv.StartEtcd(t)
	cli := e.Client(t)
	b1, b2 := testenv.StartBackend(t, "b1"), testenv.StartBackend(t, "b2")
	for _, b := range []*testenv.Backend{b1, b2} {
		if _, err := cli.Put(t.Context(), "services/web/"+b.Addr, `{"Op":0,"Addr":"`+b.Addr+`"}`); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	webAddr, admin := testenv.FreeAddr(t), testenv.FreeAddr(t)
	pidFile := filepath.Join(dir, "rota.pid")
	cfg := fmt.Sprintf("admin: {listen: %s}\npid_file: %s\nregistries: {etcd: {endpoints: [%s]}}\nlisteners:\n  - {name: web, listen: %s, service: web, discovery: etcd, health: {interval: 200ms}}\n",
		admin, pidFile, e.Endpoints()[0], webAddr)
	run := startUpgradable(t, dir, rotaBin, cfg, pidFile)
	testenv.Eventually(t, "both backends up", 20*time.Second, func() bool {
		st := states(admin)
		return st[b1.Addr] == "up" && st[b2.Addr] == "up"
	})
	load := testenv.StartLoad(2, 1<<30, func(int) (string, error) { return testenv.Request(webAddr) })

	e.Stop()
	if err := run.first.Process.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	run.takeover(t, "the new process takes over with the registry down", 30*time.Second)
	if st := states(admin); st[b1.Addr] != "up" || st[b2.Addr] != "up" {
		t.Errorf("the new process's targets: %v", st)
	}
	testenv.Eventually(t, "the old process exits", 20*time.Second, func() bool { return procExited(run.first.Process.Pid) })
	before := load.OK.Load()
	testenv.Eventually(t, "the new process serves", 10*time.Second, func() bool { return load.OK.Load() > before+100 })
	e.Restart()
	load.Stop()
	load.AssertNoFailures(t)
	if load.Count("b1") == 0 || load.Count("b2") == 0 {
		t.Errorf("answers: b1 %d, b2 %d", load.Count("b1"), load.Count("b2"))
	}
	t.Logf("%d requests, none failed, across an upgrade with the registry down", load.OK.Load())
}

// The embedded etcd moves with an upgrade: the new process reaches the old
// one's server until it is ready, the old one then stops it, and the new
// one starts it on the same data directory. Backends registered by `rota
// register` (leases with keepalive) stay registered; clients lose nothing.
func TestUpgradeMovesEmbeddedEtcd(t *testing.T) {
	dir := t.TempDir()
	etcdAddr, webAddr, admin := testenv.FreeAddr(t), testenv.FreeAddr(t), testenv.FreeAddr(t)
	pidFile := filepath.Join(dir, "rota.pid")
	cfg := fmt.Sprintf(`admin: {listen: %s}
pid_file: %s
registries:
  etcd:
    embedded: {data_dir: %s, client_url: "http://%s"}
listeners:
  - {name: web, listen: %s, service: web, discovery: etcd, health: {interval: 200ms}}
`, admin, pidFile, filepath.Join(dir, "etcd"), etcdAddr, webAddr)
	run := startUpgradable(t, dir, rotaBin, cfg, pidFile)
	testenv.Eventually(t, "rota and its etcd up", 30*time.Second, func() bool { return readPID(t, pidFile) == run.first.Process.Pid })
	b1, b2 := testenv.StartBackend(t, "b1"), testenv.StartBackend(t, "b2")
	for _, b := range []*testenv.Backend{b1, b2} {
		startRota(t, "register", "--etcd", etcdAddr, "--service", "web", "--addr", b.Addr, "--ttl", "5s")
	}
	testenv.Eventually(t, "both registered and up", 20*time.Second, func() bool {
		st := states(admin)
		return st[b1.Addr] == "up" && st[b2.Addr] == "up"
	})
	load := testenv.StartLoad(2, 1<<30, func(int) (string, error) { return testenv.Request(webAddr) })
	for i := range 3 {
		old := run.last()
		syscall.Kill(old, syscall.SIGUSR2)
		run.takeover(t, fmt.Sprintf("upgrade %d takes over", i+1), 30*time.Second)
		testenv.Eventually(t, fmt.Sprintf("upgrade %d: the old process exits", i+1), 20*time.Second, func() bool { return procExited(old) })
		// The new process runs the etcd now: the registrations are in it.
		testenv.Eventually(t, fmt.Sprintf("upgrade %d: etcd answers with both registrations", i+1), 20*time.Second, func() bool {
			c, err := net.DialTimeout("tcp", etcdAddr, time.Second)
			if err != nil {
				return false
			}
			c.Close()
			st := states(admin)
			return st[b1.Addr] == "up" && st[b2.Addr] == "up" && len(st) == 2
		})
	}
	// Still registered after the lease TTL: the keepalives reached the
	// new server.
	time.Sleep(6 * time.Second) // longer than the 5 s TTL: the wait is the test
	load.Stop()
	load.AssertNoFailures(t)
	if st := states(admin); st[b1.Addr] != "up" || st[b2.Addr] != "up" {
		t.Errorf("after the TTL: %v", st)
	}
	if load.Count("b1") == 0 || load.Count("b2") == 0 {
		t.Errorf("answers: b1 %d, b2 %d", load.Count("b1"), load.Count("b2"))
	}
	// Each old process stopped its server and each new one started it.
	log := run.logText()
	if n := bytes.Count(log, []byte(`"msg":"embedded etcd stopped: the new process runs it"`)); n != 3 {
		t.Errorf("%d old processes stopped their embedded etcd, want 3", n)
	}
	if n := bytes.Count(log, []byte(`"msg":"embedded etcd ready"`)); n != 4 {
		t.Errorf("embedded etcd started %d times, want 4 (the first process and three new ones)", n)
	}
	// What a client of the embedded etcd sees: no server from the old
	// one's stop to the new one's ready.
	var stopped time.Time
	for line := range bytes.Lines(log) {
		var e struct {
			Msg string
			TS  time.Time
		}
		if json.Unmarshal(line, &e) != nil {
			continue
		}
		switch e.Msg {
		case "embedded etcd stopped: the new process runs it":
			stopped = e.TS
		case "embedded etcd ready":
			if !stopped.IsZero() {
				t.Logf("embedded etcd unavailable for %v", e.TS.Sub(stopped).Round(time.Millisecond))
				stopped = time.Time{}
			}
		}
	}
	t.Logf("%d requests across 3 upgrades moving the embedded etcd, none failed", load.OK.Load())
}
