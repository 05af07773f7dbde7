//go:build linux

package supervisor_test

import (
	"errors"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/handover"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/server"
	"github.com/rota-proxy/rota/supervisor"
)

// A new process that hangs before it is ready (a real process that never
// says so) is killed at the upgrade timeout; one that cannot start fails at
// once: each time the old process serves on and logs why, and a later
// upgrade is tried afresh.
func TestUpgradeThatFailsServesOn(t *testing.T) {
	be := testenv.StartBackend(t, "b")
	cfg := config.Default()
	cfg.Admin.Listen = ""
	l := config.DefaultListener()
	l.Name, l.Listen, l.Discovery, l.Static = "web", "127.0.0.1:0", "static", config.Statics(be.Addr)
	cfg.Listeners = []config.Listener{l}
	core, logs := observer.New(zap.InfoLevel)
	var started atomic.Int32
	var hung atomic.Int64 // the pid of the process that hangs
	sigs := make(chan os.Signal, 2)
	ready := make(chan *server.Server, 1)
	done := make(chan error, 1)
	go func() {
		done <- supervisor.Run(supervisor.Options{Config: cfg, Signals: sigs, Logger: zap.New(core),
			Ready:          func(s *server.Server) error { ready <- s; return nil },
			UpgradeTimeout: 300 * time.Millisecond,
			StartNew: func(files map[string]*os.File, state *os.File) (*handover.Child, error) {
				if len(files) != 1 || files["listener/web"] == nil {
					t.Errorf("sockets passed: %v", files)
				}
				if started.Add(1) == 2 {
					return nil, errors.New("exec: no such file")
				}
				if state == nil {
					t.Error("no state handed over")
				}
				c, err := handover.Start("/bin/sleep", []string{"60"}, files, state, nil, nil)
				if err == nil {
					hung.Store(int64(c.Pid()))
				}
				return c, err
			}})
	}()
	srv := <-ready
	addr := srv.Addr("web").String()
	for i, want := range []string{"not ready within 300ms", "exec: no such file"} {
		sigs <- supervisor.UpgradeSignal
		testenv.Eventually(t, "upgrade "+want, 10*time.Second, func() bool {
			return logs.FilterMessageSnippet("upgrade failed").FilterFieldKey("error").Len() == i+1
		})
		entry := logs.FilterMessageSnippet("upgrade failed").All()[i]
		if got := entry.ContextMap()["error"]; got == nil || !strings.Contains(got.(string), want) {
			t.Errorf("upgrade %d failed with %v, want %q", i+1, got, want)
		}
		if got, err := testenv.Request(addr); err != nil || got != "b" {
			t.Fatalf("after failed upgrade %d: %q, %v", i+1, got, err)
		}
	}
	// The hung process was killed (and reaped: no zombie left).
	if pid := hung.Load(); pid == 0 || syscall.Kill(int(pid), 0) == nil {
		t.Errorf("the process that hung (%d) still exists", pid)
	}
	select {
	case err := <-done:
		t.Fatalf("Run ended: %v", err)
	default:
	}
	sigs <- syscall.SIGTERM
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
