//go:build !linux

package proxy

// Without epoll every connection is relayed by goroutines (session.go).
type loopSet struct{}

func (*loopSet) adopt(*session, func()) bool { return false }

func (*loopSet) adoptConnected(*session, func()) bool { return false }
func (*loopSet) stop()                                {}
func (*loopSet) disable()                             {}

type relay struct{}

func (*relay) abort() {}
