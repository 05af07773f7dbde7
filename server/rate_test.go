package server_test

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/proxy"
)

// max_conn_rate and max_conn_rate_per_client hold within 10 % over 10 s
// against clients that connect at three times the rate: one second's
// burst, then the rate; refusals are counted by reason.
func TestConnectionRates(t *testing.T) {
	b := startBackend(t, "b")
	cfg := config.Default()
	cfg.Admin.Listen = ""
	whole := fastListener("whole", b.Addr)
	whole.MaxConnRate = proxy.Rate{PerSecond: 200}
	each := fastListener("each", b.Addr)
	each.MaxConnRatePerClient = proxy.Rate{PerSecond: 50}
	cfg.Listeners = []config.Listener{whole, each}
	srv := startServer(t, cfg)
	testenv.Eventually(t, "live", 5*time.Second, func() bool { return liveCount(srv, "whole") == 1 && liveCount(srv, "each") == 1 })

	// hammer connects from srcs at pace connections a second, four at a
	// time, for d, and counts the connections served (the backend
	// answered) and refused (closed unanswered): paced at three times the
	// rate, so that the clients outpace it without taking the machine
	// from the tests beside this one.
	hammer := func(addr string, srcs []string, pace float64, d time.Duration) (served, refused int) {
		start := time.Now()
		end := start.Add(d)
		var next atomic.Int64
		var mu sync.Mutex
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for {
					i := next.Add(1) - 1
					at := start.Add(time.Duration(float64(i) / pace * float64(time.Second)))
					// The window is the wall clock's: on a busy machine the
					// schedule runs late, and attempts made after it would
					// meet a bucket refilled for the extra time.
					if !at.Before(end) || !time.Now().Before(end) {
						return
					}
					time.Sleep(time.Until(at)) // pacing, not synchronisation
					c, err := dialFrom(srcs[int(i)%len(srcs)], addr)
					if err != nil {
						t.Error(err)
						return
					}
					c.SetDeadline(time.Now().Add(5 * time.Second))
					io.WriteString(c, "hello\n")
					c.(*net.TCPConn).CloseWrite()
					got, _ := io.ReadAll(c)
					c.Close()
					mu.Lock()
					if len(got) > 0 {
						served++
					} else {
						refused++
					}
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		return served, refused
	}
	check := func(what string, served, refused int, rate float64, d time.Duration) {
		t.Helper()
		want := rate + rate*d.Seconds() // the burst, then the rate
		t.Logf("%s: %d served, %d refused in %v (want %.0f: a second's burst, then %.0f/s)", what, served, refused, d, want, rate)
		if float64(served) < 0.9*want || float64(served) > 1.1*want {
			t.Errorf("%s: %d served in %v, want %.0f within 10 %%", what, served, d, want)
		}
		if refused == 0 {
			t.Errorf("%s: nothing refused: the clients did not exceed the rate", what)
		}
	}

	// Both listeners at once, 10 s each.
	const d = 10 * time.Second
	var wholeServed, wholeRefused, eachServed, eachRefused int
	var both sync.WaitGroup
	both.Go(func() {
		wholeServed, wholeRefused = hammer(proxyAddr(t, srv, "whole"), []string{"127.0.0.2", "127.0.0.3", "127.0.0.4"}, 600, d)
	})
	both.Go(func() {
		eachServed, eachRefused = hammer(proxyAddr(t, srv, "each"), []string{"127.0.0.5"}, 150, d)
	})
	both.Wait()
	check("max_conn_rate 200/s", wholeServed, wholeRefused, 200, d)
	if n := status(t, srv, "whole").Count("denied_conns", "rate"); n != uint64(wholeRefused) {
		t.Errorf("denied rate = %d, want %d", n, wholeRefused)
	}
	check("max_conn_rate_per_client 50/s", eachServed, eachRefused, 50, d)
	if n := status(t, srv, "each").Count("denied_conns", "per_client_rate"); n != uint64(eachRefused) {
		t.Errorf("denied per_client_rate = %d, want %d", n, eachRefused)
	}
	// Another client has a bucket of its own.
	if s, _ := hammer(proxyAddr(t, srv, "each"), []string{"127.0.0.6"}, 100, 100*time.Millisecond); s == 0 {
		t.Error("a second client was refused with the first's bucket")
	}
}
