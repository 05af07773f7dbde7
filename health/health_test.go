package health_test

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/rota-proxy/rota/health"

	"github.com/rota-proxy/rota/internal/testenv"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// liveLog follows the checker's changes: the live set after each.
type liveLog struct {
	mu   sync.Mutex
	live map[string]bool
	sets [][]string
}

func (l *liveLog) push(addr string, up bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.live == nil {
		l.live = map[string]bool{}
	}
	if up {
		l.live[addr] = true
	} else {
		delete(l.live, addr)
	}
	set := make([]string, 0, len(l.live))
	for a := range l.live {
		set = append(set, a)
	}
	slices.Sort(set)
	l.sets = append(l.sets, set)
}

func (l *liveLog) last() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.sets) == 0 {
		return nil
	}
	return l.sets[len(l.sets)-1]
}

func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	})
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln
}

func stateOf(c *health.Checker, addr string) health.Status {
	for _, s := range c.Status() {
		if s.Addr == addr {
			return s
		}
	}
	return health.Status{State: -1}
}

func fast() health.Config {
	return health.Config{Check: health.CheckTCP, Interval: 10 * time.Millisecond,
		Timeout: time.Second, Rise: 2, Fall: 3, BackoffMax: 40 * time.Millisecond}
}

func TestNewTargetUpOnFirstSuccessAndDownAfterFall(t *testing.T) {
	ln := listen(t)
	addr := ln.Addr().String()
	var live liveLog
	core, logs := observer.New(zap.InfoLevel)
	c := health.New(fast(), zap.New(core), live.push)
	defer c.Close()

	c.Update([]string{addr})
	testenv.Eventually(t, "target up", 10*time.Second, func() bool { return slices.Equal(live.last(), []string{addr}) })
	if s := stateOf(c, addr); s.State != health.Up || s.ConsecutiveSuccesses < 1 || s.LastCheck.IsZero() {
		t.Fatalf("status after first success: %+v", s)
	}

	ln.Close()
	testenv.Eventually(t, "target down", 10*time.Second, func() bool { return len(live.last()) == 0 })
	s := stateOf(c, addr)
	if s.State != health.Down || s.ConsecutiveFailures < 3 || s.LastError == "" {
		t.Fatalf("status after failures: %+v", s)
	}
	// Only state changes are logged: one "up", one "down".
	if n := logs.FilterMessage("target up").Len(); n != 1 {
		t.Fatalf("logged %d 'target up' lines, want 1", n)
	}
	if n := logs.FilterMessage("target down").Len(); n != 1 {
		t.Fatalf("logged %d 'target down' lines, want 1", n)
	}
}

func TestDownTargetNeedsRiseSuccessesToReturn(t *testing.T) {
	ln := listen(t)
	addr := ln.Addr().String()
	var live liveLog
	c := health.New(fast(), nil, live.push)
	defer c.Close()
	var mu sync.Mutex
	var results []bool
	c.SetObserver(func(_ string, err error, _ time.Duration) {
		mu.Lock()
		results = append(results, err == nil)
		mu.Unlock()
	})
	c.Update([]string{addr})
	testenv.Eventually(t, "up", 10*time.Second, func() bool { return len(live.last()) == 1 })
	c.ReportFailure(addr, errors.New("connection refused"))
	if s := stateOf(c, addr); s.State != health.Down {
		t.Fatalf("ReportFailure did not take target down at once: %+v", s)
	}
	if len(live.last()) != 0 {
		t.Fatalf("live set still holds a reported target: %v", live.last())
	}
	mu.Lock()
	results = nil
	mu.Unlock()
	testenv.Eventually(t, "back up", 10*time.Second, func() bool { return len(live.last()) == 1 })
	mu.Lock()
	defer mu.Unlock()
	if len(results) < 2 || !results[0] || !results[1] {
		t.Fatalf("target returned after probes %v, want at least rise=2 successes", results)
	}
}

