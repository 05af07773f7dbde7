package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/proxy"

	"github.com/rota-proxy/rota/internal/testenv"
)

func TestMain(m *testing.M) {
	if os.Getenv(bulkHelperEnv) != "" {
		runBulkHelper()
	}
	goleak.VerifyTestMain(m)
}

// backend is a real TCP server on 127.0.0.1 running handler per connection.
type backend struct {
	ln      net.Listener
	wg      sync.WaitGroup
	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	accepts atomic.Int64
}

func startBackend(t *testing.T, handler func(net.Conn)) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{ln: ln, conns: map[net.Conn]struct{}{}}
	b.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.accepts.Add(1)
			b.mu.Lock()
			b.conns[c] = struct{}{}
			b.mu.Unlock()
			b.wg.Go(func() {
				defer func() {
					c.Close()
					b.mu.Lock()
					delete(b.conns, c)
					b.mu.Unlock()
				}()
				handler(c)
			})
		}
	})
	t.Cleanup(b.stop)
	return b
}

func (b *backend) addr() string { return b.ln.Addr().String() }

// stop closes the listener and every open connection, then waits.
func (b *backend) stop() {
	b.ln.Close()
	b.mu.Lock()
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

func nameHandler(name string) func(net.Conn) {
	return func(c net.Conn) { io.WriteString(c, name) }
}

func echoHandler(c net.Conn) {
	io.Copy(c, c)
	c.(*net.TCPConn).CloseWrite()
}

// resetHandler accepts and resets at once, the way a crashing process does.
func resetHandler(c net.Conn) {
	c.(*net.TCPConn).SetLinger(0)
}

type setup struct {
	p    *proxy.Proxy
	rr   *balancer.RoundRobinBalancer
	addr string
	done chan error

	mu       sync.Mutex
	failures []string
}

func (s *setup) reported() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.failures...)
}

func startProxy(t *testing.T, set proxy.Settings, addrs ...string) *setup {
	t.Helper()
	return startProxyOn(t, "127.0.0.1:0", set, addrs...)
}

// startProxyOn is startProxy listening on listen.
func startProxyOn(t *testing.T, listen string, set proxy.Settings, addrs ...string) *setup {
	t.Helper()
	return startProxyAt(t, listen, &proxy.Proxy{}, set, nil, addrs...)
}

// startProxyWith is startProxy serving p (an Engine of the test's, say).
func startProxyWith(t *testing.T, p *proxy.Proxy, set proxy.Settings, addrs ...string) *setup {
	t.Helper()
	return startProxyAt(t, "127.0.0.1:0", p, set, nil, addrs...)
}

// startRoutedProxy is startProxy routing by server name with r.
func startRoutedProxy(t *testing.T, set proxy.Settings, r *proxy.Router) *setup {
	t.Helper()
	return startProxyAt(t, "127.0.0.1:0", &proxy.Proxy{}, set, r)
}

// startProxyAt serves p on listen with set, picking with r, or when r is
// nil from a rotation over addrs (s.rr).
func startProxyAt(t *testing.T, listen string, p *proxy.Proxy, set proxy.Settings, r *proxy.Router, addrs ...string) *setup {
	t.Helper()
	s := &setup{rr: &balancer.RoundRobinBalancer{}, done: make(chan error, 1)}
	ts := make([]*balancer.Target, len(addrs))
	for i, a := range addrs {
		ts[i] = balancer.NewTarget(a)
	}
	s.rr.Update(ts)
	s.p = p
	if r == nil {
		r = proxy.Single(s.rr)
	}
	p.ReportFailure = func(addr string, err error) {
		s.mu.Lock()
		s.failures = append(s.failures, addr)
		s.mu.Unlock()
	}
	s.p.Configure(set, r)
	if strings.HasSuffix(t.Name(), "/goroutines") {
		proxy.RelayWithGoroutines(s.p)
	}
	ln, err := proxy.Listen(listen)
	if err != nil {
		t.Fatal(err)
	}
	s.addr = ln.Addr().String()
	go func() { s.done <- s.p.Serve(ln) }()
	t.Cleanup(func() {
		s.p.Close()
		if err := <-s.done; !errors.Is(err, proxy.ErrClosed) {
			t.Errorf("Serve returned %v, want ErrClosed", err)
		}
	})
	return s
}

func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	return c.(*net.TCPConn)
}

