package main

import (
	"context"
	"fmt"
	"maps"
	"net"
	"slices"
	"strings"
	"sync"
	"time"
)

// The plain app of docker-compose.yml (registered nowhere), as rota
// publishes it: through compose's DNS and through the containers' labels.
const (
	appDNSAddr    = "127.0.0.1:8082"
	appDockerAddr = "127.0.0.1:8083"
)

// appRoutes are the app's two ways in, by rota listener name.
var appRoutes = []struct{ listener, addr, how string }{
	{"app-dns", appDNSAddr, "DNS"},
	{"app-docker", appDockerAddr, "labels"},
}

// appScaleOut scales the app to n and checks that every new container is
// routed through both listeners; the row gives each container's time from
// its start to the first answer through each listener.
func appScaleOut(ctx context.Context, c *compose, r *report, sc *scaled, n int) error {
	name := fmt.Sprintf("scale out app=%d: all %d routed through DNS and labels", n, n)
	before, err := c.containers(ctx, "app")
	if err != nil {
		return err
	}
	start := time.Now()
	// Watch from before compose starts them: each one's first answer is
	// the measure.
	watchCtx, stopWatch := context.WithCancel(ctx)
	watchers := make([]*answers, len(appRoutes))
	var wg sync.WaitGroup
	for i, rt := range appRoutes {
		watchers[i] = &answers{at: map[string]time.Time{}}
		wg.Go(func() { watchers[i].watch(watchCtx, rt.addr) })
	}
	defer func() { stopWatch(); wg.Wait() }()
	sc.app = n
	if err := c.scale(ctx, sc.m()); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	upTook := time.Since(start)
	all, err := c.containers(ctx, "app")
	if err != nil {
		return err
	}
	var rows []string
	for i, rt := range appRoutes {
		at, err := watchers[i].wait(ctx, hostnames(all), routeTimeout)
		if err != nil {
			return r.fail(name, time.Since(start), fmt.Errorf("through %s (%s): %w", rt.how, rt.addr, err))
		}
		var took []time.Duration
		for _, ct := range all {
			if !slices.ContainsFunc(before, func(b container) bool { return b.ID == ct.ID }) {
				took = append(took, at[ct.Config.Hostname].Sub(ct.State.StartedAt))
			}
		}
		slices.Sort(took)
		rows = append(rows, fmt.Sprintf("%s: start -> first answer %s", rt.how, spread(took)))
	}
	r.record(name, time.Since(start), true, "%d new containers (compose up took %v); %s",
		len(all)-len(before), upTook.Round(time.Millisecond), strings.Join(rows, "; "))
	return nil
}

// spread is "min / median / max" of sorted durations.
func spread(d []time.Duration) string {
	if len(d) == 0 {
		return "none"
	}
	r := func(x time.Duration) string { return x.Round(10 * time.Millisecond).String() }
	return fmt.Sprintf("min %s, median %s, max %s", r(d[0]), r(d[len(d)/2]), r(d[len(d)-1]))
}

// answers records when each name first answered through an address.
type answers struct {
	mu sync.Mutex
	at map[string]time.Time
}

// watch polls addr until ctx ends.
func (a *answers) watch(ctx context.Context, addr string) {
	for ctx.Err() == nil {
		if name, err := get(ctx, addr); err == nil {
			a.mu.Lock()
			if _, ok := a.at[name]; !ok {
				a.at[name] = time.Now()
			}
			a.mu.Unlock()
		}
		if pause(ctx, 5*time.Millisecond) != nil {
			return
		}
	}
}

// wait waits until every name in want has answered, and returns when each
// first did.
func (a *answers) wait(ctx context.Context, want []string, timeout time.Duration) (map[string]time.Time, error) {
	deadline := time.Now().Add(timeout)
	for {
		a.mu.Lock()
		missing := slices.ContainsFunc(want, func(w string) bool { _, ok := a.at[w]; return !ok })
		at := maps.Clone(a.at)
		a.mu.Unlock()
		if !missing {
			return at, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("after %v saw %v, want all of %v", timeout, slices.Sorted(maps.Keys(at)), want)
		}
		if err := pause(ctx, 10*time.Millisecond); err != nil {
			return nil, err
		}
	}
}

