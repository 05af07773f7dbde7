// Package retry is the one way rota's registry clients wait between
// attempts: exponential backoff with jitter from an initial delay up to a
// cap, never giving up, reset after a success, and interrupted by the
// caller's context.
package retry

import (
	"context"
	"time"

	"github.com/cenkalti/backoff/v5"
)

// Backoff yields the delays between attempts. It is not safe for
// concurrent use; each retry loop has its own.
type Backoff struct {
	b *backoff.ExponentialBackOff
}

// New returns a backoff from initial up to max.
func New(initial, max time.Duration) *Backoff {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = initial
	b.MaxInterval = max
	b.Reset()
	return &Backoff{b: b}
}

// Next is the delay before the next attempt; each call grows it.
func (r *Backoff) Next() time.Duration { return r.b.NextBackOff() }

// Reset starts over from the initial delay, after a success.
func (r *Backoff) Reset() { r.b.Reset() }

// Sleep waits d, or until ctx is done; it reports whether d passed.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
