package testenv

import (
	"fmt"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// StuckListener returns the address of a loopback listener whose accept
// queue is full, so that the kernel drops the SYNs sent to it: a connect to
// it neither succeeds nor fails until its own timeout. It is closed when
// the test ends.
func StuckListener(t testing.TB) string {
	t.Helper()
	addr, _ := StuckListenerWithRoom(t)
	return addr
}

// StuckListenerWithRoom is StuckListener, and a function that makes room in
// its queue for one more connection (it accepts and closes one queued), so
// that a connect waiting on the listener is answered when the kernel
// retries its SYN.
func StuckListenerWithRoom(t testing.TB) (addr string, makeRoom func()) {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr = fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
	makeRoom = func() {
		t.Helper()
		nfd, _, err := syscall.Accept(fd)
		if err != nil {
			t.Fatalf("making room in the accept queue: %v", err)
		}
		syscall.Close(nfd)
	}
	// Fill the queue (backlog 0 holds one), never accepting, until a
	// connect goes unanswered.
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			if !os.IsTimeout(err) {
				t.Fatalf("filling the accept queue: %v", err)
			}
			return addr, makeRoom
		}
		t.Cleanup(func() { c.Close() })
		if i == 16 {
			t.Fatal("the accept queue never filled")
		}
	}
}
