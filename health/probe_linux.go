//go:build linux

package health

import (
	"fmt"
	"net/netip"
	"os"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/internal/poller"
	"github.com/rota-proxy/rota/internal/sock"
)

// tcpProber runs TCP checks on one poller, as HAProxy runs its checks in
// its event loop: a probe is a non-blocking connect, a registration and a
// deadline, not a goroutine, a netpoller registration, a context and a
// timer. At 10,000 targets every 2 s that halves what a probe costs the
// proxy beyond the kernel's own work (bench/README.md). It takes addresses
// that are IP literals; names go through the resolver on the goroutine path.
//
// A probe's socket is used again: when it ends, connect(2) to AF_UNSPEC
// resets the connection as closing would, and the socket waits for the
// next probe of its family, which then needs no socket(2) and the last no
// close(2). At 10,000 targets every 2 s that is a sixth of what a probe
// costs the kernel (bench/README.md).
type tcpProber struct {
	p    *poller.Poller
	idle [2][]int // the loop's: disconnected sockets, IPv4 and IPv6
}

// maxIdleSockets bounds the sockets kept per family: probes in flight at
// once are bounded by the scheduler, and a burst beyond this many closes
// the surplus.
const maxIdleSockets = 256

// newTCPProber starts a prober whose loop runs until close.
func newTCPProber(log *zap.Logger) (*tcpProber, error) {
	p, err := poller.New(log)
	if err != nil {
		return nil, err
	}
	go p.Run()
	return &tcpProber{p: p}, nil
}

// start hands jobs to the loop. It never blocks; false means the prober
// is closed and no done will be called.
func (pr *tcpProber) start(jobs []tcpJob) bool {
	return pr.p.Post(func() {
		for _, j := range jobs {
			pr.connect(j)
		}
	})
}

// close stops the loop and waits for it: probes still in flight end with
// an error (their owner is closing and ignores it).
func (pr *tcpProber) close() {
	pr.p.Stop()
	pr.p.Wait()
	for _, fds := range pr.idle { // the loop has ended: they are ours
		for _, fd := range fds {
			sock.Close(fd)
		}
	}
	pr.idle = [2][]int{}
}

// socket is an idle socket of ap's family, or a new one.
func (pr *tcpProber) socket(ap netip.AddrPort) (int, error) {
	v6 := sock.IPv6(ap)
	f := pr.family(v6)
	if n := len(*f); n > 0 {
		fd := (*f)[n-1]
		*f = (*f)[:n-1]
		return fd, nil
	}
	return sock.Socket(v6)
}

func (pr *tcpProber) family(v6 bool) *[]int {
	if v6 {
		return &pr.idle[1]
	}
	return &pr.idle[0]
}

// recycle ends fd's probe with a reset and keeps fd for another, or closes
// it if enough are kept (or it cannot be disconnected).
func (pr *tcpProber) recycle(fd int, v6 bool) {
	f := pr.family(v6)
	if len(*f) < maxIdleSockets && sock.Disconnect(fd) == nil {
		*f = append(*f, fd)
		return
	}
	sock.ResetOnClose(fd)
	sock.Close(fd)
}

func (pr *tcpProber) connect(j tcpJob) {
	fd, err := pr.socket(j.addr)
	if err == nil {
		if err = sock.ConnectOn(fd, j.addr); err != nil {
			sock.Close(fd)
		}
	}
	if err != nil {
		j.done(fmt.Errorf("tcp check: dial: %w", err))
		return
	}
	v6 := sock.IPv6(j.addr)
	if err := sock.Error(fd); err != nil || sock.Connected(fd) {
		// Answered already (loopback, a local target): no registration needed.
		pr.recycle(fd, v6)
		j.done(connectErr(err))
		return
	}
	pb := &tcpProbe{pr: pr, v6: v6, done: j.done}
	if err := pr.p.Add(&pb.fd, fd, poller.Out|poller.Edge, pb, 0); err != nil {
		j.done(fmt.Errorf("tcp check: %w", err)) // Add closed fd
		return
	}
	pr.p.Set(&pb.timer, pr.p.Now()+int64(j.timeout), pb)
}

// tcpProbe is one connect in flight. It owns its descriptor (handed back
// to the prober by end, reset) and its timer.
type tcpProbe struct {
	pr    *tcpProber
	fd    poller.FD
	timer poller.Timer
	v6    bool
	done  func(error)
}

var errProbeTimeout = fmt.Errorf("dial: %w", os.ErrDeadlineExceeded) // "dial: i/o timeout", as net.Dial says

func (pb *tcpProbe) Ready(uint8, uint32) {
	// Writable: the connect is done, well or not. (EPOLLERR and EPOLLHUP
	// come with the error in SO_ERROR; none means the handshake was
	// answered, which is all a TCP check asks.)
	pb.end(connectErr(sock.Error(pb.fd.Num())), true)
}

// connectErr words a failed connect's error as net.Dial does; nil stays nil.
func connectErr(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("tcp check: dial: %w", os.NewSyscallError("connect", err))
}

func (pb *tcpProbe) Expired() { pb.end(fmt.Errorf("tcp check: %w", errProbeTimeout), true) }

// Abort closes the socket instead of keeping it: its state is unknown.
func (pb *tcpProbe) Abort(cause any) { pb.end(fmt.Errorf("tcp check: %v", cause), false) }

func (pb *tcpProbe) end(err error, keep bool) {
	if pb.done == nil {
		return
	}
	p := pb.pr.p
	p.Cancel(&pb.timer)
	if pb.fd.Valid() {
		if keep {
			fd := pb.fd.Num()
			p.Forget(&pb.fd) // ours again
			pb.pr.recycle(fd, pb.v6)
		} else {
			sock.ResetOnClose(pb.fd.Num())
			p.Close(&pb.fd)
		}
	}
	done := pb.done
	pb.done = nil
	done(err)
}
