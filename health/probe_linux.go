//go:build linux

package health

import (
	"fmt"
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
type tcpProber struct {
	p *poller.Poller
}

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
}

func (pr *tcpProber) connect(j tcpJob) {
	fd, err := sock.Connect(j.addr)
	if err != nil {
		j.done(fmt.Errorf("tcp check: dial: %w", err))
		return
	}
	if err := sock.Error(fd); err != nil || sock.Connected(fd) {
		// Answered already (loopback, a local target): no registration needed.
		sock.ResetOnClose(fd)
		sock.Close(fd)
		j.done(connectErr(err))
		return
	}
	pb := &tcpProbe{p: pr.p, done: j.done}
	if err := pr.p.Add(&pb.fd, fd, poller.Out|poller.Edge, pb, 0); err != nil {
		j.done(fmt.Errorf("tcp check: %w", err)) // Add closed fd
		return
	}
	pr.p.Set(&pb.timer, pr.p.Now()+int64(j.timeout), pb)
}

// tcpProbe is one connect in flight. It owns its descriptor (closed by
// end, with a reset, as probeTCP's) and its timer.
type tcpProbe struct {
	p     *poller.Poller
	fd    poller.FD
	timer poller.Timer
	done  func(error)
}

var errProbeTimeout = fmt.Errorf("dial: %w", os.ErrDeadlineExceeded) // "dial: i/o timeout", as net.Dial says

func (pb *tcpProbe) Ready(uint8, uint32) {
	// Writable: the connect is done, well or not. (EPOLLERR and EPOLLHUP
	// come with the error in SO_ERROR; none means the handshake was
	// answered, which is all a TCP check asks.)
	pb.end(connectErr(sock.Error(pb.fd.Num())))
}

// connectErr words a failed connect's error as net.Dial does; nil stays nil.
func connectErr(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("tcp check: dial: %w", os.NewSyscallError("connect", err))
}

func (pb *tcpProbe) Expired() { pb.end(fmt.Errorf("tcp check: %w", errProbeTimeout)) }

func (pb *tcpProbe) Abort(cause any) { pb.end(fmt.Errorf("tcp check: %v", cause)) }

func (pb *tcpProbe) end(err error) {
	if pb.done == nil {
		return
	}
	pb.p.Cancel(&pb.timer)
	if pb.fd.Valid() {
		sock.ResetOnClose(pb.fd.Num())
		pb.p.Close(&pb.fd)
	}
	done := pb.done
	pb.done = nil
	done(err)
}
