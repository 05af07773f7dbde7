package health

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/rota-proxy/rota/internal/testenv"
)

// startProbe hands pr one probe of ap; its result comes on the channel.
func startProbe(t *testing.T, pr *tcpProber, ap netip.AddrPort, timeout time.Duration) <-chan error {
	t.Helper()
	errc := make(chan error, 1)
	if !pr.start([]tcpJob{{addr: ap, timeout: timeout, done: func(err error) { errc <- err }}}) {
		t.Fatal("prober closed")
	}
	return errc
}

// result waits for a probe's result.
func result(t *testing.T, errc <-chan error) error {
	t.Helper()
	select {
	case err := <-errc:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("probe did not end")
		return nil
	}
}

// idleSockets is the descriptors of pr's idle IPv4 sockets, read on its
// loop (which runs posts in order, so after every probe started before).
func idleSockets(pr *tcpProber) []int {
	got := make(chan []int, 1)
	pr.p.Post(func() {
		var fds []int
		for _, s := range pr.idle[0] {
			fds = append(fds, s.fd.Num())
		}
		got <- fds
	})
	return <-got
}

func startProber(t *testing.T) *tcpProber {
	t.Helper()
	pr, err := newTCPProber(nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pr.close)
	return pr
}

// A probe's socket serves the next probe of its family: it is kept after a
// probe ends, disconnected (the target reads a reset, as from a closed
// check), and the next probe connects it again rather than opening one, in
// the same registration.
func TestProbeSocketsAreUsedAgain(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pr := startProber(t)
	ap := netip.MustParseAddrPort(ln.Addr().String())
	var kept []int
	for i := range 5 {
		if err := result(t, startProbe(t, pr, ap, 5*time.Second)); err != nil {
			t.Fatalf("probe: %v", err)
		}
		now := idleSockets(pr)
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

// A socket used again also waits again: a probe that timed out on a target
// whose accept queue is full leaves its socket idle, and the next probe on
// it, answered only when the kernel retries its SYN after the queue has
// room, ends through the same registration, connected, not on an event the
// timed-out connect or its disconnect left behind.
func TestProbeSocketUsedAgainWaitsForItsOwnAnswer(t *testing.T) {
	addr, makeRoom := testenv.StuckListenerWithRoom(t)
	ap := netip.MustParseAddrPort(addr)
	pr := startProber(t)
	if err := result(t, startProbe(t, pr, ap, 300*time.Millisecond)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a probe of a full queue: %v, want a timeout", err)
	}
	errc := startProbe(t, pr, ap, 5*time.Second) // the idle socket, its SYN dropped
	if n := len(idleSockets(pr)); n != 0 {       // read after the connect started
		t.Fatalf("%d idle sockets while the second probe runs, want its one in use", n)
	}
	makeRoom() // for the retried SYN
	start := time.Now()
	if err := result(t, errc); err != nil {
		t.Fatalf("the second probe: %v", err)
	}
	took := time.Since(start)
	t.Logf("answered %v after the queue had room", took)
	if took < 100*time.Millisecond {
		t.Fatalf("answered after %v: the connect did not wait for the retried SYN", took)
	}
	if n := len(idleSockets(pr)); n != 1 {
		t.Fatalf("%d idle sockets after two probes in turn, want the one used twice", n)
	}
}
