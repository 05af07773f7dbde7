//go:build unix

package proxy

import (
	"net"
	"syscall"

	"github.com/rota-proxy/rota/internal/neterr"
)

// pendingReset reports whether c's socket has a reset pending (SO_ERROR),
// which reading after a FIN does not report.
func pendingReset(c net.Conn) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	var serr error
	rc.Control(func(fd uintptr) {
		v, err := syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_ERROR)
		if err == nil && v != 0 {
			serr = syscall.Errno(v)
		}
	})
	return neterr.IsReset(serr)
}