func TestBackoffGrowsToCapAndNeverStops(t *testing.T) {
	cfg := fast()
	cfg.Interval = 5 * time.Millisecond
	cfg.BackoffMax = 80 * time.Millisecond
	addr := testenv.FreeAddr(t)
	c := health.New(cfg, nil, nil)
	defer c.Close()
	var mu sync.Mutex
	var delays []time.Duration
	var times []time.Time
	c.SetObserver(func(_ string, err error, next time.Duration) {
		if err == nil {
			t.Error("probe of a closed port succeeded")
		}
		mu.Lock()
		delays = append(delays, next)
		times = append(times, time.Now())
		mu.Unlock()
	})
	c.Update([]string{addr})
	testenv.Eventually(t, "ten probes", 10*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return len(delays) >= 10 })
	mu.Lock()
	defer mu.Unlock()
	capped := false
	for i, d := range delays {
		if d > cfg.BackoffMax {
			t.Fatalf("delay %d = %v exceeds backoff_max %v", i, d, cfg.BackoffMax)
		}
		if d < time.Duration(float64(cfg.Interval)*0.8) {
			t.Fatalf("delay %d = %v below interval %v less jitter", i, d, cfg.Interval)
		}
		if i > 0 && !capped && d <= delays[i-1] {
			t.Fatalf("delays did not grow before the cap: %v", delays)
		}
		if d >= time.Duration(float64(cfg.BackoffMax)*0.8) {
			capped = true
		}
		// A timer never fires early: the real gap is at least the delay.
		if i+1 < len(times) && times[i+1].Sub(times[i]) < d {
			t.Fatalf("probe %d came %v after the previous, before its delay %v", i+1, times[i+1].Sub(times[i]), d)
		}
	}
	if !capped {
		t.Fatalf("backoff never reached the cap: %v", delays)
	}
	if s := stateOf(c, addr); s.State != health.Down || s.ChecksFailed < 10 {
		t.Fatalf("status: %+v", s)
	}
}

func TestHTTPCheck(t *testing.T) {
	var healthy atomic.Bool
	healthy.Store(true)
	var paths sync.Map
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		paths.Store(r.URL.Path, true)
		if !healthy.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		if r.URL.Path == "/healthz" {
			http.Redirect(w, r, "/elsewhere", http.StatusFound) // 3xx counts as healthy
			return
		}
		w.WriteHeader(http.StatusNotFound)
	}))
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	cfg := fast()
	cfg.Check = health.CheckHTTP
	cfg.Path = "/healthz"
	var live liveLog
	c := health.New(cfg, nil, live.push)
	defer c.Close()
	c.Update([]string{addr})
	testenv.Eventually(t, "http target up", 10*time.Second, func() bool { return len(live.last()) == 1 })
	if _, ok := paths.Load("/elsewhere"); ok {
		t.Fatal("health check followed a redirect")
	}
	healthy.Store(false)
	testenv.Eventually(t, "http target down on 503", 10*time.Second, func() bool { return len(live.last()) == 0 })
	if s := stateOf(c, addr); s.LastError == "" || s.State != health.Down {
		t.Fatalf("status: %+v", s)
	}
}

func TestCheckNoneIsLiveAtOnceAndReturnsAfterPassiveFailure(t *testing.T) {
	cfg := fast()
	cfg.Check = health.CheckNone
	addr := testenv.FreeAddr(t) // nothing listens: only passive marking can tell
	var live liveLog
	c := health.New(cfg, nil, live.push)
	defer c.Close()
	c.Update([]string{addr})
	testenv.Eventually(t, "up without probing", 10*time.Second, func() bool { return len(live.last()) == 1 })
	c.ReportFailure(addr, errors.New("refused"))
	if len(live.last()) != 0 {
		t.Fatal("still live after a reported failure")
	}
	testenv.Eventually(t, "readmitted after backoff", 10*time.Second, func() bool { return len(live.last()) == 1 })
}

// A dial that failed for lack of descriptors in rota itself says nothing
// about the target: it stays live.
func TestLocalFailureLeavesTargetLive(t *testing.T) {
	cfg := fast()
	cfg.Check = health.CheckNone
	addr := testenv.FreeAddr(t)
	var live liveLog
	c := health.New(cfg, nil, live.push)
	defer c.Close()
	c.Update([]string{addr})
	testenv.Eventually(t, "up without probing", 10*time.Second, func() bool { return len(live.last()) == 1 })
	c.ReportFailure(addr, fmt.Errorf("socket: %w", syscall.EMFILE))
	if s := stateOf(c, addr); s.State != health.Up || len(live.last()) != 1 {
		t.Fatalf("target taken down by a local EMFILE: %+v", s)
	}
	c.ReportFailure(addr, errors.New("refused"))
	if len(live.last()) != 0 {
		t.Fatal("a real failure no longer takes the target down")
	}
}

