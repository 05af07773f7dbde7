//go:build !linux

package testenv

import "net"

// NetNS is a network namespace of the test's own: Linux only.
type NetNS struct {
	Name  string
	Addrs []string
}

// StartNetNS fails the test: network namespaces are Linux's.
func StartNetNS(t T, n int) *NetNS {
	t.Helper()
	t.Fatalf("testenv: network namespaces are Linux's")
	return nil
}

// Listen is never reached off Linux.
func (ns *NetNS) Listen(t T, addr string) net.Listener {
	t.Helper()
	t.Fatalf("testenv: network namespaces are Linux's")
	return nil
}
