package server_test

import (
	"testing"
	"time"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
)

// Backup targets under client load: both primaries die (killed together)
// and the backup serves with no failed client; one primary comes back and
// new connections go to it again, the backup none.
func TestBackupTargets(t *testing.T) {
	p1, p2 := testenv.StartBackend(t, "p1"), testenv.StartBackend(t, "p2")
	bk := testenv.StartBackend(t, "backup")
	cfg := config.Default()
	cfg.Admin.Listen = ""
	l := fastListener("db", p1.Addr, p2.Addr)
	l.Static = append(l.Static, config.StaticTarget{Addr: bk.Addr, Backup: true})
	// Killed, a primary resets the requests it holds: replayed (they are
	// idempotent) rather than failed. New connections are the retries'.
	l.ReplayOnReset = true
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	addr := proxyAddr(t, srv, "db")
	testenv.Eventually(t, "three targets up", 10*time.Second, func() bool {
		return targetState(t, srv, "db", p1.Addr) == "up" && targetState(t, srv, "db", p2.Addr) == "up" &&
			targetState(t, srv, "db", bk.Addr) == "up"
	})

	load := testenv.StartLoad(2, 20000, func(int) (string, error) { return testenv.Request(addr) })
	defer load.Stop()
	testenv.Eventually(t, "load on the primaries", 10*time.Second, func() bool { return load.Count("p1") > 50 && load.Count("p2") > 50 })
	if n := load.Count("backup"); n != 0 {
		t.Fatalf("the backup answered %d connections while both primaries were live", n)
	}

	p1.Kill()
	p2.Kill()
	before := load.Count("backup")
	testenv.Eventually(t, "the backup serving", 10*time.Second, func() bool { return load.Count("backup") > before+200 })

	p1.Revive(t)
	testenv.Eventually(t, "p1 up again", 10*time.Second, func() bool { return targetState(t, srv, "db", p1.Addr) == "up" })
	settled := load.Count("backup")
	p1Before := load.Count("p1")
	testenv.Eventually(t, "p1 taking the connections", 10*time.Second, func() bool { return load.Count("p1") > p1Before+200 })
	// A connection picked just before p1 came back may still land on the
	// backup; none after that.
	if n := load.Count("backup") - settled; n > 4 {
		t.Fatalf("the backup took %d new connections after a primary was back", n)
	}
	load.Stop()
	load.AssertNoFailures(t)
	var backup string
	for _, tg := range targets(t, srv).Listeners[0].Targets {
		if tg.Backup {
			backup += tg.Addr
		}
	}
	if backup != bk.Addr {
		t.Fatalf("/api/v1/targets marks %q as backup, want %s", backup, bk.Addr)
	}
}
