package proxy_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/proxy"
)

// pattern is n bytes of id, repeated: a stream no other client sends.
func pattern(id uint32, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 4 {
		binary.BigEndian.PutUint32(b[i:], id)
	}
	return b
}

// A target that speaks first while thousands of clients stream their own
// bytes, with replay on (the held-bytes path): every target connection
// receives exactly its client's bytes, and every client its own reply.
func TestStreamsNeverCross(t *testing.T) { bothRelays(t, testStreamsNeverCross) }

func testStreamsNeverCross(t *testing.T) {
	const (
		clients  = 3000
		parallel = 200
		size     = 100_000
	)
	var crossed atomic.Int64
	be := startBackend(t, func(c net.Conn) {
		c.Write([]byte("ready\n")) // the target speaks first
		got, err := io.ReadAll(c)
		if err != nil || len(got) != size {
			crossed.Add(1)
			return
		}
		id := binary.BigEndian.Uint32(got)
		if !bytes.Equal(got, pattern(id, size)) {
			crossed.Add(1)
			return
		}
		fmt.Fprintf(c, "%08x", id)
	})
	// A generous dial timeout: under -race on a loaded machine a dial can
	// take seconds, and a dial given up is not what this test is about.
	s := startProxy(t, proxy.Settings{ReplayOnReset: true, IdleTimeout: time.Minute, DialTimeout: time.Minute}, be.addr())
	var wg sync.WaitGroup
	var failed atomic.Int64
	var firstErr atomic.Pointer[error]
	ids := make(chan uint32)
	for range parallel {
		wg.Go(func() {
			for id := range ids {
				err := func() error {
					c, err := net.Dial("tcp", s.addr)
					if err != nil {
						return err
					}
					defer c.Close()
					c.SetDeadline(time.Now().Add(time.Minute))
					if _, err := c.Write(pattern(id, size)); err != nil {
						return err
					}
					c.(*net.TCPConn).CloseWrite()
					got, err := io.ReadAll(c)
					if err != nil {
						return err
					}
					if want := fmt.Sprintf("ready\n%08x", id); string(got) != want {
						return fmt.Errorf("client %d got %q, want %q", id, got, want)
					}
					return nil
				}()
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, &err)
				}
			}
		})
	}
	for id := range uint32(clients) {
		ids <- id + 1
	}
	close(ids)
	wg.Wait()
	if n := crossed.Load(); n != 0 {
		t.Fatalf("%d target connections received bytes that were not exactly their client's (dial errors %d, refused %d)",
			n, s.p.Stats.DialErrors.Load(), s.p.Stats.NoTarget.Load())
	}
	if n := failed.Load(); n != 0 {
		t.Fatalf("%d of %d clients failed; first: %v (dial errors %d, refused %d)",
			n, clients, *firstErr.Load(), s.p.Stats.DialErrors.Load(), s.p.Stats.NoTarget.Load())
	}
}

// orderedPicker offers its targets in the order given, every time.
type orderedPicker struct{ rr balancer.RoundRobinBalancer }

func newOrderedPicker(addrs ...string) *orderedPicker {
	p := &orderedPicker{}
	ts := make([]*balancer.Target, len(addrs))
	for i, a := range addrs {
		ts[i] = balancer.NewTarget(a)
	}
	p.rr.Update(ts)
	return p
}

func (p *orderedPicker) PickFor(netip.Addr, string) balancer.Cursor { return p.Pick() }

func (p *orderedPicker) Pick() balancer.Cursor {
	first := p.rr.Live()[0]
	for {
		c := p.rr.Pick()
		probe := c
		if probe.Next() == first {
			return c
		}
	}
}

// serveWith runs a proxy with picker and settings on a fresh listener.
func serveWith(t *testing.T, r *proxy.Router, set proxy.Settings, goroutines bool) (*proxy.Proxy, string) {
	t.Helper()
	p := &proxy.Proxy{}
	p.Configure(set, r)
	if goroutines {
		proxy.RelayWithGoroutines(p)
	}
	ln, err := proxy.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Serve(ln) }()
	t.Cleanup(func() {
		p.Close()
		<-done
	})
	return p, ln.Addr().String()
}

func isGoroutines(t *testing.T) bool { return bytes.HasSuffix([]byte(t.Name()), []byte("/goroutines")) }

// A target that reads the request line, acts on it, and closes with more
// of the client's bytes unread (so its kernel sends a reset): by default the
// request runs once and the client sees the reset; with ReplayOnReset the
// next target gets the request too (at-least-once).
func TestResetAfterTheRequestReachedTheTarget(t *testing.T) {
	bothRelays(t, testResetAfterTheRequestReachedTheTarget)
}

