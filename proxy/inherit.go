package proxy

import (
	"fmt"
	"net"
	"os"
)

// ListenFile makes a Listener of an inherited listening socket (an upgrade's
// parent, systemd's socket activation). f stays the caller's: the Listener
// has a duplicate.
func ListenFile(f *os.File) (*Listener, error) {
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("inherited socket %s: %w", f.Name(), err)
	}
	defer ln.Close()
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return nil, fmt.Errorf("inherited socket %s: not a TCP listener (%T)", f.Name(), ln)
	}
	return fromTCP(tl)
}
