package health_test

import (
	"errors"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/internal/testenv"
)

// results collects each address's probe results, as the observer sees them.
type results struct {
	mu   sync.Mutex
	errs map[string][]error
	at   map[string][]time.Time
}

func observe(c *health.Checker) *results {
	r := &results{errs: map[string][]error{}, at: map[string][]time.Time{}}
	c.SetObserver(func(addr string, err error, _ time.Duration) {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.errs[addr] = append(r.errs[addr], err)
		r.at[addr] = append(r.at[addr], time.Now())
	})
	return r
}

// first is addr's first result: when it came, and its error; ok false
// before there is one.
func (r *results) first(addr string) (at time.Time, ok bool, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.errs[addr]) == 0 {
		return time.Time{}, false, nil
	}
	return r.at[addr][0], true, r.errs[addr][0]
}

// On Linux a TCP check of an IP address runs on the prober's event loop:
// a live target answers, a closed port is refused with the message net.Dial
// gives, and the check closes with a reset (the target reads ECONNRESET,
// not EOF), leaving no TIME_WAIT behind.
func TestTCPCheckOnTheLoop(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0") // accepted by the test, below
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	closed := testenv.FreeAddr(t)
	cfg := fast()
	cfg.Interval = time.Hour // one probe each
	c := health.New(cfg, nil, nil)
	defer c.Close()
	r := observe(c)
	live := ln.Addr().String()
	c.Update([]string{live, closed})

	testenv.Eventually(t, "both probed", 10*time.Second, func() bool {
		_, a, _ := r.first(live)
		_, b, _ := r.first(closed)
		return a && b
	})
	if _, _, err := r.first(live); err != nil {
		t.Fatalf("live target: %v", err)
	}
	_, _, err = r.first(closed)
	if !errors.Is(err, syscall.ECONNREFUSED) || err.Error() != "tcp check: dial: connect: connection refused" {
		t.Fatalf("closed port: %v", err)
	}
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	conn, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("the target read %v from the check, want a reset", err)
	}
}

// A target that never answers the handshake fails its check on the loop's
// deadline, with net.Dial's "i/o timeout".
func TestTCPCheckTimesOutOnTheLoop(t *testing.T) {
	addr := testenv.StuckListener(t)
	cfg := fast()
	cfg.Interval = time.Hour
	cfg.Timeout = 300 * time.Millisecond
	c := health.New(cfg, nil, nil)
	defer c.Close()
	r := observe(c)
	start := time.Now()
	c.Update([]string{addr})
	testenv.Eventually(t, "probed", 10*time.Second, func() bool { _, ok, _ := r.first(addr); return ok })
	at, _, err := r.first(addr)
	if !errors.Is(err, os.ErrDeadlineExceeded) || err.Error() != "tcp check: dial: i/o timeout" {
		t.Fatalf("unanswering target: %v", err)
	}
	if took := at.Sub(start); took < cfg.Timeout || took > cfg.Timeout+time.Second {
		t.Fatalf("timed out after %v, want %v", took, cfg.Timeout)
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// Closing a checker with probes in flight on the loop ends them at once
// and closes every descriptor the prober opened (its event loop's and the
// probes' sockets).
func TestCloseEndsProbesInFlight(t *testing.T) {
	var addrs []string
	for range 3 {
		addrs = append(addrs, testenv.StuckListener(t))
	}
	before := openFDs(t)
	cfg := fast()
	cfg.Timeout = time.Minute
	c := health.New(cfg, nil, nil)
	c.Update(addrs)
	// The loop's epoll descriptor and one socket per probe.
	testenv.Eventually(t, "probes in flight", 10*time.Second, func() bool { return openFDs(t) >= before+1+len(addrs) })
	start := time.Now()
	c.Close()
	if took := time.Since(start); took > time.Second {
		t.Fatalf("Close took %v with probes in flight", took)
	}
	if n := openFDs(t); n != before {
		t.Fatalf("%d descriptors open after Close, %d before New", n, before)
	}
	for _, s := range c.Status() {
		if s.State != health.Checking {
			t.Fatalf("a probe cut short by Close was recorded: %+v", s)
		}
	}
}

// A name is resolved: its check takes the goroutine path, and works.
func TestTCPCheckOfAName(t *testing.T) {
	ln := listen(t)
	_, port, _ := strings.Cut(ln.Addr().String(), ":")
	addr := "localhost:" + port
	c := health.New(fast(), nil, nil)
	defer c.Close()
	r := observe(c)
	c.Update([]string{addr})
	testenv.Eventually(t, "probed", 10*time.Second, func() bool { _, ok, _ := r.first(addr); return ok })
	if _, _, err := r.first(addr); err != nil {
		t.Fatalf("check of %s: %v", addr, err)
	}
}
