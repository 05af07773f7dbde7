package health_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rota-proxy/rota/health"
)

// flaky is a probe whose answer the test sets, counting the probes.
type flaky struct {
	mu      sync.Mutex
	fail    bool
	answers bool // fails with a verdict (status 503), not a refusal
	times   []time.Time
}

func (f *flaky) probe(context.Context, string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.times = append(f.times, time.Now())
	if f.fail {
		if f.answers {
			return health.Answered(errors.New("http check: GET /primary: status 503 (want 200)"))
		}
		return errors.New("connection refused")
	}
	return nil
}

func (f *flaky) set(fail bool) { f.mu.Lock(); f.fail = fail; f.mu.Unlock() }

// The production defaults on virtual time: interval 2s, rise 2, fall 3,
// backoff from 2s to 30s. These take minutes of real time; in a synctest
// bubble they take milliseconds and cannot be late because the machine is
// busy.
func defaults() health.Config {
	return health.Config{Check: health.CheckTCP, Interval: 2 * time.Second, Timeout: time.Second,
		Rise: 2, Fall: 3, BackoffMax: 30 * time.Second}
}

func TestRiseFallOnVirtualTime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var f flaky
		changes := make(chan bool, 16)
		c := health.New(defaults(), nil, func(_ string, up bool) { changes <- up })
		defer c.Close()
		c.SetProbe(f.probe)
		start := time.Now()
		c.Update([]string{"10.0.0.1:80"})
		// New: live after its first success, at once.
		if up := <-changes; !up || time.Since(start) != 0 {
			t.Fatalf("first verdict %v after %v, want up at once", up, time.Since(start))
		}
		// Failing: down after fall=3 failed probes, one interval (+-10 %)
		// apart: between 2 x 1.8s and 3 x 2.2s after the first failure.
		f.set(true)
		failAt := time.Now()
		if up := <-changes; up {
			t.Fatal("want down")
		}
		if d := time.Since(failAt); d < 3600*time.Millisecond || d > 6600*time.Millisecond {
			t.Fatalf("down %v after the target started failing; fall 3 at a 2s interval", d)
		}
		// Back: after rise=2 successes on the backoff schedule.
		f.set(false)
		backAt := time.Now()
		if up := <-changes; !up {
			t.Fatal("want up")
		}
		if d := time.Since(backAt); d > 2*30*time.Second+time.Second {
			t.Fatalf("up %v after the target recovered; rise 2 within two backoff_max", d)
		}
		if s := stateOf(c, "10.0.0.1:80"); s.State != health.Up || s.ConsecutiveSuccesses < 2 {
			t.Fatalf("status %+v", s)
		}
	})
}

func TestBackoffOnVirtualTime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := flaky{fail: true}
		cfg := defaults()
		c := health.New(cfg, nil, nil)
		defer c.Close()
		c.SetProbe(f.probe)
		c.Update([]string{"10.0.0.1:80"})
		// Ten minutes of a dead target.
		time.Sleep(10 * time.Minute)
		synctest.Wait()
		f.mu.Lock()
		times := append([]time.Time(nil), f.times...)
		f.mu.Unlock()
		var gaps []time.Duration
		for i := 1; i < len(times); i++ {
			gaps = append(gaps, times[i].Sub(times[i-1]))
		}
		// Never up, so probably starting: asked again after 100 ms,
		// doubling while below the interval; then on backoff from the
		// interval, capped at backoff_max, never stopping.
		if len(gaps) < 20 {
			t.Fatalf("%d probes in 10 minutes: the backoff gave up or stalled (%v)", len(times), gaps)
		}
		starting := 0
		for d := 100 * time.Millisecond; d < cfg.Interval; d *= 2 {
			if g := gaps[starting]; g < d*9/10 || g > d*11/10 {
				t.Fatalf("gap %d = %v, want %v ±10%% (a target never up is probed again soon): %v", starting, g, d, gaps)
			}
			starting++
		}
		if starting == 0 {
			t.Fatalf("interval %v: no starting probes to test", cfg.Interval)
		}
		gaps = gaps[starting:]
		capped := 0
		for i, g := range gaps {
			if g < cfg.Interval*8/10 || g > cfg.BackoffMax {
				t.Fatalf("gap %d = %v outside [0.8 x interval, backoff_max]: %v", i, g, gaps)
			}
			if g >= cfg.BackoffMax*8/10 {
				capped++
			}
		}
		if capped < len(gaps)/2 {
			t.Fatalf("the backoff did not settle near backoff_max: %v", gaps)
		}
		// Last minute: probed about every 30 s, not given up.
		if last := time.Since(times[len(times)-1]); last > cfg.BackoffMax {
			t.Fatalf("last probe %v ago, more than backoff_max", last)
		}
	})
}

// A down target that answers (a replica saying 503 to /primary) is probed
// at the interval, not on backoff: when it is promoted, it is routed
// within an interval and rise, not after backoff_max.
func TestAnsweringTargetNotBackedOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := flaky{fail: true, answers: true}
		cfg := defaults()
		changes := make(chan bool, 16)
		c := health.New(cfg, nil, func(_ string, up bool) { changes <- up })
		defer c.Close()
		c.SetProbe(f.probe)
		c.Update([]string{"10.0.0.1:80"})
		if up := <-changes; up {
			t.Fatal("want down")
		}
		time.Sleep(10 * time.Minute) // a replica for ten minutes
		synctest.Wait()
		f.mu.Lock()
		times := append([]time.Time(nil), f.times...)
		f.mu.Unlock()
		for i := len(times) - 20; i < len(times); i++ {
			if g := times[i].Sub(times[i-1]); g < cfg.Interval*8/10 || g > cfg.Interval*12/10 {
				t.Fatalf("gap %d = %v, want the interval %v ±10%%", i, g, cfg.Interval)
			}
		}
		// Promoted: up after rise probes at the interval.
		f.set(false)
		at := time.Now()
		if up := <-changes; !up {
			t.Fatal("want up")
		}
		if d := time.Since(at); d > time.Duration(cfg.Rise)*cfg.Interval*11/10 {
			t.Fatalf("up %v after the target answered well; want within rise x interval (%v)", d, time.Duration(cfg.Rise)*cfg.Interval)
		}
	})
}
