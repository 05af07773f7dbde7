//go:build !linux

package proxy

import (
	"net"
	"sync"
)

// Without epoll every connection is relayed by goroutines (session.go).
type loopSet struct{}

func (*loopSet) adopt(*session, func()) bool { return false }

func (*loopSet) adoptConnected(*session, func()) bool { return false }
func (*loopSet) stop()                                {}
func (*loopSet) disable()                             {}

func (*loopSet) serve(*Proxy, *Listener, *sync.WaitGroup) (bool, error) { return false, nil }

func localAddr(int) net.Addr { return &net.TCPAddr{} }

type relay struct{}

func (*relay) abort() {}
