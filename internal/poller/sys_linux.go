//go:build linux

package poller

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// The system calls the loop and its handlers make on non-blocking
// descriptors. They are raw (no entersyscall/exitsyscall): none of them
// blocks, and the scheduler's bookkeeping around ordinary system calls let
// sysmon retake the loop's P every 20 µs under load (bench/README.md).

// Read reads fd into b, retrying on EINTR.
func Read(fd int, b []byte) (int, error) { return bytesCall(unix.SYS_READ, fd, b, 0) }

// Write writes b to fd once, retrying on EINTR.
func Write(fd int, b []byte) (int, error) { return bytesCall(unix.SYS_WRITE, fd, b, 0) }

// WriteMore writes b to fd once with MSG_MORE, retrying on EINTR: a TCP
// socket holds a last partial segment back for what follows, so a FIN sent
// next (shutdown or close) leaves in the same segment as the bytes.
func WriteMore(fd int, b []byte) (int, error) {
	return bytesCall(unix.SYS_SENDTO, fd, b, unix.MSG_MORE)
}

// bytesCall makes the system call trap(fd, b, len(b), flags) once,
// retrying on EINTR: read, write and sendto take their arguments so.
func bytesCall(trap uintptr, fd int, b []byte, flags uintptr) (int, error) {
	for {
		n, _, e := unix.RawSyscall6(trap, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)), flags, 0, 0)
		switch e {
		case 0:
			return int(n), nil
		case unix.EINTR:
			continue
		}
		return 0, e
	}
}

func epollWait(epfd int, events []unix.EpollEvent) (int, error) {
	n, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

func epollCtl(epfd, op, fd int, ev *unix.EpollEvent) error {
	if _, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(ev)), 0, 0); e != 0 {
		return e
	}
	return nil
}