// roundTrip sends msg, half-closes, and returns everything the peer sent.
func roundTrip(addr string, msg []byte) ([]byte, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write(msg); err != nil {
		return nil, err
	}
	c.(*net.TCPConn).CloseWrite()
	return io.ReadAll(c)
}

// bothRelays runs f twice: with the relay loops (on Linux) and with the
// goroutine relay, which startProxy picks from the subtest's name.
func bothRelays(t *testing.T, f func(t *testing.T)) {
	t.Run("loop", f)
	t.Run("goroutines", f)
}

func TestSequentialConnectionsSpreadExactlyEvenly(t *testing.T) {
	var addrs []string
	for i := range 3 {
		addrs = append(addrs, startBackend(t, nameHandler(fmt.Sprintf("backend-%d", i+1))).addr())
	}
	s := startProxy(t, proxy.Settings{}, addrs...)
	count := map[string]int{}
	for range 300 {
		got, err := roundTrip(s.addr, nil)
		if err != nil {
			t.Fatal(err)
		}
		count[string(got)]++
	}
	for i := range 3 {
		if n := count[fmt.Sprintf("backend-%d", i+1)]; n != 100 {
			t.Fatalf("spread %v, want 100 each", count)
		}
	}
	testenv.Eventually(t, "no active conns", 10*time.Second, func() bool { return s.p.ActiveConns() == 0 })
	if got := s.p.Stats.Accepted.Load(); got != 300 {
		t.Fatalf("accepted %d, want 300", got)
	}
}

func payload(n int) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{1})
	r.Read(b)
	return b
}

func TestHalfCloseClientFirst(t *testing.T) { bothRelays(t, testHalfCloseClientFirst) }

func testHalfCloseClientFirst(t *testing.T) {
	// The backend reads to EOF, then answers with a digest and a large body:
	// the client's CloseWrite must reach it without cutting the reply.
	reply := payload(4 << 20)
	be := startBackend(t, func(c net.Conn) {
		h := sha256.New()
		if _, err := io.Copy(h, c); err != nil {
			return
		}
		c.Write(h.Sum(nil))
		c.Write(reply)
	})
	s := startProxy(t, proxy.Settings{}, be.addr())
	msg := payload(3 << 20)
	got, err := roundTrip(s.addr, msg)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(msg)
	if len(got) != 32+len(reply) || !bytes.Equal(got[:32], sum[:]) || !bytes.Equal(got[32:], reply) {
		t.Fatalf("got %d bytes, want %d with matching digest and body", len(got), 32+len(reply))
	}
	testenv.Eventually(t, "byte counters", 10*time.Second, func() bool {
		return s.p.Stats.BytesOut.Load() == uint64(len(msg)) && s.p.Stats.BytesIn.Load() == uint64(32+len(reply))
	})
}

func TestHalfCloseBackendFirst(t *testing.T) { bothRelays(t, testHalfCloseBackendFirst) }

func testHalfCloseBackendFirst(t *testing.T) {
	// The backend sends everything and shuts its write side first, then keeps
	// reading: the client must still get all of its later bytes through.
	greeting := payload(2 << 20)
	be := startBackend(t, func(c net.Conn) {
		c.Write(greeting)
		c.(*net.TCPConn).CloseWrite()
		n, _ := io.Copy(io.Discard, c)
		// The write side is closed; report the count out of band below.
		countCh <- n
	})
	s := startProxy(t, proxy.Settings{}, be.addr())
	c := dial(t, s.addr)
	defer c.Close()
	got, err := io.ReadAll(c) // until the backend's EOF arrives through the proxy
	if err != nil || !bytes.Equal(got, greeting) {
		t.Fatalf("read %d bytes (%v), want %d", len(got), err, len(greeting))
	}
	msg := payload(3 << 20)
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("client write after backend half-close: %v", err)
	}
	c.CloseWrite()
	select {
	case n := <-countCh:
		if n != int64(len(msg)) {
			t.Fatalf("backend received %d bytes, want %d", n, len(msg))
		}
	case <-time.After(20 * time.Second):
		t.Fatal("backend never saw the client's EOF")
	}
}

var countCh = make(chan int64, 1)

func TestIdleTimeoutCutsSilentBackend(t *testing.T) { bothRelays(t, testIdleTimeoutCutsSilentBackend) }

