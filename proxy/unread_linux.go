package proxy

import (
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// unreadFD is how many bytes wait in the socket's receive queue: what the
// peer has sent that rota has not read yet.
func unreadFD(fd int) int {
	n, err := unix.IoctlGetInt(fd, unix.SIOCINQ)
	if err != nil {
		return 0
	}
	return n
}

// unread is unreadFD for a net.Conn; -1 when it cannot tell.
func unread(c net.Conn) int {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1
	}
	n := -1
	rc.Control(func(fd uintptr) { n = unreadFD(int(fd)) })
	return n
}
