package kubernetes

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
)

// The pacer waits nothing before a call that follows a success, grows its
// wait after each failure up to the cap, and starts again from its first
// step after a success (the Reflector's own backoff would keep growing
// for two minutes).
func TestPacerStartsOverAfterASuccess(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newPacer(wait.Backoff{Duration: time.Second, Factor: 2, Steps: 10, Cap: 8 * time.Second})
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
		var got []time.Duration
		for range 5 {
			p.done(fail)
			got = append(got, waited())
		}
		want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 8 * time.Second}
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("waits after failures %v, want %v", got, want)
			}
		}
		p.done(nil)
		if d := waited(); d != 0 {
			t.Fatalf("waited %v after a success", d)
		}
		p.done(fail)
		if d := waited(); d != time.Second {
			t.Fatalf("waited %v after a failure that followed a success, want the first step (1s)", d)
		}

		ctx, cancel := context.WithCancel(context.Background())
		p.done(fail)
		go func() { time.Sleep(500 * time.Millisecond); cancel() }()
		if p.wait(ctx) {
			t.Fatal("wait went on after its context ended")
		}
	})
}
