package proxy_test

import (
	"io"
	"net"
	"runtime"
	"testing"

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
