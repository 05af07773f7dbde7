//go:build !linux

package proxy

import "net"

// unread cannot tell here how many bytes wait in the socket: -1.
func unread(net.Conn) int { return -1 }