func TestStateSurvivesReannouncementAndRemovalForgets(t *testing.T) {
	ln := listen(t)
	addr := ln.Addr().String()
	other := listen(t)
	var live liveLog
	c := health.New(fast(), nil, live.push)
	defer c.Close()
	c.Update([]string{addr})
	testenv.Eventually(t, "up", 10*time.Second, func() bool { return len(live.last()) == 1 })
	before := stateOf(c, addr)
	c.Update([]string{addr, other.Addr().String()}) // churn: same address again
	if s := stateOf(c, addr); s.State != health.Up || s.Since != before.Since {
		t.Fatalf("re-announced target lost its state: %+v", s)
	}
	testenv.Eventually(t, "both up", 10*time.Second, func() bool { return len(live.last()) == 2 })
	c.Update([]string{other.Addr().String()})
	if s := stateOf(c, addr); s.State != -1 {
		t.Fatalf("removed target still tracked: %+v", s)
	}
	if got := live.last(); !slices.Equal(got, []string{other.Addr().String()}) {
		t.Fatalf("live after removal = %v", got)
	}
	ln.Close()
	other.Close()
}

func TestSetConfigKeepsState(t *testing.T) {
	ln := listen(t)
	defer ln.Close()
	addr := ln.Addr().String()
	var live liveLog
	c := health.New(fast(), nil, live.push)
	defer c.Close()
	c.Update([]string{addr})
	testenv.Eventually(t, "up", 10*time.Second, func() bool { return len(live.last()) == 1 })
	cfg := fast()
	cfg.Rise, cfg.Fall = 5, 7
	c.SetConfig(cfg)
	if got := c.Config(); got.Rise != 5 || got.Fall != 7 {
		t.Fatalf("config not applied: %+v", got)
	}
	if s := stateOf(c, addr); s.State != health.Up {
		t.Fatalf("state lost on SetConfig: %+v", s)
	}
}

func TestCloseStopsEverything(t *testing.T) {
	c := health.New(fast(), nil, nil)
	var addrs []string
	for i := range 50 {
		addrs = append(addrs, net.JoinHostPort("127.0.0.1", strconv.Itoa(1+i))) // closed low ports
	}
	c.Update(addrs)
	c.Close()
	c.Update(addrs) // ignored after Close
	if n := len(c.Status()); n != 50 {
		// Status still reports what was known; nothing new was started.
		t.Fatalf("status has %d targets", n)
	}
	// goleak in TestMain proves no probe goroutine outlived Close.
}

// States handed over by an upgrade's parent (Seed): an up target is live
// the moment it is discovered, before any probe; a down one stays down
// until rise probes succeed, its counters going on from the parent's.
func TestSeededStates(t *testing.T) {
	up, down := listen(t).Addr().String(), listen(t).Addr().String()
	var live liveLog
	cfg := fast()
	cfg.Interval = 200 * time.Millisecond
	c := health.New(cfg, nil, live.push)
	defer c.Close()
	var mu sync.Mutex
	probed := map[string][]bool{}
	c.SetObserver(func(addr string, err error, _ time.Duration) {
		mu.Lock()
		probed[addr] = append(probed[addr], err == nil)
		mu.Unlock()
	})
	c.Seed([]health.Status{
		{Addr: up, State: health.Up, ConsecutiveSuccesses: 7, ChecksOK: 40, NextCheckIn: time.Hour},
		{Addr: down, State: health.Down, ConsecutiveFailures: 9, ChecksOK: 3, ChecksFailed: 12, LastError: "refused"},
	})
	c.Update([]string{up, down})
	if got := live.last(); !slices.Equal(got, []string{up}) {
		t.Fatalf("live right after discovery: %v, want the seeded up target alone", got)
	}
	if s := stateOf(c, up); s.ChecksOK != 40 || s.ConsecutiveSuccesses != 7 {
		t.Errorf("the up target's counters: %+v", s)
	}
	if s := stateOf(c, down); s.State != health.Down || s.ChecksFailed != 12 {
		t.Errorf("the down target: %+v", s)
	}
	// The down target (which answers now) needs rise successes.
	testenv.Eventually(t, "the down target back up", 10*time.Second, func() bool { return len(live.last()) == 2 })
	mu.Lock()
	defer mu.Unlock()
	if got := probed[down]; len(got) < 2 || !got[0] || !got[1] {
		t.Errorf("the down target came up after probes %v, want rise (2) successes", got)
	}
}
