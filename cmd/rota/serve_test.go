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
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rota-proxy/rota/internal/testenv"
)

// syncBuffer is a bytes.Buffer safe for the process's writer and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func listenerNames(t *testing.T, admin string) []string {
	resp, err := http.Get("http://" + admin + "/api/v1/targets")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	var doc struct{ Listeners []struct{ Name string } }
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		return nil
	}
	var out []string
	for _, l := range doc.Listeners {
		out = append(out, l.Name)
	}
	return out
}

// rotaProc is a rota process a test runs: what it logs, and its exit.
type rotaProc struct {
	cmd    *exec.Cmd
	stderr syncBuffer
	exited chan struct{} // closed once it has exited; err is then its status
	err    error
}

// startRota runs the rota binary with args until it exits; when the test
// ends it is killed if it has not.
func startRota(t *testing.T, args ...string) *rotaProc {
	t.Helper()
	p := &rotaProc{cmd: exec.Command(rotaBin, args...), exited: make(chan struct{})}
	p.cmd.Stderr = &p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() { p.cmd.Process.Kill(); <-p.exited })
	return p
}

// wait is its exit status once it exits within d; false if it does not.
func (p *rotaProc) wait(d time.Duration) (error, bool) {
	select {
	case <-p.exited:
		return p.err, true
	case <-time.After(d):
		return nil, false
	}
}

// TestServeReloads runs `rota serve --config` and reloads it by SIGHUP and by
// the admin API, including an invalid file that must be rejected while the
// running configuration stays; SIGTERM then exits 0.
func TestServeReloads(t *testing.T) {
	be := testenv.Greeter(t, "hi")
	dir := t.TempDir()
	file := filepath.Join(dir, "rota.yaml")
	admin := testenv.FreeAddr(t)
	listener := func(name string) string {
		return fmt.Sprintf("  - name: %s\n    listen: %s\n    discovery: static\n    static: [%s]\n    drain_timeout: 1s\n", name, testenv.FreeAddr(t), be)
	}
	head := "admin:\n  listen: " + admin + "\nlisteners:\n"
	one := head + listener("a")
	os.WriteFile(file, []byte(one), 0o600)

	rota := startRota(t, "serve", "--config", file, "--log-format", "json")
	cmd, stderr := rota.cmd, &rota.stderr
	testenv.Eventually(t, "listener a", 15*time.Second, func() bool { return strings.Join(listenerNames(t, admin), ",") == "a" })

	os.WriteFile(file, []byte(one+listener("b")), 0o600)
	cmd.Process.Signal(syscall.SIGHUP)
	testenv.Eventually(t, "listener b after SIGHUP", 15*time.Second, func() bool { return strings.Join(listenerNames(t, admin), ",") == "a,b" })

	os.WriteFile(file, []byte(head+"  - name: c\n    listen: nope\n"), 0o600)
	cmd.Process.Signal(syscall.SIGHUP)
	testenv.Eventually(t, "the rejection logged", 15*time.Second, func() bool { return strings.Contains(stderr.String(), "reload rejected") })
	if got := strings.Join(listenerNames(t, admin), ","); got != "a,b" {
		t.Fatalf("listeners after an invalid reload: %s, want a,b kept", got)
	}
	resp, err := http.Post("http://"+admin+"/api/v1/reload", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnprocessableEntity || !strings.Contains(string(body), "listeners[0]") {
		t.Fatalf("POST reload of an invalid file: %d %s", resp.StatusCode, body)
	}

	os.WriteFile(file, []byte(head+listener("c")), 0o600)
	resp, err = http.Post("http://"+admin+"/api/v1/reload", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST reload: %d", resp.StatusCode)
	}
	if got := strings.Join(listenerNames(t, admin), ","); got != "c" {
		t.Fatalf("listeners after POST reload: %s, want c", got)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	err, exited := rota.wait(20 * time.Second)
	switch {
	case !exited:
		t.Fatal("no exit within 20s of SIGTERM")
	case err != nil:
		t.Fatalf("exit after SIGTERM: %v\n%s", err, stderr.String())
	}
}

// A listener removed by a reload drains its open connections for its
// drain_timeout; a shutdown's second signal cuts that drain too, as it
// cuts the current listeners' (systemd and Kubernetes send SIGKILL next).
func TestSecondSignalCutsRemovedListenersDrain(t *testing.T) {
	echo := testenv.Serve(t, func(c net.Conn) { io.Copy(c, c); c.Close() })
	dir := t.TempDir()
	file := filepath.Join(dir, "rota.yaml")
	admin := testenv.FreeAddr(t)
	aAddr := testenv.FreeAddr(t)
	listener := func(name, addr string) string {
		return fmt.Sprintf("  - name: %s\n    listen: %s\n    discovery: static\n    static: [%s]\n    drain_timeout: 40s\n", name, addr, echo)
	}
	head := "admin:\n  listen: " + admin + "\nlisteners:\n"
	os.WriteFile(file, []byte(head+listener("a", aAddr)+listener("b", testenv.FreeAddr(t))), 0o600)

	rota := startRota(t, "serve", "--config", file, "--log-format", "json")
	cmd, stderr := rota.cmd, &rota.stderr
	testenv.Eventually(t, "listeners a and b", 15*time.Second, func() bool { return strings.Join(listenerNames(t, admin), ",") == "a,b" })
	var c net.Conn
	testenv.Eventually(t, "an echo through listener a", 15*time.Second, func() bool {
		var err error
		if c, err = net.Dial("tcp", aAddr); err != nil {
			return false
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "x")
		b := make([]byte, 1)
		if _, err := io.ReadFull(c, b); err != nil {
			c.Close()
			return false
		}
		return true
	})
	defer c.Close()

	os.WriteFile(file, []byte(head+listener("b", testenv.FreeAddr(t))), 0o600)
	cmd.Process.Signal(syscall.SIGHUP)
	testenv.Eventually(t, "listener a removed", 15*time.Second, func() bool { return strings.Join(listenerNames(t, admin), ",") == "b" })
	testenv.Eventually(t, "a draining", 15*time.Second, func() bool { return strings.Contains(stderr.String(), "listener removed; draining") })

	began := time.Now()
	cmd.Process.Signal(syscall.SIGTERM)
	// (Two signals sent at once may reach the process as one.)
	testenv.Eventually(t, "the first signal taken", 15*time.Second, func() bool { return strings.Contains(stderr.String(), "shutting down") })
	cmd.Process.Signal(syscall.SIGTERM)
	err, exited := rota.wait(2 * time.Second)
	switch {
	case !exited:
		t.Fatalf("still running 2s after two SIGTERMs (a removed listener drains for 40s)\n%s", stderr.String())
	case err != nil:
		t.Fatalf("exit after two SIGTERMs: %v\n%s", err, stderr.String())
	case time.Since(began) > 2*time.Second:
		t.Fatalf("exit %v after two SIGTERMs, want within 2s", time.Since(began))
	}
	// The held connection was cut, not left to finish.
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("the removed listener's connection still open after the exit")
	}
}