func testIdleTimeoutCutsSilentBackend(t *testing.T) {
	hang := make(chan struct{})
	be := startBackend(t, func(c net.Conn) { <-hang })
	defer close(hang)
	s := startProxy(t, proxy.Settings{IdleTimeout: 200 * time.Millisecond}, be.addr())
	c := dial(t, s.addr)
	defer c.Close()
	c.Write([]byte("anyone there?"))
	start := time.Now()
	_, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("client read ended with %v, want EOF from the proxy", err)
	}
	if time.Since(start) < 200*time.Millisecond {
		t.Fatalf("cut after %v, before the idle timeout", time.Since(start))
	}
	testenv.Eventually(t, "connection released", 10*time.Second, func() bool { return s.p.ActiveConns() == 0 })
}

func TestIdleTimeoutSparesBusyConnection(t *testing.T) {
	bothRelays(t, testIdleTimeoutSparesBusyConnection)
}

func testIdleTimeoutSparesBusyConnection(t *testing.T) {
	be := startBackend(t, echoHandler)
	s := startProxy(t, proxy.Settings{IdleTimeout: 150 * time.Millisecond}, be.addr())
	c := dial(t, s.addr)
	defer c.Close()
	// Traffic every 50ms for well over the idle timeout keeps it open.
	buf := make([]byte, 4)
	for i := range 12 {
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatalf("read %d: %v (cut while busy)", i, err)
		}
		time.Sleep(50 * time.Millisecond) // pacing traffic, not synchronisation
	}
}

func TestResettingBackendCostsNoClient(t *testing.T) {
	bothRelays(t, testResettingBackendCostsNoClient)
}

func testResettingBackendCostsNoClient(t *testing.T) {
	bad := startBackend(t, resetHandler)
	good := startBackend(t, echoHandler)
	s := startProxy(t, proxy.Settings{Retries: 2, ReplayOnReset: true}, bad.addr(), good.addr())
	for i := range 50 {
		msg := []byte(fmt.Sprintf("request %d", i))
		got, err := roundTrip(s.addr, msg)
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("client %d: got %q (%v), want echo", i, got, err)
		}
	}
	if bad.accepts.Load() == 0 {
		t.Fatal("the resetting backend was never tried; the test proves nothing")
	}
	// Each attempt on the resetting backend ended one of two ways: reset
	// before the request reached it (a dying instance: reported, the next
	// target tried) or after (replayed to the next target, not reported:
	// the data path cannot tell a dead target from a refused request).
	reported, replays := s.p.Stats.DialErrors.Load(), s.p.Stats.Replays.Load()
	if reported+replays != uint64(bad.accepts.Load()) {
		t.Fatalf("%d attempts on the resetting backend, %d reported + %d replayed", bad.accepts.Load(), reported, replays)
	}
	for _, a := range s.reported() {
		if a != bad.addr() {
			t.Fatalf("the good backend %s was reported", a)
		}
	}
}

func TestRefusedDialRetriesNextTarget(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	good := startBackend(t, echoHandler)
	s := startProxy(t, proxy.Settings{Retries: 1}, dead, good.addr())
	for i := range 20 {
		got, err := roundTrip(s.addr, []byte("x"))
		if err != nil || string(got) != "x" {
			t.Fatalf("client %d failed: %q %v", i, got, err)
		}
	}
	rep := s.reported()
	if len(rep) == 0 || rep[0] != dead {
		t.Fatalf("reported %v, want %s", rep, dead)
	}
	if got := s.p.Stats.DialErrors.Load(); got != uint64(len(rep)) {
		t.Fatalf("dial errors %d, reports %d", got, len(rep))
	}
}

// A target given by name is resolved and dialled like an address.
func TestTargetByName(t *testing.T) { bothRelays(t, testTargetByName) }

func testTargetByName(t *testing.T) {
	be := startBackend(t, echoHandler)
	_, port, _ := net.SplitHostPort(be.addr())
	s := startProxy(t, proxy.Settings{}, "localhost:"+port)
	for i := range 5 {
		msg := []byte(fmt.Sprintf("by name %d", i))
		got, err := roundTrip(s.addr, msg)
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("got %q (%v), want echo", got, err)
		}
	}
}

// IPv6 clients and targets work like IPv4 ones, and a PROXY header names
// the IPv6 client.
func TestIPv6(t *testing.T) { bothRelays(t, testIPv6) }

