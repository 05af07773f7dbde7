//go:build !linux

package proxy

import (
	"context"
	"net"
	"sync"
	"time"

	"github.com/rota-proxy/rota/balancer"

	"go.uber.org/zap"
)

// Engine runs connections. Without epoll every connection is relayed by
// goroutines (goroutines.go); the Engine has nothing to do.
type Engine struct{}

// NewEngine returns an engine; n is the number of relay loops on Linux.
func NewEngine(n int, log *zap.Logger) *Engine { return &Engine{} }

func newPrivateEngine(*zap.Logger) *Engine { return &Engine{} }

func (*Engine) limitPipes(int)     {}
func (*Engine) pipesOpen() int     { return 0 }
func (*Engine) stallLoops() func() { return func() {} }

// Close stops the engine.
func (*Engine) Close() {}

func (*Engine) abort(*Proxy) {}

func (*Engine) retire(*Proxy, *balancer.Target, balancer.Reason, time.Duration) {}

func (*Engine) serve(*Proxy, *Listener, *sync.WaitGroup) bool { return false }

// Listener is a TCP listener made for Serve; off Linux an ordinary one.
type Listener struct{ *net.TCPListener }

// Listen binds addr ("host:port") for Serve.
func Listen(addr string) (*Listener, error) {
	lc := net.ListenConfig{KeepAlive: -1}
	ln, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return nil, err
	}
	return &Listener{ln.(*net.TCPListener)}, nil
}

func fromTCP(ln *net.TCPListener) (*Listener, error) {
	f, err := ln.File()
	if err != nil {
		return nil, err
	}
	defer f.Close()
	dup, err := net.FileListener(f)
	if err != nil {
		return nil, err
	}
	return &Listener{dup.(*net.TCPListener)}, nil
}
