package proxy_test

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/proxy"
)

// capped is a backend that counts the clients it serves at once (a client
// counts from its first line) and holds each until hold returns.
type capped struct {
	*backend
	open, peak, served atomic.Int64
}

func startCapped(t *testing.T, name string, hold func()) *capped {
	b := &capped{}
	b.backend = startBackend(t, func(c net.Conn) {
		if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
			return
		}
		n := b.open.Add(1)
		for p := b.peak.Load(); n > p && !b.peak.CompareAndSwap(p, n); p = b.peak.Load() {
		}
		hold()
		b.open.Add(-1) // before the answer: the client's next may come at once
		b.served.Add(1)
		io.WriteString(c, name)
	})
	return b
}

// startGated serves a proxy over bs whose targets have perTarget places
// and a queue of size.
func startGated(t *testing.T, perTarget, size int, timeout time.Duration, bs ...*capped) (*setup, *balancer.Gate) {
	var bal balancer.Balancer
	g := balancer.NewGate()
	g.Set(perTarget, size, timeout)
	bal.SetGate(g)
	var es []balancer.Entry
	for _, b := range bs {
		es = append(es, balancer.Entry{T: bal.NewTarget(b.addr()), W: 1})
	}
	bal.Update(balancer.RoundRobin, es)
	return startProxyAt(t, "127.0.0.1:0", &proxy.Proxy{}, proxy.Settings{Retries: 1}, proxy.Single(&bal)), g
}

// ask sends a line through the proxy and returns the answer ("" when the
// proxy closed the client unanswered).
func ask(addr string) (string, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(c, "hello\n"); err != nil {
		return "", nil // closed already: refused
	}
	got, err := io.ReadAll(c)
	// A client closed unread is reset (its line was never read).
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		return "", err
	}
	return string(got), nil
}

// 200 clients at once against two targets of 10 places each and a queue
// of 500: every client is served, none refused, and no target ever serves
// more than 10 at once.
func TestQueueServesEveryClient(t *testing.T) { bothRelays(t, testQueueServesEveryClient) }

func testQueueServesEveryClient(t *testing.T) {
	hold := func() { time.Sleep(10 * time.Millisecond) } // the service's time per client
	b1, b2 := startCapped(t, "b1", hold), startCapped(t, "b2", hold)
	s, g := startGated(t, 10, 500, 5*time.Second, b1, b2)
	const clients = 200
	var wg sync.WaitGroup
	var answered atomic.Int64
	for range clients {
		wg.Go(func() {
			got, err := ask(s.addr)
			switch {
			case err != nil:
				t.Error(err)
			case got == "b1" || got == "b2":
				answered.Add(1)
			default:
				t.Errorf("a client got %q: refused", got)
			}
		})
	}
	wg.Wait()
	if answered.Load() != clients {
		t.Fatalf("%d of %d clients served", answered.Load(), clients)
	}
	for _, b := range []*capped{b1, b2} {
		if p := b.peak.Load(); p > 10 {
			t.Errorf("%s served %d clients at once; the cap is 10", b.addr(), p)
		}
	}
	if b1.peak.Load() < 10 && b2.peak.Load() < 10 {
		t.Errorf("peaks %d and %d: the clients never filled a target", b1.peak.Load(), b2.peak.Load())
	}
	count, _, _ := g.Wait.Snapshot()
	if count == 0 {
		t.Error("no client waited: the queue was never used")
	}
	t.Logf("peaks %d and %d; %d clients waited", b1.peak.Load(), b2.peak.Load(), count)
	testenv.Eventually(t, "places given back", 5*time.Second, func() bool { return !g.Queueing() && s.p.Stats.Active.Load() == 0 })
}

// With a queue of 50, 200 clients at once against 20 places: 20 served,
// 50 wait, the other 130 are closed unanswered; once the targets let go,
// the 50 are served in turn.
func TestQueueOverflowIsClosed(t *testing.T) { bothRelays(t, testQueueOverflowIsClosed) }

