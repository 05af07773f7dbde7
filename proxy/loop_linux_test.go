package proxy_test

import (
	"errors"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/proxy"
)

// On Linux an open connection is two descriptors in a relay loop, not
// goroutines: a thousand idle clients must not cost a thousand stacks,
// whether they have spoken yet or not.
func TestIdleConnectionsHoldNoGoroutines(t *testing.T) {
	be := startBackend(t, echoHandler)
	s := startProxy(t, proxy.Settings{}, be.addr())
	warm := dial(t, s.addr) // starts the loops
	defer warm.Close()
	warm.Write([]byte("x"))
	io.ReadFull(warm, make([]byte, 1))

	// The backend runs in this process too, with a goroutine per
	// connection; count the proxy's share by subtracting it.
	base := runtime.NumGoroutine() - int(be.accepts.Load())
	const n = 200
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := range n {
		c := dial(t, s.addr)
		conns = append(conns, c)
		if i%2 == 0 { // half of them exchange a byte first
			c.Write([]byte("y"))
			if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
		}
	}
	eventually(t, "all connections relayed", func() bool {
		return s.p.ActiveConns() == n+1 && be.accepts.Load() == n+1
	})
	eventually(t, "handler goroutines gone", func() bool {
		return runtime.NumGoroutine()-int(be.accepts.Load())-base < n/10
	})
}

// Closing a proxy.Listener from outside (as a reload moving to a new
// address does) ends Serve, while connections it accepted carry on.
func TestClosingListenerEndsServeKeepsConnections(t *testing.T) {
	be := startBackend(t, echoHandler)
	rr := &balancer.RoundRobin{}
	rr.Update([]*balancer.Target{balancer.NewTarget(be.addr())})
	p := &proxy.Proxy{Picker: rr}
	defer p.Close()
	ln, err := proxy.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Serve(ln) }()
	c := dial(t, ln.Addr().String())
	defer c.Close()
	if _, err := c.Write([]byte("before")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	ln.Close()
	// Serve waits for its connections: it returns once c is done.
	if _, err := c.Write([]byte("after!")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "after!" {
		t.Fatalf("connection after the listener closed: %q %v", buf, err)
	}
	if _, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		t.Fatal("closed listener still accepts")
	}
	c.CloseWrite()
	io.ReadAll(c)
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Serve returned %v, want net.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after its listener was closed")
	}
}
