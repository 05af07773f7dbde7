package testenv

import (
	"crypto/tls"
	"io"
	"net"
	"sync/atomic"
	"time"
)

// Storm is a connect storm: workers that connect to one address, send a
// few bytes and close, back to back, the way load balancers' checks and
// impatient clients do. It is bounded: 100,000 connections per worker at
// most, and it ends at Stop. Shutdown and reload tests run under it.
type Storm struct {
	crew
	attempts atomic.Int64
}

// StartStorm starts workers connecting to addr, each sending msg.
func StartStorm(addr string, workers int, msg []byte) *Storm {
	s := &Storm{}
	s.start(workers, 100_000, func(int) {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		s.attempts.Add(1)
		if err == nil {
			c.Write(msg)
			c.Close()
		}
	})
	return s
}

// Attempts is how many connections the storm has tried so far.
func (s *Storm) Attempts() int64 { return s.attempts.Load() }

// TLSStorm is a connect storm of TLS clients: each worker connects,
// completes a full handshake (no session resumption), sends a line,
// reads what comes back and closes, back to back. Bounded like Storm.
type TLSStorm struct {
	crew
	attempts, served atomic.Int64
}

// StartTLSStorm starts workers handshaking with addr under cfg.
func StartTLSStorm(addr string, workers int, cfg *tls.Config) *TLSStorm {
	s := &TLSStorm{}
	cfg = cfg.Clone()
	cfg.ClientSessionCache = nil
	s.start(workers, 100_000, func(int) {
		s.attempts.Add(1)
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: time.Second}, "tcp", addr, cfg)
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte("hello\n")); err != nil {
			return
		}
		if b, err := io.ReadAll(c); err == nil && len(b) > 0 {
			s.served.Add(1)
		}
	})
	return s
}

// Attempts is how many connections the storm has tried so far.
func (s *TLSStorm) Attempts() int64 { return s.attempts.Load() }

// Served is how many of them got an answer through TLS.
func (s *TLSStorm) Served() int64 { return s.served.Load() }
