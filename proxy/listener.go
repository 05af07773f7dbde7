package proxy

import (
	"context"
	"net"
	"sync"
)

// Listener is a TCP listener made for Serve. On Linux, Serve accepts on it
// inside the relay loops, so a client socket never enters Go's netpoller;
// elsewhere it is an ordinary listener. Close stops Serve like closing any
// listener does. Serve works with other listeners too, accepting with
// Accept.
type Listener struct {
	*net.TCPListener
	closeOnce sync.Once
	closed    chan struct{}
}

// Listen binds addr ("host:port") for Serve. Accepted connections get no
// TCP keep-alive probes (Go enables them by default): idle_timeout ends
// dead connections, and the setsockopt calls cost on every accept.
func Listen(addr string) (*Listener, error) {
	lc := net.ListenConfig{KeepAlive: -1}
	ln, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return nil, err
	}
	return &Listener{TCPListener: ln.(*net.TCPListener), closed: make(chan struct{})}, nil
}

// Close stops listening.
func (l *Listener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return l.TCPListener.Close()
}