func testQueueOverflowIsClosed(t *testing.T) {
	release := make(chan struct{})
	hold := func() { <-release }
	b1, b2 := startCapped(t, "b1", hold), startCapped(t, "b2", hold)
	s, g := startGated(t, 10, 50, 20*time.Second, b1, b2)
	const clients = 200
	var wg sync.WaitGroup
	var answered, refused atomic.Int64
	for range clients {
		wg.Go(func() {
			got, err := ask(s.addr)
			switch {
			case err != nil:
				t.Error(err)
			case got == "":
				refused.Add(1)
			default:
				answered.Add(1)
			}
		})
	}
	testenv.Eventually(t, "20 served, 50 queued, 130 refused", 20*time.Second, func() bool {
		return b1.open.Load()+b2.open.Load() == 20 && g.Length() == 50 && refused.Load() == 130
	})
	close(release)
	wg.Wait()
	if answered.Load() != 70 || refused.Load() != 130 {
		t.Fatalf("%d served, %d refused; want 70 and 130", answered.Load(), refused.Load())
	}
	if b1.peak.Load() > 10 || b2.peak.Load() > 10 {
		t.Errorf("peaks %d and %d over the cap of 10", b1.peak.Load(), b2.peak.Load())
	}
}

// A client that waits past the queue's timeout is closed, and the place
// that comes later goes to the next.
func TestQueueTimeout(t *testing.T) { bothRelays(t, testQueueTimeout) }

func testQueueTimeout(t *testing.T) {
	release := make(chan struct{})
	var first atomic.Bool
	b := startCapped(t, "b", func() {
		if first.CompareAndSwap(false, true) {
			<-release
		}
	})
	s, g := startGated(t, 1, 10, 200*time.Millisecond, b)
	held := make(chan string, 1)
	go func() { got, _ := ask(s.addr); held <- got }()
	testenv.Eventually(t, "the place taken", 5*time.Second, func() bool { return b.open.Load() == 1 })
	start := time.Now()
	got, err := ask(s.addr)
	waited := time.Since(start)
	if err != nil || got != "" {
		t.Fatalf("the queued client got %q, %v; want closed unanswered", got, err)
	}
	if waited < 200*time.Millisecond || waited > 2*time.Second {
		t.Errorf("closed after %v; the queue timeout is 200ms", waited)
	}
	if g.Queueing() {
		t.Error("still queueing after the timeout")
	}
	close(release)
	if got := <-held; got != "b" {
		t.Fatalf("the first client got %q", got)
	}
	if got, _ := ask(s.addr); got != "b" {
		t.Fatalf("the next client got %q: the place was not given back", got)
	}
}

// Shutdown with clients queued and the targets holding every place: the
// drain deadline cuts them all, queued ones included; nothing is left
// held or waiting, and Serve returns.
func TestShutdownWithClientsQueued(t *testing.T) { bothRelays(t, testShutdownWithClientsQueued) }

func testShutdownWithClientsQueued(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	hold := func() { <-release }
	b := startCapped(t, "b", hold)
	s, g := startGated(t, 5, 100, time.Minute, b)
	var wg sync.WaitGroup
	var closed atomic.Int64
	for range 40 {
		wg.Go(func() {
			if got, err := ask(s.addr); err == nil && got == "" {
				closed.Add(1)
			}
		})
	}
	testenv.Eventually(t, "5 held, 35 queued", 10*time.Second, func() bool { return b.open.Load() == 5 && g.Length() == 35 })
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	s.p.Shutdown(ctx)
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Shutdown took %v", d)
	}
	wg.Wait()
	if closed.Load() != 40 {
		t.Errorf("%d of 40 clients closed unanswered", closed.Load())
	}
	if g.Queueing() || g.Length() != 0 {
		t.Errorf("after shutdown: queueing %v, length %d", g.Queueing(), g.Length())
	}
	if n := s.p.Stats.Active.Load(); n != 0 {
		t.Errorf("%d connections still counted", n)
	}
}
