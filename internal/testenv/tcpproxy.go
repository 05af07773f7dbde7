package testenv

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

// TCPProxy forwards TCP from a loopback port to a target, and can play a
// network fault between a client and the target: Freeze drops every byte
// both ways while connections stay up (a member cut off by the network, or
// frozen), Cut closes them all. The test's cleanup closes it.
type TCPProxy struct {
	ln     net.Listener
	target string
	frozen atomic.Bool

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// StartTCPProxy forwards a new loopback port to target (host:port).
func StartTCPProxy(t testing.TB, target string) *TCPProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: proxy listener: %v", err)
	}
	p := &TCPProxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	p.wg.Go(p.accept)
	t.Cleanup(p.close)
	return p
}

// Addr is the proxy's address.
func (p *TCPProxy) Addr() string { return p.ln.Addr().String() }

// Freeze drops every byte while on, on open connections and new ones.
func (p *TCPProxy) Freeze(on bool) { p.frozen.Store(on) }

// Cut closes every open connection; new ones are accepted.
func (p *TCPProxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		_ = c.Close()
	}
}

func (p *TCPProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Go(func() { p.forward(c) })
	}
}

func (p *TCPProxy) track(c net.Conn, on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if on {
		p.conns[c] = struct{}{}
	} else {
		delete(p.conns, c)
	}
}

func (p *TCPProxy) forward(c net.Conn) {
	defer c.Close()
	p.track(c, true)
	defer p.track(c, false)
	up, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer up.Close()
	p.track(up, true)
	defer p.track(up, false)
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 && !p.frozen.Load() {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		dst.Close()
		src.Close()
		done <- struct{}{}
	}
	go cp(up, c)
	go cp(c, up)
	<-done
	<-done
}

func (p *TCPProxy) close() {
	p.ln.Close()
	p.Cut()
	p.wg.Wait()
}
