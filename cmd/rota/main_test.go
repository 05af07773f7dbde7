package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rota-proxy/rota/internal/testenv"
)

// rotaBin is the rota binary built once for the tests that run it as users do.
var rotaBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "rota-cmd-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	rotaBin = filepath.Join(dir, "rota")
	build := []string{"build", "-o", rotaBin}
	flag.Parse()
	if mode := testing.CoverMode(); mode != "" {
		// go test -cover: the binary the tests run as users do counts too.
		// It writes its counters where this test binary does; the figure
		// go test prints is this process's alone, and make cover merges
		// both (go tool covdata percent).
		build = append(build, "-cover", "-covermode="+mode)
		if f := flag.Lookup("test.gocoverdir"); f != nil && f.Value.String() != "" {
			os.Setenv("GOCOVERDIR", f.Value.String())
		}
	}
	out, err := exec.Command("go", append(build, ".")...).CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build rota: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func runCLI(args ...string) (code int, stdout, stderr string) {
	var o, e bytes.Buffer
	code = run(args, &o, &e)
	return code, o.String(), e.String()
}

func TestCheckValidAndInvalid(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte("listeners:\n  - listen: 127.0.0.1:8080\n    discovery: static\n    static: [127.0.0.1:9001]\n"), 0o600)
	code, out, errOut := runCLI("check", "--config", good)
	if code != 0 || !strings.Contains(out, "ok (1 listener)") {
		t.Fatalf("valid config: exit %d, stdout %q, stderr %q", code, out, errOut)
	}

	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("listeners:\n  - listen: 127.0.0.1:8080\n    discovery: static\n    static: [127.0.0.1:9001]\n    health:\n      rise: 0\n      intervl: 2s\n"), 0o600)
	code, _, errOut = runCLI("check", "--config", bad)
	if code != 1 {
		t.Fatalf("invalid config: exit %d, want 1", code)
	}
	for _, want := range []string{"bad.yaml:6:", "listeners[0].health.rise", "bad.yaml:7:", "intervl"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("error output lacks %q:\n%s", want, errOut)
		}
	}

	code, _, errOut = runCLI("check", "--config", filepath.Join(dir, "missing.yaml"))
	if code != 1 || !strings.Contains(errOut, "missing.yaml") {
		t.Fatalf("missing file: exit %d, %q", code, errOut)
	}
}

// rota check warns when the admin API's token would cross a network in
// cleartext, and not when it listens on loopback or over TLS.
func TestCheckWarnsOfACleartextAdminToken(t *testing.T) {
	dir := t.TempDir()
	write := func(admin string) string {
		f := filepath.Join(dir, "rota.yaml")
		os.WriteFile(f, []byte(admin+"\nlisteners:\n  - {listen: 127.0.0.1:8080, discovery: static, static: [127.0.0.1:9001]}\n"), 0o600)
		return f
	}
	code, _, errOut := runCLI("check", "--config", write("admin: {listen: 0.0.0.0:9090, token_file: /run/secrets/token}"))
	if code != 0 || !strings.Contains(errOut, "warning: admin.listen \"0.0.0.0:9090\" is not a loopback address and admin.tls is not set") {
		t.Fatalf("exit %d, stderr %q: want a warning", code, errOut)
	}
	for _, admin := range []string{
		"admin: {listen: 127.0.0.1:9090, token_file: /run/secrets/token}",
		"admin: {listen: 0.0.0.0:9090, token_file: /run/secrets/token, tls: {cert_file: a.pem, key_file: a-key.pem}}",
	} {
		if code, _, errOut := runCLI("check", "--config", write(admin)); code != 0 || errOut != "" {
			t.Fatalf("%s: exit %d, stderr %q", admin, code, errOut)
		}
	}
}

func TestQuickFormErrors(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"serve"}, "nothing to proxy to"},
		{[]string{"serve", "--backend", "a:1", "--etcd", "127.0.0.1:2379", "--service", "x"}, "alternatives"},
		{[]string{"serve", "--etcd", "127.0.0.1:2379"}, "--etcd needs --service"},
		{[]string{"serve", "--backend", "not-an-address"}, "--backend"},
		{[]string{"serve", "--backend", "127.0.0.1:1", "--rise", "0"}, "--rise"},
		{[]string{"serve", "--config", "x.yaml", "--backend", "127.0.0.1:1"}, "quick form"},
		{[]string{"serve", "--log-format", "xml", "--backend", "127.0.0.1:1"}, "--log-format"},
		{[]string{"register", "--etcd", "127.0.0.1:2379", "--service", "web"}, "--addr is required"},
		{[]string{"nope"}, "unknown command"},
		// A public admin address without a token: refused before anything
		// listens, naming the flag that fixes it.
		{[]string{"serve", "--backend", "127.0.0.1:1", "--admin", "0.0.0.0:0"}, "--admin-token-file: required when --admin"},
	}
	for _, c := range cases {
		code, _, errOut := runCLI(c.args...)
		if code != 2 || !strings.Contains(errOut, c.want) {
			t.Errorf("rota %s: exit %d, stderr %q; want exit 2 mentioning %q", strings.Join(c.args, " "), code, errOut, c.want)
		}
	}
}

