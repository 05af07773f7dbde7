package kubernetes

import (
	"context"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
)

// pacer spaces the API calls that follow a failed one, and starts again
// from its first step once a call succeeds. The Reflector's own backoff
// forgets its growth only after two minutes without a failure: an API
// server that came back and then blinked again (a control-plane upgrade
// restarts each server in turn) would be retried 15 s or more apart from
// the first failure, with the pool waiting. The Reflector is left a short
// constant pause; this does the growing.
//
// It is the Reflector goroutine's: List and Watch run there, one at a
// time.
type pacer struct {
	first  wait.Backoff
	next   wait.Backoff
	failed bool
}

func newPacer(b wait.Backoff) *pacer { return &pacer{first: b, next: b} }

// wait waits, after a failed call, for the next step (false: ctx ended).
func (p *pacer) wait(ctx context.Context) bool {
	if !p.failed {
		return true
	}
	t := time.NewTimer(p.next.Step())
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// done records a call's outcome: a success resets the steps.
func (p *pacer) done(err error) {
	if err == nil {
		p.failed, p.next = false, p.first
		return
	}
	p.failed = true
}

// reflectorPause is the Reflector's own pause between its tries, constant
// (Factor 0): the pacer grows the wait after failures.
func reflectorPause() *wait.Backoff {
	return &wait.Backoff{Duration: 50 * time.Millisecond, Jitter: 0.5}
}
