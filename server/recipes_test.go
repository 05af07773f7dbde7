package server_test

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/internal/testenv"
)

// The README's Redis recipe on Debian's redis-server: a master and a
// replica behind one listener whose send_expect check asks INFO
// replication for role:master. Writes through rota reach the master only;
// after a failover by hand (REPLICAOF NO ONE on the replica, REPLICAOF on
// the old master) they reach the new one.
func TestRedisMasterBySendExpect(t *testing.T) {
	a := testenv.StartRedis(t)
	_, aPort, _ := net.SplitHostPort(a.Addr)
	b := testenv.StartRedis(t, "--replicaof", "127.0.0.1", aPort)

	cfg := config.Default()
	cfg.Admin.Listen = ""
	l := fastListener("redis", a.Addr, b.Addr)
	l.Health.Check = health.CheckSendExpect
	l.Health.Steps = []health.Step{{Send: `INFO replication\r\n`}, {Expect: "role:master"}}
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	addr := proxyAddr(t, srv, "redis")

	master := func(want, other string) {
		t.Helper()
		testenv.Eventually(t, want+" the only live target", 20*time.Second, func() bool {
			return targetState(t, srv, "redis", want) == "up" && targetState(t, srv, "redis", other) == "down"
		})
		if s := targetStatus(t, srv, "redis", other); !strings.Contains(s, `expected "role:master", got`) || !strings.Contains(s, "role:slave") {
			t.Errorf("the replica's last error: %q", s)
		}
		for i := range 20 { // a write through rota lands on the master every time
			if got, err := testenv.RedisDo(addr, "SET k v"+string(rune('a'+i))); err != nil || got != "+OK" {
				t.Fatalf("SET through rota: %q %v", got, err)
			}
		}
	}
	master(a.Addr, b.Addr)

	// Failover: b becomes the master, a its replica.
	if got, err := b.Do("REPLICAOF NO ONE"); err != nil || got != "+OK" {
		t.Fatalf("REPLICAOF NO ONE: %q %v", got, err)
	}
	_, bPort, _ := net.SplitHostPort(b.Addr)
	if got, err := a.Do("REPLICAOF 127.0.0.1 " + bPort); err != nil || got != "+OK" {
		t.Fatalf("REPLICAOF: %q %v", got, err)
	}
	master(b.Addr, a.Addr)
}
