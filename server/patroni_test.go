package server_test

import (
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/server"
)

// The README's Patroni recipe on Debian's patroni and PostgreSQL 15, its
// state in a real etcd: db-rw asks each node's REST port for /primary,
// db-ro for /replica. pgbench writes through db-rw; after a switchover
// (patronictl) and after the primary is killed, writes reach the new
// primary and db-ro follows. The time from Patroni's promotion (the new
// primary's /primary answering 200) to rota routing to it (db-rw's
// picker offering it alone; follows then checks a query lands there) is
// measured against one check interval plus rise.
func TestPatroniPrimaryAndReplica(t *testing.T) {
	e := testenv.StartEtcd(t)
	pc := testenv.StartPatroni(t, strings.TrimPrefix(e.Endpoints()[0], "http://"))

	cfg := config.Default()
	cfg.Admin.Listen = ""
	restPort, _ := strconv.Atoi(pc.RESTPort)
	db := func(name, role string) config.Listener {
		l := fastListener(name, pc.PG(0), pc.PG(1))
		l.Health.Check, l.Health.Port, l.Health.Path = health.CheckHTTP, restPort, "/"+role
		l.Health.ExpectStatus = []string{"200"}
		l.Health.Interval, l.Health.Rise, l.Health.Fall = 500*time.Millisecond, 2, 2
		l.Health.Timeout, l.Health.BackoffMax = time.Second, 10*time.Second
		return l
	}
	cfg.Listeners = []config.Listener{db("db-rw", "primary"), db("db-ro", "replica")}
	hc := cfg.Listeners[0].Health
	goal := hc.Interval + time.Duration(hc.Rise)*hc.Interval
	srv := startServer(t, cfg)
	rw, ro := proxyAddr(t, srv, "db-rw"), proxyAddr(t, srv, "db-ro")

	// follows waits until db-rw routes to primary only and db-ro to the
	// other node only (none when replica is false).
	follows := func(primary int, replica bool) {
		t.Helper()
		other := 1 - primary
		testenv.Eventually(t, "db-rw on node "+strconv.Itoa(primary), 60*time.Second, func() bool {
			return targetState(t, srv, "db-rw", pc.PG(primary)) == "up" &&
				targetState(t, srv, "db-rw", pc.PG(other)) == "down" && liveCount(srv, "db-rw") == 1
		})
		wantRO := "down"
		if replica {
			wantRO = "up"
		}
		testenv.Eventually(t, "db-ro "+wantRO+" on node "+strconv.Itoa(other), 60*time.Second, func() bool {
			return targetState(t, srv, "db-ro", pc.PG(other)) == wantRO &&
				targetState(t, srv, "db-ro", pc.PG(primary)) == "down" && liveCount(srv, "db-ro") >= 0
		})
		if got := query(t, rw, "SELECT inet_server_addr()"); got != pc.Host(primary) {
			t.Fatalf("db-rw reached %s, want the primary %s", got, pc.Host(primary))
		}
		if replica {
			if got := query(t, ro, "SELECT inet_server_addr(), pg_is_in_recovery()"); got != pc.Host(other)+"|t" {
				t.Fatalf("db-ro reached %q, want the replica %s in recovery", got, pc.Host(other))
			}
		}
	}

	p := pc.Primary()
	follows(p, true)
	pgbench(t, rw, "-i", "-s", "1", "-q")
	pgbench(t, rw, "-n", "-c", "4", "-j", "2", "-T", "2")

	// A switchover: Patroni demotes the primary, then promotes the replica.
	promoted := watchPromotion(t, pc, 1-p)
	routed := watchRouted(t, srv, pc.PG(1-p))
	pc.Switchover(t, p, 1-p)
	took := (<-routed).Sub(<-promoted)
	t.Logf("switchover: rota routed to the new primary %v after Patroni promoted it (goal %v: interval + rise)", took.Round(time.Millisecond), goal)
	if took > goal+500*time.Millisecond { // a probe's round trip, the pool's publication, scheduling
		t.Errorf("switchover: routed %v after the promotion, goal %v", took, goal)
	}
	p = 1 - p
	follows(p, true)
	pgbench(t, rw, "-n", "-c", "4", "-j", "2", "-T", "2")

	// The primary is killed: the replica is promoted once the leader key's
	// TTL ends; db-ro has no replica until the old primary rejoins.
	promoted = watchPromotion(t, pc, 1-p)
	routed = watchRouted(t, srv, pc.PG(1-p))
	pc.Kill(p)
	took = (<-routed).Sub(<-promoted)
	t.Logf("killed primary: rota routed to the new primary %v after Patroni promoted it (goal %v)", took.Round(time.Millisecond), goal)
	if took > goal+500*time.Millisecond {
		t.Errorf("failover: routed %v after the promotion, goal %v", took, goal)
	}
	p = 1 - p
	follows(p, false)
	pgbench(t, rw, "-n", "-c", "4", "-j", "2", "-T", "2")

	// The old primary comes back as a replica (rewound); db-ro follows.
	pc.Start(t, 1-p)
	follows(p, true)
}

