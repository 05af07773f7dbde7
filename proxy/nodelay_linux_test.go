//go:build linux

package proxy_test

import (
	"net"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rota-proxy/rota/proxy"
)

// The relay loops no longer set TCP_NODELAY on each accepted client: the
// listening socket has it, and the kernel copies it into every socket
// accepted from it. Both halves are checked here, on a raw accept4 the
// way the loops accept.
func TestAcceptedSocketsInheritNoDelay(t *testing.T) {
	ln, err := proxy.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	if v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY); err != nil || v == 0 {
		t.Fatalf("the listening socket's TCP_NODELAY: %d, %v", v, err)
	}
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := unix.SetNonblock(fd, false); err != nil {
		t.Fatal(err)
	}
	nfd, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(nfd)
	if v, err := unix.GetsockoptInt(nfd, unix.IPPROTO_TCP, unix.TCP_NODELAY); err != nil || v == 0 {
		t.Fatalf("an accepted socket's TCP_NODELAY: %d, %v (not inherited from the listener)", v, err)
	}
}
