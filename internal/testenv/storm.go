package testenv

import (
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
