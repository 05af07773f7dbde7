//go:build !unix

package proxy

import "net"

// pendingReset cannot look at the socket's pending error here: a target
// that closed cleanly is taken at its word.
func pendingReset(net.Conn) bool { return false }
