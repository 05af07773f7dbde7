package kubernetes

import (
	"context"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/rota-proxy/rota/internal/retry"
)

// pacer spaces the API calls that follow a failed one, with rota's retry
// backoff, which starts over once a call succeeds. The Reflector's own
// backoff forgets its growth only after two minutes without a failure: an
// API server that came back and then blinked again (a control-plane
// upgrade restarts each server in turn) would be retried 15 s or more
// apart from the first failure, with the pool waiting. The Reflector is
// left a short constant pause; this does the growing.
//
// It is the Reflector goroutine's: List and Watch run there, one at a
// time.
type pacer struct {
	bo     *retry.Backoff
	failed bool
}

// firstRetry is the wait after a first failure: informers start at 0.8 s;
// a little quicker, since a proxy's pool is waiting.
const firstRetry = 250 * time.Millisecond

func newPacer(max time.Duration) *pacer { return &pacer{bo: retry.New(firstRetry, max)} }

// wait waits, after a failed call, for the next step (false: ctx ended).
func (p *pacer) wait(ctx context.Context) bool {
	return !p.failed || retry.Sleep(ctx, p.bo.Next())
}

// done records a call's outcome: a success starts the steps over.
func (p *pacer) done(err error) {
	if err == nil {
		p.failed = false
		p.bo.Reset()
		return
	}
	p.failed = true
}

// reflectorPause is the Reflector's own pause between its tries, constant
// (Factor 0): the pacer grows the wait after failures.
func reflectorPause() *wait.Backoff {
	return &wait.Backoff{Duration: 50 * time.Millisecond, Jitter: 0.5}
}