func TestVersion(t *testing.T) {
	code, out, _ := runCLI("version")
	if code != 0 || !strings.HasPrefix(out, "rota ") {
		t.Fatalf("version: %d %q", code, out)
	}
	code, out, errOut := runCLI("version", "--help")
	if code != 0 || out != "" || !strings.Contains(errOut, "Usage: rota version") {
		t.Fatalf("version --help: exit %d, stdout %q, stderr %q; want the usage", code, out, errOut)
	}
}

// rota --help names every command run accepts.
func TestHelpListsEveryCommand(t *testing.T) {
	code, out, _ := runCLI("--help")
	if code != 0 {
		t.Fatalf("--help: exit %d", code)
	}
	for _, cmd := range []string{"serve", "register", "drain", "undrain", "demo", "demo-backend", "check", "healthcheck", "version"} {
		if !strings.Contains(out, "rota "+cmd) {
			t.Errorf("rota --help does not mention %q:\n%s", cmd, out)
		}
		if code, _, _ := runCLI(cmd, "--help"); code != 0 {
			t.Errorf("rota %s --help: exit %d, want 0", cmd, code)
		}
	}
}

// Ctrl-C on `make demo` (SIGINT to the whole foreground process group, as
// a terminal sends it) ends make with exit 0, not make's "Error 1".
func TestMakeDemoCtrlC(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("no make")
	}
	flags := fmt.Sprintf("DEMO_FLAGS=--listen %s --admin %s --etcd-url http://%s",
		testenv.FreeAddr(t), testenv.FreeAddr(t), testenv.FreeAddr(t))
	cmd := exec.Command("make", "-s", "-C", "../..", "demo", flags)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr syncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	banner := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(out)
		seen := false
		for sc.Scan() {
			if !seen && strings.Contains(sc.Text(), "-> backend-") {
				seen = true
				close(banner)
			}
		}
		done <- cmd.Wait()
	}()
	select {
	case <-banner:
	case err := <-done:
		t.Fatalf("make demo ended before its banner: %v\n%s", err, stderr.String())
	case <-time.After(2 * time.Minute):
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		t.Fatalf("no demo banner within 2 minutes\n%s", stderr.String())
	}
	syscall.Kill(-cmd.Process.Pid, syscall.SIGINT)
	select {
	case err := <-done:
		// make passes the interrupt on (it ends by SIGINT itself, as a
		// shell expects), but with no error of its own: the demo stopped
		// cleanly and exited 0.
		var ee *exec.ExitError
		interrupted := errors.As(err, &ee) && ee.Sys().(syscall.WaitStatus).Signal() == syscall.SIGINT
		if err != nil && !interrupted || strings.Contains(stderr.String(), "Error") || !strings.Contains(stderr.String(), "stopped") {
			t.Fatalf("make demo after Ctrl-C: %v\n%s", err, stderr.String())
		}
	case <-time.After(30 * time.Second):
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		t.Fatalf("make demo still running 30s after Ctrl-C\n%s", stderr.String())
	}
}

// TestDemoEndToEnd runs `rota demo` as a user does (the README's first
// command) and checks that three distinct backends answer through the proxy,
// then that Ctrl-C stops everything with exit status 0.
func TestDemoEndToEnd(t *testing.T) {
	proxyAddr, adminAddr, etcdAddr := testenv.FreeAddr(t), testenv.FreeAddr(t), testenv.FreeAddr(t)
	cmd := exec.Command(rotaBin, "demo", "--listen", proxyAddr, "--admin", adminAddr, "--etcd-url", "http://"+etcdAddr)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()

	// The banner shows the first requests through the proxy.
	answers := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(stdout)
		re := regexp.MustCompile(`-> (\S+)$`)
		for sc.Scan() {
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				answers <- m[1]
			}
		}
		close(answers)
		exited <- cmd.Wait()
	}()
	seen := map[string]int{}
	timeout := time.After(60 * time.Second)
	for len(seen) < 3 {
		select {
		case a, ok := <-answers:
			if !ok {
				t.Fatalf("demo exited early; stderr:\n%s", stderr.String())
			}
			seen[a]++
		case <-timeout:
			t.Fatalf("no round-robin banner within 60s; saw %v; stderr:\n%s", seen, stderr.String())
		}
	}
	for name := range seen {
		if !strings.HasPrefix(name, "backend-") {
			t.Fatalf("banner answer %q is not a demo backend", name)
		}
	}

	// And a user's own requests spread over the three.
	url := "http://" + proxyAddr + "/"
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	mine := map[string]int{}
	for range 6 {
		resp, err := hc.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		mine[strings.TrimSpace(string(b))]++
	}
	if len(mine) != 3 {
		t.Fatalf("6 requests reached %v, want 3 distinct backends twice each", mine)
	}
	resp, err := hc.Get("http://" + adminAddr + "/api/v1/targets")
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Listeners []struct {
			Targets []struct{ State string }
		}
	}
	json.NewDecoder(resp.Body).Decode(&doc)
	resp.Body.Close()
	if len(doc.Listeners) != 1 || len(doc.Listeners[0].Targets) != 3 {
		t.Fatalf("admin API shows %+v, want one listener with 3 targets", doc)
	}

	cmd.Process.Signal(syscall.SIGINT)
	select {
	case err := <-exited:
		exited <- err // for the deferred Kill/wait
		if err != nil {
			t.Fatalf("demo exit after Ctrl-C: %v; stderr:\n%s", err, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("demo did not stop within 30s of Ctrl-C; stderr:\n%s", stderr.String())
	}
}
