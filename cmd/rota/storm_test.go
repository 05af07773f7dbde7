package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/rota-proxy/rota/internal/testenv"
)

// SIGTERM while clients connect as fast as they can (with a live target,
// and with none) ends `rota serve` with exit 0 within drain_timeout plus a
// second, every time.
func TestSIGTERMUnderConnectStorm(t *testing.T) {
	be := testenv.Greeter(t, "hi")
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	dead.Close()

	const drain = time.Second
	dir := t.TempDir()
	for trial := range 20 {
		target := be
		if trial%2 == 1 {
			target = deadAddr // nothing to reach: every client is refused
		}
		listen := testenv.FreeAddr(t)
		file := filepath.Join(dir, fmt.Sprintf("rota-%d.yaml", trial))
		os.WriteFile(file, []byte(fmt.Sprintf(`admin: {listen: ""}
listeners:
  - name: web
    listen: %s
    discovery: static
    static: [%s]
    health: {check: none}
    drain_timeout: %v
`, listen, target, drain)), 0o600)
		rota := startRota(t, "serve", "--config", file, "--log-format", "json")
		testenv.Eventually(t, "rota listening", 15*time.Second, func() bool {
			c, err := net.Dial("tcp", listen)
			if err == nil {
				c.Close()
			}
			return err == nil
		})

		storm := testenv.StartStorm(listen, 8, []byte("x"))
		testenv.Eventually(t, "the storm under way", 15*time.Second, func() bool { return storm.Attempts() > 300 })
		began := time.Now()
		rota.cmd.Process.Signal(syscall.SIGTERM)
		err, exited := rota.wait(drain + time.Second)
		took := time.Since(began)
		storm.Stop()
		switch {
		case !exited:
			rota.cmd.Process.Signal(syscall.SIGQUIT) // its goroutine dump shows where it hung
			<-rota.exited
			t.Fatalf("trial %d: still running %v after SIGTERM under a connect storm\n%s", trial, drain+time.Second, rota.stderr.String())
		case err != nil:
			t.Fatalf("trial %d: exit after SIGTERM: %v\n%s", trial, err, rota.stderr.String())
		case took > drain+time.Second:
			t.Fatalf("trial %d: exit %v after SIGTERM, want within drain_timeout (%v) + 1s", trial, took, drain)
		}
	}
}