func testResetAfterTheRequestReachedTheTarget(t *testing.T) {
	for _, replay := range []bool{false, true} {
		t.Run(fmt.Sprintf("replay=%v", replay), func(t *testing.T) {
			var acted atomic.Int64
			actor := startBackend(t, func(c net.Conn) {
				var b [1]byte
				for {
					if _, err := c.Read(b[:]); err != nil || b[0] == '\n' {
						break
					}
				}
				acted.Add(1) // the request ran
			})
			good := startBackend(t, func(c net.Conn) {
				line := make([]byte, 0, 16)
				var b [1]byte
				for {
					if _, err := c.Read(b[:]); err != nil || b[0] == '\n' {
						break
					}
					line = append(line, b[0])
				}
				io.ReadFull(c, make([]byte, 4096)) // the body: read all, so it closes cleanly
				acted.Add(1)
				io.WriteString(c, "done "+string(line))
			})
			_, addr := serveWith(t, proxy.Single(newOrderedPicker(actor.addr(), good.addr())),
				proxy.Settings{Retries: 1, ReplayOnReset: replay}, isGoroutines(t))
			c := dial(t, addr)
			defer c.Close()
			// The line and a body the actor never reads.
			if _, err := c.Write(append([]byte("POST /pay\n"), make([]byte, 4096)...)); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(c)
			if !replay {
				if !errors.Is(err, syscall.ECONNRESET) || len(got) != 0 {
					t.Fatalf("client read %q, %v; want the target's reset", got, err)
				}
				if n := acted.Load(); n != 1 {
					t.Fatalf("the request ran %d times, want once", n)
				}
				return
			}
			if err != nil || string(got) != "done POST /pay" {
				t.Fatalf("client read %q, %v; want the next target's answer", got, err)
			}
			if n := acted.Load(); n != 2 {
				t.Fatalf("the request ran %d times; with replay it runs on both", n)
			}
		})
	}
}

// A panic while relaying one connection closes that connection only: the
// others keep transferring, and the panic is counted.
func TestPanicClosesOnlyItsConnection(t *testing.T) { bothRelays(t, testPanicClosesOnlyItsConnection) }

func testPanicClosesOnlyItsConnection(t *testing.T) {
	be := startBackend(t, echoHandler)
	p := &proxy.Proxy{}
	proxy.PanicOn(p, func(b []byte) bool { return bytes.Contains(b, []byte("PANIC")) })
	s := startProxyWith(t, p, proxy.Settings{}, be.addr())
	var others []*net.TCPConn
	for range 5 {
		c := dial(t, s.addr)
		defer c.Close()
		others = append(others, c)
	}
	echo := func(c *net.TCPConn, msg string) error {
		if _, err := c.Write([]byte(msg)); err != nil {
			return err
		}
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(c, buf); err != nil {
			return err
		}
		if string(buf) != msg {
			return fmt.Errorf("echo %q, want %q", buf, msg)
		}
		return nil
	}
	for _, c := range others {
		if err := echo(c, "before"); err != nil {
			t.Fatal(err)
		}
	}
	bad := dial(t, s.addr)
	defer bad.Close()
	bad.Write([]byte("PANIC now"))
	if got, _ := io.ReadAll(bad); len(got) != 0 {
		t.Fatalf("the panicking connection relayed %q", got)
	}
	testenv.Eventually(t, "the panic counted", 10*time.Second, func() bool { return s.p.Stats.Panics.Load() == 1 })
	for i, c := range others {
		if err := echo(c, fmt.Sprintf("after %d", i)); err != nil {
			t.Fatalf("connection %d after another's panic: %v", i, err)
		}
	}
	testenv.Eventually(t, "the panicked connection released", 10*time.Second, func() bool { return s.p.ActiveConns() == int64(len(others)) })
}

