package health

import (
	"context"
	"time"
)

// SetObserver installs a probe observer; call before the first Update.
func (c *Checker) SetObserver(f func(addr string, err error, next time.Duration)) { c.observe = f }

// SetProbe replaces the network probe (for tests on virtual time); call
// before the first Update.
func (c *Checker) SetProbe(f func(ctx context.Context, addr string) error) { c.probeFn = f }

// Answered marks err as a verdict the target gave (an http status, a
// send_expect reply), as the probes do.
func Answered(err error) error { return answeredError{err} }
