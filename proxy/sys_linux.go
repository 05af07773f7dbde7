//go:build linux

package proxy

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/rota-proxy/rota/internal/sock"
)

// The socket calls of the relay loops. Like the poller's, they are raw
// system calls: none of them blocks (every descriptor is non-blocking).

var (
	errEAGAIN       error = unix.EAGAIN
	errEINTR        error = unix.EINTR
	errEINVAL       error = unix.EINVAL
	errECONNABORTED error = unix.ECONNABORTED
	errENOTCONN     error = unix.ENOTCONN
)

func errnoErr(e unix.Errno) error {
	switch e {
	case unix.EAGAIN:
		return errEAGAIN
	case unix.EINTR:
		return errEINTR
	}
	return e
}

// accept takes a connection from the listening socket lfd, non-blocking.
func accept(lfd int) (int, netip.AddrPort, error) {
	var rsa unix.RawSockaddrAny
	alen := uint32(unix.SizeofSockaddrAny)
	fd, _, e := unix.RawSyscall6(unix.SYS_ACCEPT4, uintptr(lfd), uintptr(unsafe.Pointer(&rsa)), uintptr(unsafe.Pointer(&alen)), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
	if e != 0 {
		return -1, netip.AddrPort{}, errnoErr(e)
	}
	return int(fd), peerOf(&rsa), nil
}

func peerOf(rsa *unix.RawSockaddrAny) netip.AddrPort {
	switch rsa.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), port)
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), port)
	}
	return netip.AddrPort{}
}

// sockname is the local address of a socket.
func sockname(fd int) netip.AddrPort {
	var rsa unix.RawSockaddrAny
	alen := uint32(unix.SizeofSockaddrAny)
	if _, _, e := unix.RawSyscall(unix.SYS_GETSOCKNAME, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(unsafe.Pointer(&alen))); e != 0 {
		return netip.AddrPort{}
	}
	return peerOf(&rsa)
}

// startConnect opens a non-blocking socket and starts connecting it to ap.
// It gets TCP_NODELAY, as net.Dial's do, before the write that needs it
// (noDelayBefore).
func startConnect(ap netip.AddrPort) (int, error) {
	return sock.Connect(ap)
}

func shutdownWrite(fd int) error {
	if _, _, e := unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(fd), unix.SHUT_WR, 0); e != 0 {
		return e
	}
	return nil
}

// newPipe makes a non-blocking pipe, as large as the kernel allows up to
// maxSplice (a larger pipe moves more per call; 64 KiB still works).
func newPipe() (r, w int, err error) {
	var p [2]int32
	if _, _, e := unix.RawSyscall(unix.SYS_PIPE2, uintptr(unsafe.Pointer(&p)), unix.O_NONBLOCK|unix.O_CLOEXEC, 0); e != 0 {
		return 0, 0, e
	}
	unix.RawSyscall(unix.SYS_FCNTL, uintptr(p[0]), unix.F_SETPIPE_SZ, maxSplice)
	return int(p[0]), int(p[1]), nil
}

func splice(from, to, n int) (int, error) {
	for {
		m, _, e := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(from), 0, uintptr(to), 0, uintptr(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		switch e {
		case 0:
			return int(m), nil
		case unix.EINTR:
			continue
		}
		return 0, errnoErr(e)
	}
}

// dupFD duplicates a Go listener's socket into a descriptor of our own,
// non-blocking like the original.
func dupFD(ln *net.TCPListener) (int, error) {
	rc, err := ln.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(u uintptr) { fd, derr = unix.FcntlInt(u, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, fmt.Errorf("dup: %w", derr)
	}
	return fd, nil
}

// fileListener is a Go listener on a duplicate of fd.
func fileListener(fd int) (net.Listener, error) {
	d, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup: %w", err)
	}
	f := os.NewFile(uintptr(d), "listener")
	defer f.Close()
	return net.FileListener(f)
}
