package health

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

// A probe's socket serves the next probe of its family: it is kept after a
// probe ends, disconnected (the target reads a reset, as from a closed
// check), and the next probe connects it again rather than opening one.
func TestProbeSocketsAreUsedAgain(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pr, err := newTCPProber(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pr.close()
	ap := netip.MustParseAddrPort(ln.Addr().String())
	probe := func() {
		t.Helper()
		errc := make(chan error, 1)
		if !pr.start([]tcpJob{{addr: ap, timeout: 5 * time.Second, done: func(err error) { errc <- err }}}) {
			t.Fatal("prober closed")
		}
		select {
		case err := <-errc:
			if err != nil {
				t.Fatalf("probe: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("probe did not end")
		}
	}
	idle := func() []int {
		got := make(chan []int, 1)
		pr.p.Post(func() { got <- append([]int(nil), pr.idle[0]...) })
		return <-got
	}
	var kept []int
	for i := range 5 {
		probe()
		now := idle()
		if len(now) != 1 || (i > 0 && now[0] != kept[0]) {
			t.Fatalf("after probe %d the idle sockets are %v, want the one kept before (%v)", i+1, now, kept)
		}
		kept = now
		ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("probe %d: the target read %v, want a reset", i+1, err)
		}
		c.Close()
	}
}