// appScaleIn scales the app to n under load and checks that only the
// containers left answer through both listeners, with no failed client.
func appScaleIn(ctx context.Context, c *compose, r *report, ld *load, sc *scaled, n int) error {
	name := fmt.Sprintf("scale in app=%d under load", n)
	m := ld.mark()
	start := time.Now()
	sc.app = n
	if err := c.scale(ctx, sc.m()); err != nil {
		return r.fail(name, time.Since(start), err)
	}
	left, err := c.containers(ctx, "app")
	if err != nil {
		return err
	}
	for _, rt := range appRoutes {
		if _, err := waitOnly(ctx, rt.addr, hostnames(left), 20, routeTimeout); err != nil {
			return r.fail(name, time.Since(start), fmt.Errorf("through %s: %w", rt.how, err))
		}
	}
	ok, failed := ld.since(m)
	r.record(name, time.Since(start), failed == 0,
		"%d failed client connections of %d (slowest %v); only the %d left answer through DNS and labels%s",
		failed, ok+failed, ld.slow(), n, ld.firstErrors())
	return nil
}

// appKill kills one app container under load and checks that both
// listeners drop its address, with no failed client; the row gives the
// time from its death to out of rotation in each.
func appKill(ctx context.Context, c *compose, r *report, ld *load, sc *scaled) error {
	name := "docker kill one app container under load"
	cs, err := c.containers(ctx, "app")
	if err != nil {
		return err
	}
	m := ld.mark()
	start := time.Now()
	victim := cs[0]
	addr := net.JoinHostPort(victim.ip(), "9000")
	// Both listeners polled from before the kill: each one's first
	// absence is the measure (the docker CLI is slow under load; polling
	// after it returns would measure the CLI).
	out := make([]time.Time, len(appRoutes))
	pollCtx, stopPoll := context.WithTimeout(ctx, routeTimeout)
	defer stopPoll()
	var wg sync.WaitGroup
	wg.Go(func() {
		for slices.Contains(out, time.Time{}) {
			for i, rt := range appRoutes {
				if out[i].IsZero() && notTarget(pollCtx, rt.listener, addr) == nil {
					out[i] = time.Now()
				}
			}
			if pause(pollCtx, 5*time.Millisecond) != nil {
				return
			}
		}
	})
	_, err = docker(ctx, "kill", victim.ID)
	if err != nil {
		stopPoll()
		wg.Wait()
		return r.fail(name, time.Since(start), err)
	}
	wg.Wait()
	if slices.Contains(out, time.Time{}) {
		return r.fail(name, time.Since(start), fmt.Errorf("%s still a target of some of %v after %v", addr, appRoutes, routeTimeout))
	}
	dead, err := inspect(ctx, victim.ID)
	if err != nil {
		return r.fail(name, time.Since(start), err)
	}
	died := dead[0].State.FinishedAt
	var rows []string
	for i, rt := range appRoutes {
		rows = append(rows, fmt.Sprintf("out of %s %v after its death (negative: on the kill signal, before it)", rt.listener, out[i].Sub(died).Round(time.Millisecond)))
	}
	for _, rt := range appRoutes {
		if _, err := waitOnly(ctx, rt.addr, hostnames(cs[1:]), 20, routeTimeout); err != nil {
			return r.fail(name, time.Since(start), fmt.Errorf("through %s: %w", rt.how, err))
		}
	}
	ok, failed := ld.since(m)
	r.record(name, time.Since(start), failed == 0, "%d failed client connections of %d (slowest %v); %s%s",
		failed, ok+failed, ld.slow(), strings.Join(rows, ", "), ld.firstErrors())
	// Back to the scale: compose starts the killed container again.
	if err := c.scale(ctx, sc.m()); err != nil {
		return r.fail("restore app", 0, err)
	}
	return nil
}
