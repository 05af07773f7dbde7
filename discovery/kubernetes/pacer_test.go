package kubernetes

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"
)

// The pacer waits nothing before a call that follows a success, grows its
// wait after each failure up to its cap, and starts over from its first
// step after a success (the Reflector's own backoff would keep growing for
// two minutes).
func TestPacerStartsOverAfterASuccess(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newPacer(8 * time.Second)
		waited := func() time.Duration {
			start := time.Now()
			if !p.wait(context.Background()) {
				t.Fatal("wait ended without its context ending")
			}
			return time.Since(start)
		}
		fail := errors.New("connection refused")
		if d := waited(); d != 0 {
			t.Fatalf("waited %v before the first call", d)
		}
		// retry's steps: 250 ms growing 1.5x, each within ±50 %.
		first := func(d time.Duration) bool { return d >= firstRetry/2 && d <= firstRetry*3/2 }
		p.done(fail)
		if d := waited(); !first(d) {
			t.Fatalf("waited %v after a first failure, want about %v", d, firstRetry)
		}
		var last time.Duration
		for range 15 {
			p.done(fail)
			last = waited()
		}
		if last < 4*time.Second || last > 12*time.Second {
			t.Fatalf("waited %v after 16 failures, want about the 8 s cap", last)
		}
		p.done(nil)
		if d := waited(); d != 0 {
			t.Fatalf("waited %v after a success", d)
		}
		p.done(fail)
		if d := waited(); !first(d) {
			t.Fatalf("waited %v after a failure that followed a success, want the first step again", d)
		}

		ctx, cancel := context.WithCancel(context.Background())
		p.done(fail)
		go func() { time.Sleep(100 * time.Millisecond); cancel() }()
		if p.wait(ctx) {
			t.Fatal("wait went on after its context ended")
		}
	})
}