// query runs one statement through addr.
func query(t *testing.T, addr, sql string) string {
	t.Helper()
	out, err := testenv.PSQL(addr, sql)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// pgbench runs pgbench through addr as the superuser and fails the test
// on any error or failed transaction.
func pgbench(t *testing.T, addr string, args ...string) {
	t.Helper()
	host, port, _ := net.SplitHostPort(addr)
	cmd := exec.Command(filepath.Join(testenv.PGBin, "pgbench"), append([]string{"-h", host, "-p", port, "-U", "postgres"}, append(args, "postgres")...)...)
	cmd.Env = append(cmd.Environ(), "PGPASSWORD=secret", "PGCONNECT_TIMEOUT=3")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("pgbench %v through rota: %v\n%s", args, err, out)
	}
	if s := string(out); strings.Contains(s, "number of transactions actually processed") {
		if !strings.Contains(s, "number of failed transactions: 0 ") {
			t.Fatalf("pgbench %v through rota: failed transactions\n%s", args, out)
		}
		for _, line := range strings.Split(s, "\n") {
			if strings.HasPrefix(line, "tps") || strings.HasPrefix(line, "number of transactions actually") {
				t.Logf("pgbench through db-rw: %s", line)
			}
		}
	}
}

// watchPromotion reports when node i's REST API first answers /primary 200.
func watchPromotion(t *testing.T, pc *testenv.Patroni, i int) <-chan time.Time {
	return watch(t, "node "+strconv.Itoa(i)+" answering /primary", func() bool { return pc.Answers(i, "primary") })
}

// watchRouted reports when db-rw's picker first offers target alone: rota
// routes every new connection to it. (Asked of rota's own view: a psql
// through rota every 20 ms, for the half minute a killed primary takes,
// cost the other packages' tests a core.)
func watchRouted(t *testing.T, srv *server.Server, target string) <-chan time.Time {
	return watch(t, "db-rw routing to "+target, func() bool {
		return srv.Routed("db-rw") == 1 && targetState(t, srv, "db-rw", target) == "up"
	})
}

// watch asks cond every 20 ms, for up to 90 s, and sends when it first
// holds; it stops when the test ends.
func watch(t *testing.T, what string, cond func() bool) <-chan time.Time {
	ch := make(chan time.Time, 1)
	stop := make(chan struct{})
	done := make(chan struct{})
	t.Cleanup(func() { close(stop); <-done })
	go func() {
		defer close(done)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		deadline := time.After(90 * time.Second)
		for !cond() {
			select {
			case <-stop:
				return
			case <-deadline:
				t.Errorf("never: %s", what)
				ch <- time.Time{}
				return
			case <-tick.C:
			}
		}
		ch <- time.Now()
	}()
	return ch
}