func testIPv6(t *testing.T) {
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	got := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		br := bufio.NewReader(c)
		header, _ := br.ReadString('\n')
		msg := make([]byte, 4)
		io.ReadFull(br, msg)
		got <- header + string(msg)
		c.Write([]byte("pong"))
	}()
	defer ln.Close()
	s := startProxyOn(t, "[::1]:0", proxy.Settings{ProxyProtocol: 1}, ln.Addr().String())
	c, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte("ping"))
	reply, err := io.ReadAll(c)
	if err != nil || string(reply) != "pong" {
		t.Fatalf("reply %q, %v", reply, err)
	}
	client := c.LocalAddr().(*net.TCPAddr)
	want := fmt.Sprintf("PROXY TCP6 ::1 ::1 %d %d\r\nping", client.Port, c.RemoteAddr().(*net.TCPAddr).Port)
	if h := <-got; h != want {
		t.Fatalf("target got %q, want %q", h, want)
	}
}

func TestDialTimeoutTriesNextTarget(t *testing.T) { bothRelays(t, testDialTimeoutTriesNextTarget) }

func testDialTimeoutTriesNextTarget(t *testing.T) {
	stuck := testenv.StuckListener(t)
	good := startBackend(t, echoHandler)
	s := startProxy(t, proxy.Settings{Retries: 1, DialTimeout: 150 * time.Millisecond}, stuck, good.addr())
	// Round-robin starts each client at the next target: two clients
	// meet the stuck one first at least once.
	for i := range 2 {
		got, err := roundTrip(s.addr, []byte("through"))
		if err != nil || string(got) != "through" {
			t.Fatalf("client %d: got %q (%v), want echo from the good target", i, got, err)
		}
	}
	if rep := s.reported(); len(rep) != 1 || rep[0] != stuck {
		t.Fatalf("reported %v, want the stuck target %s once", rep, stuck)
	}
}

func TestRetriesBounded(t *testing.T) {
	var dead []string
	for range 4 {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		dead = append(dead, ln.Addr().String())
		ln.Close()
	}
	s := startProxy(t, proxy.Settings{Retries: 1}, dead...)
	c := dial(t, s.addr)
	if _, err := io.ReadAll(c); err != nil {
		t.Fatalf("client not closed cleanly: %v", err)
	}
	c.Close()
	if n := len(s.reported()); n != 2 {
		t.Fatalf("tried %d targets, want 1 + retries = 2", n)
	}
	if s.p.Stats.NoTarget.Load() != 1 {
		t.Fatal("NoTarget not counted")
	}
}

func TestNoTargetClosesClientAtOnce(t *testing.T) {
	s := startProxy(t, proxy.Settings{})
	c := dial(t, s.addr)
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c); err != nil {
		t.Fatalf("want prompt EOF, got %v", err)
	}
	if s.p.Stats.NoTarget.Load() != 1 {
		t.Fatal("NoTarget not counted")
	}
}

func TestMaxConnsRejectsExcess(t *testing.T) {
	be := startBackend(t, echoHandler)
	s := startProxy(t, proxy.Settings{MaxConns: 1}, be.addr())
	first := dial(t, s.addr)
	defer first.Close()
	first.Write([]byte("a"))
	buf := make([]byte, 1)
	if _, err := io.ReadFull(first, buf); err != nil {
		t.Fatal(err)
	}
	second := dial(t, s.addr)
	defer second.Close()
	if _, err := io.ReadAll(second); err != nil {
		t.Fatalf("excess client: %v, want EOF", err)
	}
	if s.p.Stats.Rejected.Load() != 1 {
		t.Fatalf("rejected = %d", s.p.Stats.Rejected.Load())
	}
	// The first connection is unaffected.
	first.Write([]byte("b"))
	if _, err := io.ReadFull(first, buf); err != nil || buf[0] != 'b' {
		t.Fatalf("first connection broken: %v", err)
	}
}

// flakyListener fails Accept with EMFILE a few times, recording when.
type flakyListener struct {
	net.Listener
	mu    sync.Mutex
	fails int
	at    []time.Time
}

func (l *flakyListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	l.at = append(l.at, time.Now())
	if l.fails > 0 {
		l.fails--
		l.mu.Unlock()
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	}
	l.mu.Unlock()
	return l.Listener.Accept()
}

