package main

import (
	"fmt"
	"slices"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// runSyscallCost prints what entering the kernel costs on this machine:
// the round trip of the cheapest system call (getppid, which does no work),
// and an io_uring submission of N no-op entries in one io_uring_enter, per
// enter and per entry. On a paravirtualised guest with page-table isolation
// the first is microseconds, not the ~100 ns of bare metal, and a proxy's
// CPU per connection is then mostly its system calls' count times it
// (bench/README.md); the second says what batching them would cost.
func runSyscallCost() error {
	const n = 200000
	med := func(f func() time.Duration) time.Duration {
		var ds []time.Duration
		for range 5 {
			ds = append(ds, f())
		}
		slices.Sort(ds)
		return ds[2]
	}
	d := med(func() time.Duration {
		t := time.Now()
		for range n {
			unix.RawSyscall(unix.SYS_GETPPID, 0, 0, 0)
		}
		return time.Since(t) / n
	})
	fmt.Printf("system call round trip (getppid): %d ns\n", d.Nanoseconds())
	if err := socketCallCost(med); err != nil {
		return err
	}
	r, err := newNopRing(256)
	if err != nil {
		fmt.Printf("io_uring: unavailable (%v)\n", err)
		return nil
	}
	defer r.close()
	for _, batch := range []int{1, 4, 16, 64} {
		d := med(func() time.Duration {
			t := time.Now()
			for i := 0; i < n; i += batch {
				if err = r.nops(batch); err != nil {
					return 0
				}
			}
			return time.Since(t) / time.Duration(n/batch)
		})
		if err != nil {
			return fmt.Errorf("io_uring_enter: %w", err)
		}
		fmt.Printf("io_uring, %2d no-ops an enter: %d ns an enter, %d ns an entry\n", batch, d.Nanoseconds(), d.Nanoseconds()/int64(batch))
	}
	return nil
}

// socketCallCost prints what 100 bytes over loopback TCP cost as write and
// read, the file calls, and as sendto and recvfrom, the socket calls (which
// skip the file layer: its checks and fsnotify), in interleaved rounds.
func socketCallCost(med func(func() time.Duration) time.Duration) error {
	fds, err := tcpPair()
	if err != nil {
		return err
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	msg, buf := make([]byte, 100), make([]byte, 4096)
	call := func(trap uintptr, fd int, b []byte, flags uintptr) {
		unix.RawSyscall6(trap, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), flags, 0, 0)
	}
	const n = 20000
	var file, sock []time.Duration
	for range 3 {
		file = append(file, med(func() time.Duration {
			t := time.Now()
			for range n {
				call(unix.SYS_WRITE, fds[0], msg, 0)
				call(unix.SYS_READ, fds[1], buf, 0)
			}
			return time.Since(t) / n
		}))
		sock = append(sock, med(func() time.Duration {
			t := time.Now()
			for range n {
				call(unix.SYS_SENDTO, fds[0], msg, unix.MSG_NOSIGNAL)
				call(unix.SYS_RECVFROM, fds[1], buf, 0)
			}
			return time.Since(t) / n
		}))
	}
	slices.Sort(file)
	slices.Sort(sock)
	fmt.Printf("100 bytes over loopback TCP: write and read %d ns, sendto and recvfrom %d ns (%.2fx)\n",
		file[1].Nanoseconds(), sock[1].Nanoseconds(), float64(file[1])/float64(sock[1]))
	return nil
}

// tcpPair is a connected pair of blocking loopback TCP sockets with
// TCP_NODELAY, as raw descriptors.
func tcpPair() ([2]int, error) {
	var fds [2]int
	ln, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fds, err
	}
	defer unix.Close(ln)
	if err := unix.Bind(ln, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return fds, err
	}
	if err := unix.Listen(ln, 1); err != nil {
		return fds, err
	}
	sa, err := unix.Getsockname(ln)
	if err != nil {
		return fds, err
	}
	if fds[0], err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
		return fds, err
	}
	if err := unix.Connect(fds[0], sa); err != nil {
		unix.Close(fds[0])
		return fds, err
	}
	if fds[1], _, err = unix.Accept4(ln, unix.SOCK_CLOEXEC); err != nil {
		unix.Close(fds[0])
		return fds, err
	}
	for _, fd := range fds {
		unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	}
	return fds, nil
}

// nopRing is the least io_uring there is: its submission and completion
// rings and entries mapped, fed no-op entries only.
type nopRing struct {
	fd                   int
	ring, sqes           []byte
	sqTail, cqHead, cqTl *uint32
	mask, array          uint32
}

// ioUringParams is struct io_uring_params (include/uapi/linux/io_uring.h).
type ioUringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sq                                                                     struct {
		head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
		userAddr                                                        uint64
	}
	cq struct {
		head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
		userAddr                                                        uint64
	}
}

func newNopRing(entries uint32) (*nopRing, error) {
	var p ioUringParams
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, errno
	}
	r := &nopRing{fd: int(fd)}
	size := max(p.sq.array+p.sqEntries*4, p.cq.cqes+p.cqEntries*16) // one mapping (IORING_FEAT_SINGLE_MMAP, Linux 5.4)
	var err error
	if r.ring, err = unix.Mmap(r.fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		unix.Close(r.fd)
		return nil, err
	}
	if r.sqes, err = unix.Mmap(r.fd, 0x10000000, int(p.sqEntries)*64, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		r.close()
		return nil, err
	}
	r.sqTail, r.cqHead, r.cqTl = r.u32(p.sq.tail), r.u32(p.cq.head), r.u32(p.cq.tail)
	r.mask, r.array = *r.u32(p.sq.ringMask), p.sq.array
	return r, nil
}

func (r *nopRing) u32(off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&r.ring[off])) }

// nops submits n no-op entries in one enter and waits for their completions.
func (r *nopRing) nops(n int) error {
	tail := atomic.LoadUint32(r.sqTail)
	for i := range uint32(n) {
		idx := (tail + i) & r.mask
		clear(r.sqes[idx*64 : idx*64+64]) // opcode 0: IORING_OP_NOP
		*r.u32(r.array + idx*4) = idx
	}
	atomic.StoreUint32(r.sqTail, tail+uint32(n))
	const getEvents = 1 // IORING_ENTER_GETEVENTS
	if _, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(n), uintptr(n), getEvents, 0, 0); errno != 0 {
		return errno
	}
	atomic.StoreUint32(r.cqHead, atomic.LoadUint32(r.cqTl))
	return nil
}

func (r *nopRing) close() {
	if r.sqes != nil {
		unix.Munmap(r.sqes)
	}
	unix.Munmap(r.ring)
	unix.Close(r.fd)
}
