package server_test

import (
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
)

// discovery: docker on this machine's engine, under client load: a
// labelled service scaled 1 -> 5 -> 2, a restart, a SIGKILL and a container
// turning unhealthy, with zero failed client connections; a restarted
// container's old address is never dialled once its old life ended. The
// figures (start -> routed, death -> out) are logged.
func TestDockerDiscoveryUnderLoad(t *testing.T) {
	d := testenv.StartDocker(t)
	network := d.Network()
	svc := "app-" + rand.Text()[:8]
	// The app is a plain HTTP server that serves 1 s more after SIGTERM,
	// as well-behaved servers behind a proxy do; no registration.
	run := func(i int) string {
		return d.Container("--network", network, "--label", "rota.service="+svc, "--name", fmt.Sprintf("%s-%d", svc, i),
			d.HealthImage(), "demo-backend", "--listen", ":9000", "--name", fmt.Sprintf("c%d", i),
			"--deregister-wait", "1s", "--down-file", "/down")
	}
	ids := []string{run(1)}

	cfg := config.Default()
	cfg.Admin.Listen = ""
	log := newAccessLog(t, cfg)
	l := fastListener("app")
	l.Discovery, l.Static, l.Service, l.Port = "docker", nil, svc, config.Port{Number: 9000}
	l.Health.Check = "http"
	l.Retries = 3
	l.ReplayOnReset = true // GETs: a request the SIGKILLed container took goes to the next
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	addr := proxyAddr(t, srv, "app")
	testenv.Eventually(t, "c1 routed", 30*time.Second, func() bool { s, err := testenv.Get(addr); return err == nil && s == "c1" })

	load := testenv.StartLoad(2, 100000, func(int) (string, error) { return testenv.Get(addr) })
	defer load.Stop()
	ip := func(id string) string { return d.IP(id, network) + ":9000" }
	started := func(id string) time.Time { return parseTime(t, d.Run("inspect", "-f", "{{.State.StartedAt}}", id)) }
	finished := func(id string) time.Time { return parseTime(t, d.Run("inspect", "-f", "{{.State.FinishedAt}}", id)) }

	// Scale out to 5 (compose starts them together).
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i := 2; i <= 5; i++ {
		wg.Go(func() {
			id := run(i)
			mu.Lock()
			ids = append(ids, id)
			mu.Unlock()
		})
	}
	wg.Wait()
	slices.Sort(ids[1:]) // by ID; names say which is which
	testenv.Eventually(t, "five routed", 30*time.Second, func() bool {
		for i := 1; i <= 5; i++ {
			if load.Count(fmt.Sprintf("c%d", i)) == 0 {
				return false
			}
		}
		return true
	})
	firstTo := map[string]time.Time{}
	for _, r := range log.all() {
		if f, ok := firstTo[r.Target]; !ok || r.Start.Before(f) {
			firstTo[r.Target] = r.Start
		}
	}
	var toRouted []time.Duration
	for _, id := range ids[1:] {
		toRouted = append(toRouted, firstTo[ip(id)].Sub(started(id)))
	}
	slices.Sort(toRouted)
	t.Logf("container start -> first client routed to it: %v (its healthcheck's first pass and rota's rise of 2 included)", toRouted)

	// Scale in to 2: three stopped together, as compose does.
	name := func(id string) string { return d.Run("inspect", "-f", "{{.Name}}", id)[1:] }
	var stop []string
	var keep []string
	for _, id := range ids {
		switch name(id) {
		case svc + "-3", svc + "-4", svc + "-5":
			stop = append(stop, id)
		default:
			keep = append(keep, id)
		}
	}
	for _, id := range stop {
		wg.Go(func() { d.Run("stop", "-t", "10", id) })
	}
	wg.Wait()
	for _, id := range stop {
		if got := targetState(t, srv, "app", ip(id)); got != "absent" {
			t.Fatalf("stopped %s still a target (%s)", name(id), got)
		}
	}

	// Restart one: its old life's address is not dialled after it ended.
	c := keep[1]
	old := ip(c)
	d.Run("restart", "-t", "10", c)
	ended := finished(c)
	testenv.Eventually(t, name(c)+" routed again", 30*time.Second, func() bool {
		return targetState(t, srv, "app", ip(c)) == "up"
	})
	reborn := started(c)
	for _, r := range log.all() {
		dialled := r.Target == old
		for _, try := range r.Tries {
			dialled = dialled || try.Target == old
		}
		if dialled && r.Start.After(ended) && (ip(c) != old || r.Start.Before(reborn)) {
			t.Fatalf("%s dialled at %v, after its old life ended at %v: %+v", old, r.Start, ended, r)
		}
	}

	// Unhealthy: leaves at once (the engine's health event); SIGKILL:
	// leaves on the die event.
	sick, doomed := run(6), run(7)
	testenv.Eventually(t, "c6 and c7 routed", 30*time.Second, func() bool {
		return targetState(t, srv, "app", ip(sick)) == "up" && targetState(t, srv, "app", ip(doomed)) == "up"
	})
	d.Run("cp", writeFile(t, "down"), sick+":/down")
	testenv.Eventually(t, "unhealthy one out", 10*time.Second, func() bool {
		return targetState(t, srv, "app", ip(sick)) == "absent"
	})
	// Polled from before the kill: the docker CLI is slow under load, and
	// polling after it returns would measure the CLI.
	killed := ip(doomed)
	var killErr error
	wg.Go(func() { _, killErr = d.Try("kill", doomed) })
	testenv.Eventually(t, "killed one out", 10*time.Second, func() bool {
		return targetState(t, srv, "app", killed) == "absent"
	})
	out := time.Now()
	wg.Wait()
	if killErr != nil {
		t.Fatalf("docker kill: %v", killErr)
	}
	t.Logf("SIGKILL -> out of rotation: %v after the container's death (the engine's FinishedAt; negative: out on the kill signal, before it died)",
		out.Sub(finished(doomed)))
	load.Stop()
	load.AssertNoFailures(t)
	t.Logf("%d client connections, none failed", load.OK.Load())
}

// writeFile writes an empty file called name in a temporary directory and
// returns its path.
func writeFile(t *testing.T, name string) string {
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func parseTime(t *testing.T, s string) time.Time {
	t.Helper()
	v, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatalf("time %q: %v", s, err)
	}
	return v
}