func TestAcceptBacksOffOnEMFILE(t *testing.T) {
	be := startBackend(t, echoHandler)
	inner, _ := net.Listen("tcp", "127.0.0.1:0")
	fl := &flakyListener{Listener: inner, fails: 6}
	rr := &balancer.RoundRobinBalancer{}
	rr.Update([]*balancer.Target{balancer.NewTarget(be.addr())})
	p := &proxy.Proxy{}
	p.Configure(proxy.Settings{}, proxy.Single(rr))
	done := make(chan error, 1)
	go func() { done <- p.Serve(fl) }()
	got, err := roundTrip(inner.Addr().String(), []byte("hi"))
	if err != nil || string(got) != "hi" {
		t.Fatalf("proxy did not recover from EMFILE: %q %v", got, err)
	}
	p.Close()
	<-done
	fl.mu.Lock()
	defer fl.mu.Unlock()
	// 6 failures then the real accept: gaps must double from 5ms.
	want := 5 * time.Millisecond
	for i := 1; i <= 6; i++ {
		if gap := fl.at[i].Sub(fl.at[i-1]); gap < want {
			t.Fatalf("accept %d came %v after a failure, want >= %v (spinning)", i, gap, want)
		}
		want *= 2
	}
}

func TestShutdownDrainsOpenConnections(t *testing.T) {
	bothRelays(t, testShutdownDrainsOpenConnections)
}

func testShutdownDrainsOpenConnections(t *testing.T) {
	release := make(chan struct{})
	be := startBackend(t, func(c net.Conn) {
		buf := make([]byte, 5)
		io.ReadFull(c, buf)
		<-release
		c.Write(buf)
	})
	s := startProxy(t, proxy.Settings{}, be.addr())
	c := dial(t, s.addr)
	defer c.Close()
	c.Write([]byte("hello"))
	testenv.Eventually(t, "connection open", 10*time.Second, func() bool { return s.p.ActiveConns() == 1 })

	shut := make(chan error, 1)
	go func() { shut <- s.p.Shutdown(context.Background()) }()
	// New clients are refused while the old one drains.
	testenv.Eventually(t, "listener closed", 10*time.Second, func() bool {
		c2, err := net.Dial("tcp", s.addr)
		if err != nil {
			return true
		}
		c2.Close()
		return false
	})
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned %v with a connection still open", err)
	default:
	}
	close(release)
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("draining connection cut: %q %v", buf, err)
	}
	c.CloseWrite()
	if err := <-shut; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

func TestShutdownCutsAfterDeadline(t *testing.T) { bothRelays(t, testShutdownCutsAfterDeadline) }

func testShutdownCutsAfterDeadline(t *testing.T) {
	hang := make(chan struct{})
	be := startBackend(t, func(c net.Conn) { <-hang })
	defer close(hang)
	s := startProxy(t, proxy.Settings{}, be.addr())
	c := dial(t, s.addr)
	defer c.Close()
	testenv.Eventually(t, "connection open", 10*time.Second, func() bool { return s.p.ActiveConns() == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := s.p.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want DeadlineExceeded", err)
	}
	if _, err := io.ReadAll(c); err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client not closed: %v", err)
	}
}

func TestNoGoroutineOutlivesServe(t *testing.T) {
	before := goleak.IgnoreCurrent()
	be := startBackend(t, echoHandler)
	rr := &balancer.RoundRobinBalancer{}
	rr.Update([]*balancer.Target{balancer.NewTarget(be.addr())})
	p := &proxy.Proxy{}
	p.Configure(proxy.Settings{IdleTimeout: time.Minute}, proxy.Single(rr))
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	done := make(chan error, 1)
	go func() { done <- p.Serve(ln) }()
	var conns []net.Conn
	for range 20 {
		c := dial(t, ln.Addr().String())
		c.Write([]byte("x"))
		buf := make([]byte, 1)
		io.ReadFull(c, buf)
		conns = append(conns, c) // left open: Shutdown must cut them
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	p.Shutdown(ctx)
	<-done
	for _, c := range conns {
		c.Close()
	}
	be.stop()
	goleak.VerifyNone(t, before)
}

func TestConcurrentLoadIntegrity(t *testing.T) { bothRelays(t, testConcurrentLoadIntegrity) }

func testConcurrentLoadIntegrity(t *testing.T) {
	var addrs []string
	for range 3 {
		addrs = append(addrs, startBackend(t, echoHandler).addr())
	}
	s := startProxy(t, proxy.Settings{IdleTimeout: time.Minute}, addrs...)
	var wg sync.WaitGroup
	var failed atomic.Int64
	for w := range 16 {
		wg.Go(func() {
			for i := range 20 {
				msg := payload(1 + (w*31+i*977)%200000)
				got, err := roundTrip(s.addr, msg)
				if err != nil || !bytes.Equal(got, msg) {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if failed.Load() != 0 {
		t.Fatalf("%d of 320 exchanges corrupted or failed", failed.Load())
	}
}
