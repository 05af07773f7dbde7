package main

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/rota-proxy/rota/internal/sock"
)

// probeFloor runs this program as a bare prober of addrs (every one every
// 2 s, like the proxies' checks) for window and returns its CPU, % of one
// core: the kernel's price of the probes themselves, against which the
// proxies' figures are read.
func probeFloor(addrs []string, window time.Duration) (float64, error) {
	self, err := os.Executable()
	if err != nil {
		return 0, err
	}
	f, err := os.CreateTemp("", "rota-bench-floor-")
	if err != nil {
		return 0, err
	}
	defer os.Remove(f.Name())
	f.WriteString(strings.Join(addrs, "\n"))
	f.Close()
	cmd := exec.Command(self, "-probe-floor-mode", f.Name(), window.String())
	cmd.Env = append(os.Environ(), "GOMAXPROCS=1")
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return 0, fmt.Errorf("probe floor: %w", err)
	}
	return strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
}

// runProbeFloor is the bare prober: a non-blocking connect, its error, a
// reset on close, one probe after the other from one goroutine, woken every
// 5 ms for the probes due. It prints its CPU over the window after a
// first full round.
//
// With mode "exchange", a probe is a send_expect exchange's least: the
// connection to each target is made once, before the window; a probe
// writes an HTTP/1.1 GET and the next probe of the same target reads its
// answer (it has 2 s to arrive) and checks it for " 200 ": a write and a
// read a probe, and one wake-up every 5 ms for all of them.
//
// With "exchange-prompt", each batch's answers are read 1 ms after its
// requests went out, as a prober that reads an answer when it comes
// (rota's, HAProxy's) does, rather than 2 s later. Any other mode is the
// connect-and-reset prober.
func runProbeFloor(file, window, mode string) error {
	w, err := time.ParseDuration(window)
	if err != nil {
		return err
	}
	raw, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	var aps []netip.AddrPort
	for _, a := range strings.Fields(string(raw)) {
		ap, err := netip.ParseAddrPort(a)
		if err != nil {
			return err
		}
		aps = append(aps, ap)
	}
	gap := 2 * time.Second / time.Duration(len(aps))
	// Raw system calls, as rota's loops make them. On loopback the whole
	// handshake runs inside connect(2), so SO_ERROR right after it is the
	// answer, with no wait for writability.
	probe := func(i int) error {
		fd, err := sock.Connect(aps[i])
		if err != nil {
			return err
		}
		err = sock.Error(fd)
		sock.ResetOnClose(fd)
		sock.Close(fd)
		return err
	}
	after := func() error { return nil }
	if mode == "exchange" || mode == "exchange-prompt" {
		if probe, after, err = exchangeFloor(aps, mode == "exchange-prompt"); err != nil {
			return err
		}
	}
	cpu := func() time.Duration {
		var ru unix.Rusage
		unix.Getrusage(unix.RUSAGE_SELF, &ru)
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	// ROTA_FLOOR_CPU=N (bench/probe-cpu, which pins this program there)
	// also prints CPU N's busy time over the window, % of it: with the
	// softirq work of the probes' packets, wherever it lands.
	busy := func() (time.Duration, bool) { return 0, false }
	if n := os.Getenv("ROTA_FLOOR_CPU"); n != "" {
		busy = func() (time.Duration, bool) { return cpuBusy("cpu" + n) }
	}
	start := time.Now()
	next, i, fails := start, 0, 0
	var first error
	var c0, b0 time.Duration
	var t0 time.Time
	for {
		now := time.Now()
		if t0.IsZero() && now.Sub(start) >= 2*time.Second {
			c0, t0 = cpu(), now
			b0, _ = busy()
		}
		if !t0.IsZero() && now.Sub(t0) >= w {
			break
		}
		for !next.After(now) {
			if err := probe(i % len(aps)); err != nil {
				if fails == 0 {
					first = err
				}
				fails++
			}
			i++
			next = next.Add(gap)
		}
		if err := after(); err != nil {
			if fails == 0 {
				first = err
			}
			fails++
		}
		time.Sleep(max(time.Until(next), 5*time.Millisecond))
	}
	if fails > 0 {
		fmt.Fprintf(os.Stderr, "probe floor: %d of %d probes failed, the first with %v\n", fails, i, first)
	}
	c1, d := cpu(), time.Since(t0)
	if b1, ok := busy(); ok {
		fmt.Printf("%.2f %.2f\n", 100*(c1-c0).Seconds()/d.Seconds(), 100*(b1-b0).Seconds()/d.Seconds())
		return nil
	}
	fmt.Printf("%.2f\n", 100*(c1-c0).Seconds()/d.Seconds())
	return nil
}

// cpuBusy is a CPU's busy time from /proc/stat (user, nice, system, irq,
// softirq, steal), as bench/probe-cpu counts it.
func cpuBusy(name string) (time.Duration, bool) {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(raw), "\n") {
		f := strings.Fields(line)
		if len(f) < 9 || f[0] != name {
			continue
		}
		var ticks int64
		for _, k := range []int{1, 2, 3, 6, 7, 8} {
			v, _ := strconv.ParseInt(f[k], 10, 64)
			ticks += v
		}
		return time.Duration(ticks) * time.Second / 100, true // USER_HZ
	}
	return 0, false
}

// exchangeFloor connects to every target, blocking, and returns the
// exchange floor's probe of target i: read the answer to the last request
// (none the first time), then write the next. With prompt, the probe only
// writes, and after reads the answers of the probes since its last call,
// 1 ms after them.
func exchangeFloor(aps []netip.AddrPort, prompt bool) (probe func(int) error, after func() error, err error) {
	req := []byte("GET / HTTP/1.1\r\nHost: b\r\n\r\n")
	fds := make([]int, len(aps))
	asked := make([]bool, len(aps))
	for i, ap := range aps {
		c, err := net.DialTimeout("tcp", ap.String(), 2*time.Second)
		if err != nil {
			return nil, nil, err
		}
		// A descriptor of its own, out of Go's netpoller. Not File's: the
		// *os.File's finalizer would close it once the File is garbage.
		fds[i], err = dupConn(c.(*net.TCPConn))
		c.Close()
		if err != nil {
			return nil, nil, err
		}
	}
	var buf [4096]byte
	read := func(i int) error {
		n, _, e := unix.RawSyscall(unix.SYS_READ, uintptr(fds[i]), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)))
		if e != 0 {
			return e
		}
		if !bytes.Contains(buf[:n], []byte(" 200 ")) {
			return fmt.Errorf("answer %q", buf[:n])
		}
		return nil
	}
	write := func(i int) error {
		if _, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(fds[i]), uintptr(unsafe.Pointer(&req[0])), uintptr(len(req))); e != 0 {
			return e
		}
		return nil
	}
	if !prompt {
		return func(i int) error {
			if asked[i] {
				if err := read(i); err != nil {
					return err
				}
			}
			asked[i] = true
			return write(i)
		}, func() error { return nil }, nil
	}
	var batch []int
	return func(i int) error {
			batch = append(batch, i)
			return write(i)
		}, func() error {
			if len(batch) == 0 {
				return nil
			}
			time.Sleep(time.Millisecond)
			var err error
			for _, i := range batch {
				if e := read(i); e != nil {
					err = e
				}
			}
			batch = batch[:0]
			return err
		}, nil
}

// dupConn duplicates c's descriptor, non-blocking, for the caller to own.
func dupConn(c *net.TCPConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd, derr := -1, error(nil)
	if err := rc.Control(func(s uintptr) { fd, derr = unix.Dup(int(s)) }); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, derr
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}