// MaxConns holds exactly while many loops accept at once.
func TestMaxConnsExactUnderConcurrency(t *testing.T) {
	const max, clients = 10, 300
	var open, peak atomic.Int64
	release := make(chan struct{})
	be := startBackend(t, func(c net.Conn) {
		n := open.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		<-release
		open.Add(-1)
	})
	engine := proxy.NewEngine(8, nil)
	defer engine.Close()
	p := &proxy.Proxy{Engine: engine}
	p.Configure(proxy.Settings{MaxConns: max}, proxy.Single(newOrderedPicker(be.addr())))
	ln, err := proxy.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Serve(ln) }()
	defer func() {
		close(release)
		p.Close()
		<-done
	}()
	var wg sync.WaitGroup
	start := make(chan struct{})
	conns := make(chan net.Conn, clients)
	for range clients {
		wg.Go(func() {
			<-start
			if c, err := net.Dial("tcp", ln.Addr().String()); err == nil {
				conns <- c
			}
		})
	}
	close(start)
	wg.Wait()
	close(conns)
	defer func() {
		for c := range conns {
			c.Close()
		}
	}()
	testenv.Eventually(t, "every client admitted or rejected", 10*time.Second, func() bool {
		return p.Stats.Accepted.Load() == clients && p.Stats.Rejected.Load()+uint64(be.accepts.Load()) == clients
	})
	if got := be.accepts.Load(); got != max {
		t.Fatalf("%d connections reached the backend, want exactly max_conns = %d", got, max)
	}
	if peak.Load() > max || p.ActiveConns() != max {
		t.Fatalf("peak %d, active %d, want at most %d", peak.Load(), p.ActiveConns(), max)
	}
}

// Shutdown under a connect storm ends within the drain budget, every time.
func TestShutdownUnderConnectStorm(t *testing.T) { bothRelays(t, testShutdownUnderConnectStorm) }

func testShutdownUnderConnectStorm(t *testing.T) {
	be := startBackend(t, echoHandler)
	for trial := range 20 {
		var addrs []string
		if trial%2 == 0 { // half with a live target, half with none
			addrs = []string{be.addr()}
		}
		rr := &balancer.RoundRobinBalancer{}
		var ts []*balancer.Target
		for _, a := range addrs {
			ts = append(ts, balancer.NewTarget(a))
		}
		rr.Update(ts)
		p, addr := serveWith(t, proxy.Single(rr), proxy.Settings{}, isGoroutines(t))
		storm := testenv.StartStorm(addr, 8, []byte("x"))
		testenv.Eventually(t, "the storm under way", 10*time.Second, func() bool { return storm.Attempts() > 200 })
		const drain = 500 * time.Millisecond
		ctx, cancel := context.WithTimeout(context.Background(), drain)
		began := time.Now()
		shut := make(chan error, 1)
		go func() { shut <- p.Shutdown(ctx) }()
		select {
		case <-shut:
		case <-time.After(drain + time.Second):
			storm.Stop()
			cancel()
			t.Fatalf("trial %d: Shutdown still running %v after SIGTERM under a connect storm", trial, time.Since(began))
		}
		took := time.Since(began)
		storm.Stop()
		cancel()
		if took > drain+time.Second {
			t.Fatalf("trial %d: Shutdown took %v", trial, took)
		}
		if p.ActiveConns() != 0 {
			t.Fatalf("trial %d: %d connections left after Shutdown", trial, p.ActiveConns())
		}
	}
}

// Clients that connect and close without a word (load balancers' checks,
// port scanners) make the target close in answer: that is no failure of the
// target's, which stays in rotation.
func TestSilentClientsDoNotFailTheTarget(t *testing.T) {
	bothRelays(t, testSilentClientsDoNotFailTheTarget)
}

func testSilentClientsDoNotFailTheTarget(t *testing.T) {
	be := startBackend(t, func(c net.Conn) { io.Copy(io.Discard, c) }) // closes at EOF
	s := startProxy(t, proxy.Settings{}, be.addr())
	for range 50 {
		c := dial(t, s.addr)
		c.CloseWrite()
		if _, err := io.ReadAll(c); err != nil {
			t.Fatalf("silent client: %v", err)
		}
		c.Close()
	}
	if r := s.reported(); len(r) != 0 || s.p.Stats.DialErrors.Load() != 0 {
		t.Fatalf("the target was reported failing %d times", len(r))
	}
}

// Shutdown of a routed proxy while a storm of clients sit in the middle of
// their ClientHello (half of it sent, the rest never: sni_timeout far off)
// ends within the drain budget and leaves no connection behind: the
// prelude's clients are drained and cut like relayed ones.
func TestShutdownUnderConnectStormMidClientHello(t *testing.T) {
	bothRelays(t, testShutdownUnderConnectStormMidClientHello)
}

