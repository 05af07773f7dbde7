//go:build linux

// Package sock holds the few socket system calls that the relay loops and
// the health prober make on descriptors driven by a poller. They are raw
// system calls: every descriptor is non-blocking, so none of them blocks,
// and the Go scheduler need not hand the thread's P to another thread
// (which a plain syscall.Syscall offers to do, at a cost, on every call).
package sock

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Connect opens a non-blocking TCP socket and starts connecting it to ap.
// The caller owns the descriptor it returns; the connect completes (or
// fails: see Error) when the socket turns writable.
func Connect(ap netip.AddrPort) (int, error) {
	fd, err := Socket(IPv6(ap))
	if err != nil {
		return -1, err
	}
	if err := ConnectOn(fd, ap); err != nil {
		Close(fd)
		return -1, err
	}
	return fd, nil
}

// IPv6 reports whether ap needs an IPv6 socket (an IPv4-mapped address
// does not).
func IPv6(ap netip.AddrPort) bool {
	a := ap.Addr()
	return !a.Is4() && !a.Is4In6()
}

// Socket opens a non-blocking TCP socket, IPv6 or IPv4. The caller owns it.
func Socket(v6 bool) (int, error) {
	domain := uintptr(unix.AF_INET)
	if v6 {
		domain = unix.AF_INET6
	}
	r, _, e := unix.RawSyscall(unix.SYS_SOCKET, domain, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if e != 0 {
		return -1, fmt.Errorf("socket: %w", e)
	}
	return int(r), nil
}

// ConnectOn starts connecting fd, a new socket of ap's family or one
// Disconnect made free, to ap.
func ConnectOn(fd int, ap netip.AddrPort) error {
	a, port := ap.Addr(), ap.Port()
	var (
		sa    unsafe.Pointer
		salen uintptr
		sa4   unix.RawSockaddrInet4
		sa6   unix.RawSockaddrInet6
	)
	if !IPv6(ap) {
		sa4.Family, sa4.Addr = unix.AF_INET, a.Unmap().As4()
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:], port)
		sa, salen = unsafe.Pointer(&sa4), unsafe.Sizeof(sa4)
	} else {
		sa6.Family, sa6.Addr = unix.AF_INET6, a.As16()
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa6.Port))[:], port)
		sa, salen = unsafe.Pointer(&sa6), unsafe.Sizeof(sa6)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(sa), salen); e != 0 && e != unix.EINPROGRESS {
		return fmt.Errorf("connect: %w", e)
	}
	return nil
}

// Disconnect dissolves fd's connection, connected or not, so that fd can
// connect again (connect(2) to AF_UNSPEC): an established connection is
// reset, as closing it after ResetOnClose would, and a connect in flight
// is dropped. It clears the error the disconnect leaves. A socket used
// again this way costs no socket(2) and no close(2).
func Disconnect(fd int) error {
	sa := unix.RawSockaddr{Family: unix.AF_UNSPEC}
	if _, _, e := unix.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa)); e != 0 {
		return fmt.Errorf("disconnect: %w", e)
	}
	Error(fd)
	return nil
}

// Error is a socket's pending error (a failed connect), nil when none.
func Error(fd int) error {
	var v int32
	n := uint32(4)
	if _, _, e := unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_ERROR, uintptr(unsafe.Pointer(&v)), uintptr(unsafe.Pointer(&n)), 0); e != 0 {
		return e
	}
	if v != 0 {
		return syscall.Errno(v)
	}
	return nil
}

// Connected reports whether fd's connect has completed (fd has a peer).
func Connected(fd int) bool {
	var rsa unix.RawSockaddrAny
	n := uint32(unix.SizeofSockaddrAny)
	_, _, e := unix.RawSyscall(unix.SYS_GETPEERNAME, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(unsafe.Pointer(&n)))
	return e == 0
}

// SetNoDelay makes small messages go out at once, as Go does for its TCP
// connections.
func SetNoDelay(fd int) {
	one := int32(1)
	unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY, uintptr(unsafe.Pointer(&one)), 4, 0)
}

// ResetOnClose makes closing fd send a reset instead of a FIN (SO_LINGER
// with a zero timeout): no FIN exchange, and no TIME_WAIT socket left here.
func ResetOnClose(fd int) {
	l := unix.Linger{Onoff: 1, Linger: 0}
	unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_LINGER, uintptr(unsafe.Pointer(&l)), unsafe.Sizeof(l), 0)
}

// Close closes fd. Its owner calls it once.
func Close(fd int) { unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0) }
