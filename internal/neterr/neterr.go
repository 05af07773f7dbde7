// Package neterr classifies network errors the way the proxy and the health
// checker both need: a peer's reset, and this process running out of
// resources (which is no target's fault).
package neterr

import (
	"errors"
	"syscall"
)

// IsReset reports whether err says the peer reset the connection or was not
// there to take it.
func IsReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNREFUSED)
}

// IsLocal reports whether err is this process or host running out of
// descriptors, buffers or memory: retrying later may work, and the peer is
// not to blame.
func IsLocal(err error) bool {
	if err == nil {
		return false
	}
	for _, e := range [...]error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// IsTemporaryAccept reports whether an accept error is worth waiting out
// rather than ending the listener: running out of resources, a client that
// gave up in the queue, or a timeout.
func IsTemporaryAccept(err error) bool {
	if IsLocal(err) || errors.Is(err, syscall.ECONNABORTED) {
		return true
	}
	var ne interface{ Timeout() bool }
	return errors.As(err, &ne) && ne.Timeout()
}
