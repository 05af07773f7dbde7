package supervisor_test

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/server"
	"github.com/rota-proxy/rota/supervisor"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// A process's life without a process: the configuration file is re-read
// on SIGHUP (an invalid one is rejected and the running one stays), and
// SIGTERM drains and ends Run.
func TestReloadsThenShutsDown(t *testing.T) {
	be := testenv.StartBackend(t, "b")
	file := filepath.Join(t.TempDir(), "rota.yaml")
	listener := func(name string) string {
		return fmt.Sprintf("  - {name: %s, listen: \"127.0.0.1:0\", discovery: static, static: [%s], drain_timeout: 1s}\n", name, be.Addr)
	}
	head := "admin: {listen: \"\"}\nlisteners:\n"
	os.WriteFile(file, []byte(head+listener("a")), 0o600)
	cfg, err := config.Load(file)
	if err != nil {
		t.Fatal(err)
	}
	sigs := make(chan os.Signal, 2)
	ready := make(chan *server.Server, 1)
	done := make(chan error, 1)
	go func() {
		done <- supervisor.Run(supervisor.Options{Config: cfg, File: file, Signals: sigs,
			Ready: func(s *server.Server) error { ready <- s; return nil }})
	}()
	srv := <-ready
	names := func() (out []string) {
		for _, l := range srv.Status() {
			out = append(out, l.Name)
		}
		return out
	}

	os.WriteFile(file, []byte(head+listener("a")+listener("b")), 0o600)
	sigs <- syscall.SIGHUP
	// Listed, then routing: its target is up in the checker and in the
	// published picker (a request between the two finds no live target).
	testenv.Eventually(t, "listener b after SIGHUP", 5*time.Second, func() bool { return len(names()) == 2 && srv.Routed("b") == 1 })
	if got, err := testenv.Request(srv.Addr("b").String()); err != nil || got != "b" {
		t.Fatalf("through the reloaded listener b: %q, %v", got, err)
	}

	addrA := srv.Addr("a").String()
	os.WriteFile(file, []byte(head+"  - {name: c, listen: nope}\n"), 0o600)
	sigs <- syscall.SIGHUP
	sigs <- syscall.SIGTERM
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run after SIGTERM: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run still running 10s after SIGTERM")
	}
	if got := names(); len(got) != 2 {
		t.Fatalf("the invalid file was applied: listeners %v", got)
	}
	if c, err := net.DialTimeout("tcp", addrA, time.Second); err == nil {
		c.Close()
		t.Fatal("listener a still accepts after Run returned")
	}
}

// A Ready hook that fails stops what started, and Run says why.
func TestReadyFailureStopsRun(t *testing.T) {
	cfg := config.Default()
	cfg.Admin.Listen = "127.0.0.1:0"
	l := config.DefaultListener()
	l.Name, l.Listen, l.Discovery, l.Static = "a", "127.0.0.1:0", "static", config.Statics("127.0.0.1:1")
	cfg.Listeners = []config.Listener{l}
	var addr net.Addr
	stopped := false
	err := supervisor.Run(supervisor.Options{Config: cfg, Signals: make(chan os.Signal),
		Ready:    func(s *server.Server) error { addr = s.Addr("a"); return errors.New("backends failed") },
		Stopping: func() { stopped = true }})
	if err == nil || err.Error() != "backends failed" || !stopped {
		t.Fatalf("Run: %v, stopping hook ran: %v", err, stopped)
	}
	if c, err := net.DialTimeout("tcp", addr.String(), time.Second); err == nil {
		c.Close()
		t.Fatal("the listener still accepts after Run failed")
	}
}

// logrotate renames the access log and sends SIGUSR1: the next records go
// to a new file at the path.
func TestReopenSignalReopensTheAccessLog(t *testing.T) {
	be := testenv.StartBackend(t, "b")
	dir := t.TempDir()
	path := filepath.Join(dir, "access.log")
	cfg := config.Default()
	cfg.Admin.Listen = ""
	cfg.AccessLog = &accesslog.Config{Path: path, Format: accesslog.Text}
	l := config.DefaultListener()
	l.Name, l.Listen, l.Discovery, l.Static = "a", "127.0.0.1:0", "static", config.Statics(be.Addr)
	l.Health.Interval = 50 * time.Millisecond
	cfg.Listeners = []config.Listener{l}
	sigs := make(chan os.Signal, 1)
	ready := make(chan *server.Server, 1)
	done := make(chan error, 1)
	go func() {
		done <- supervisor.Run(supervisor.Options{Config: cfg, Signals: sigs,
			Ready: func(s *server.Server) error { ready <- s; return nil }})
	}()
	srv := <-ready
	testenv.Eventually(t, "a live", 5*time.Second, func() bool { return srv.Routed("a") == 1 })
	lines := func(p string) int {
		b, _ := os.ReadFile(p)
		return strings.Count(string(b), "\n")
	}
	request := func() {
		if got, err := testenv.Request(srv.Addr("a").String()); err != nil || got != "b" {
			t.Fatalf("request: %q, %v", got, err)
		}
	}
	request()
	testenv.Eventually(t, "the first record", 5*time.Second, func() bool { return lines(path) == 1 })
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	sigs <- supervisor.ReopenSignal
	testenv.Eventually(t, "a new file at the path", 5*time.Second, func() bool { _, err := os.Stat(path); return err == nil })
	request()
	testenv.Eventually(t, "the next record in the new file", 5*time.Second, func() bool { return lines(path) == 1 })
	if n := lines(path + ".1"); n != 1 {
		t.Fatalf("the renamed file has %d records, want the first one only", n)
	}
	sigs <- syscall.SIGTERM
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