func testShutdownUnderConnectStormMidClientHello(t *testing.T) {
	be := startBackend(t, echoHandler)
	hello := testenv.ClientHello(t, "api.example.com")
	half := hello[:len(hello)/2]
	for trial := range 6 {
		rr := &balancer.RoundRobinBalancer{}
		rr.Update([]*balancer.Target{balancer.NewTarget(be.addr())})
		router := proxy.NewRouter([]proxy.Route{{SNI: []string{"api.example.com"}, Picker: rr}})
		p, addr := serveWith(t, router, proxy.Settings{SNITimeout: time.Minute}, isGoroutines(t))
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var waiting atomic.Int64
		for range 8 {
			wg.Go(func() {
				var held []net.Conn
				defer func() {
					for _, c := range held {
						c.Close()
					}
				}()
				for len(held) < 150 {
					select {
					case <-stop:
						return
					default:
					}
					c, err := net.DialTimeout("tcp", addr, time.Second)
					if err != nil {
						continue // refused once the listener closed
					}
					held = append(held, c)
					if _, err := c.Write(half); err == nil {
						waiting.Add(1)
					}
				}
				<-stop
			})
		}
		testenv.Eventually(t, "clients waiting mid-ClientHello", 10*time.Second, func() bool { return waiting.Load() > 300 && p.ActiveConns() > 100 })
		const drain = 500 * time.Millisecond
		ctx, cancel := context.WithTimeout(context.Background(), drain)
		began := time.Now()
		shut := make(chan error, 1)
		go func() { shut <- p.Shutdown(ctx) }()
		var took time.Duration
		select {
		case <-shut:
			took = time.Since(began)
		case <-time.After(drain + time.Second):
			took = time.Since(began)
		}
		close(stop)
		wg.Wait()
		cancel()
		if took > drain+time.Second {
			t.Fatalf("trial %d: Shutdown still running %v after it began, clients mid-ClientHello", trial, took)
		}
		if n := p.ActiveConns(); n != 0 {
			t.Fatalf("trial %d: %d connections left after Shutdown", trial, n)
		}
	}
}

// A panic while a connection starts (its access checked, in the loop that
// accepted it or the one it was handed to) closes that connection only:
// every loop goes on accepting, and the connection is released.
func TestPanicAtStartClosesOnlyItsConnection(t *testing.T) {
	bothRelays(t, testPanicAtStartClosesOnlyItsConnection)
}

func testPanicAtStartClosesOnlyItsConnection(t *testing.T) {
	be := startBackend(t, echoHandler)
	p := &proxy.Proxy{}
	bad := netip.MustParseAddr("127.0.0.3")
	proxy.PanicOnAccess(p, func(a netip.Addr) bool { return a == bad })
	s := startProxyWith(t, p, proxy.Settings{}, be.addr())
	const n = 40 // enough to start some on each loop, accepted there or handed over
	for i := range n {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: bad.AsSlice()}, Timeout: 5 * time.Second}
		c, err := d.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if len(got) != 0 || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("panicking client %d: read %q, %v; want its connection closed at once", i, got, err)
		}
		msg := []byte(fmt.Sprintf("after %d", i))
		if got, err := roundTrip(s.addr, msg); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("a client after %d panics: %q, %v", i+1, got, err)
		}
	}
	testenv.Eventually(t, "every panic counted", 10*time.Second, func() bool { return s.p.Stats.Panics.Load() == n })
	testenv.Eventually(t, "every connection released", 10*time.Second, func() bool { return s.p.ActiveConns() == 0 })
}

// A backend killed under load (a crash: its listener and every connection
// it has not answered reset at once) costs no client, with either driver:
// attempts on the dying instance are retried, requests it took replayed.
func TestBackendKilledUnderLoad(t *testing.T) { bothRelays(t, testBackendKilledUnderLoad) }

func testBackendKilledUnderLoad(t *testing.T) {
	b1, b2, b3 := testenv.StartBackend(t, "b1"), testenv.StartBackend(t, "b2"), testenv.StartBackend(t, "b3")
	s := startProxy(t, proxy.Settings{Retries: 2, ReplayOnReset: true}, b1.Addr, b2.Addr, b3.Addr)
	ld := testenv.StartLoad(8, 20000, func(int) (string, error) { return testenv.Request(s.addr) })
	t.Cleanup(ld.Stop)
	testenv.Eventually(t, "traffic on b2", 10*time.Second, func() bool { return ld.Count("b2") > 50 })
	b2.Kill()
	before := ld.OK.Load()
	testenv.Eventually(t, "traffic after the kill", 10*time.Second, func() bool { return ld.OK.Load() > before+300 })
	ld.Stop()
	ld.AssertNoFailures(t)
	if ld.Count("b1") == 0 || ld.Count("b3") == 0 {
		t.Fatal("the survivors took no traffic")
	}
}
