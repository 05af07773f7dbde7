package health

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"
)

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
		pr.p.Post(func() {
			var fds []int
			for _, s := range pr.idle[0] {
				fds = append(fds, s.fd.Num())
			}
			got <- fds
		})
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

// A socket used again also waits again: a probe that timed out on a target
// whose accept queue is full leaves its socket idle, and the next probe on
// it, answered only when the kernel retries its SYN after the queue has
// room, ends through the same registration, connected, not on an event the
// timed-out connect or its disconnect left behind.
func TestProbeSocketUsedAgainWaitsForItsOwnAnswer(t *testing.T) {
	lfd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(lfd)
	if err := syscall.Bind(lfd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(lfd, 0); err != nil { // room for one
		t.Fatal(err)
	}
	sa, _ := syscall.Getsockname(lfd)
	ap := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(sa.(*syscall.SockaddrInet4).Port))
	filler, err := net.Dial("tcp", ap.String())
	if err != nil {
		t.Fatal(err)
	}
	defer filler.Close()

	pr, err := newTCPProber(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pr.close()
	probe := func(timeout time.Duration) chan error {
		errc := make(chan error, 1)
		if !pr.start([]tcpJob{{addr: ap, timeout: timeout, done: func(err error) { errc <- err }}}) {
			t.Fatal("prober closed")
		}
		return errc
	}
	wait := func(errc chan error) error {
		select {
		case err := <-errc:
			return err
		case <-time.After(10 * time.Second):
			t.Fatal("probe did not end")
			return nil
		}
	}
	if err := wait(probe(300 * time.Millisecond)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a probe of a full queue: %v, want a timeout", err)
	}
	errc := probe(5 * time.Second) // the idle socket, its SYN dropped
	started := make(chan struct{})
	pr.p.Post(func() { close(started) }) // after the connect: the loop runs posts in order
	<-started
	// Room for the retried SYN: the filler leaves the queue.
	nfd, _, err := syscall.Accept(lfd)
	if err != nil {
		t.Fatal(err)
	}
	syscall.Close(nfd)
	start := time.Now()
	if err := wait(errc); err != nil {
		t.Fatalf("the second probe: %v", err)
	}
	took := time.Since(start)
	t.Logf("answered %v after the queue had room", took)
	if took < 100*time.Millisecond {
		t.Fatalf("answered after %v: the connect did not wait for the retried SYN", took)
	}
	var idle int
	done := make(chan struct{})
	pr.p.Post(func() { idle = len(pr.idle[0]); close(done) })
	<-done
	if idle != 1 {
		t.Fatalf("%d idle sockets after two probes in turn, want the one used twice", idle)
	}
}
