package pool_test

import (
	"errors"
	"net"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/pool"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// trusted is a pool whose targets are live as discovered (check: none), so
// that it needs no network and runs in a synctest bubble.
func trusted(hold time.Duration) *pool.Pool {
	return pool.New(pool.Config{Health: health.Config{Check: health.CheckNone}, EmptyHold: hold}, nil)
}

// picked is every address a fresh cursor offers, in order.
func picked(p *pool.Pool) []string {
	c := p.Pick()
	var out []string
	for t := c.Next(); t != nil; t = c.Next() {
		out = append(out, t.Addr)
	}
	slices.Sort(out)
	return out
}

func snap(resync bool, addrs ...string) discovery.Snapshot {
	s := discovery.NewSnapshot(addrs...)
	s.Resync = resync
	return s
}

func TestSnapshotsAreRouted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := trusted(time.Second)
		defer p.Close()
		sink := p.NewSink()
		sink.Update(snap(true, "10.0.0.2:1", "10.0.0.1:1"))
		p.Flush()
		if got := picked(p); !slices.Equal(got, []string{"10.0.0.1:1", "10.0.0.2:1"}) {
			t.Fatalf("picked %v", got)
		}
		sink.Update(snap(false, "10.0.0.3:1"))
		p.Flush()
		if got := picked(p); !slices.Equal(got, []string{"10.0.0.3:1"}) {
			t.Fatalf("after a change: picked %v", got)
		}
		if d := p.Discovery(); !d.Synced || d.Updates != 2 || !d.OK {
			t.Fatalf("discovery state %+v", d)
		}
	})
}

// A zero-instance answer on a healthy watch is believed at once; right
// after an outage or restart (a resync) it is held for EmptyHold, and a
// non-empty answer meanwhile cancels it.
func TestEmptyAnswers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		core, logs := observer.New(zap.InfoLevel)
		p := pool.New(pool.Config{Health: health.Config{Check: health.CheckNone}, EmptyHold: 5 * time.Second}, zap.New(core))
		defer p.Close()
		sink := p.NewSink()
		sink.Update(snap(true, "10.0.0.1:1"))
		sink.Update(snap(false))
		p.Flush()
		if got := picked(p); len(got) != 0 {
			t.Fatalf("a deregistration on a healthy watch left %v", got)
		}

		sink.Update(snap(false, "10.0.0.1:1"))
		sink.Error(errors.New("registry down"))
		sink.Update(snap(true)) // back, and empty
		p.Flush()
		start := time.Now()
		if got := picked(p); len(got) != 1 {
			t.Fatalf("an empty resync emptied the pool at once: %v", got)
		}
		time.Sleep(4 * time.Second)
		synctest.Wait()
		p.Flush()
		if got := picked(p); len(got) != 1 {
			t.Fatalf("emptied after %v, before the hold", time.Since(start))
		}
		time.Sleep(time.Second)
		synctest.Wait() // the hold's timer has pushed its input
		p.Flush()
		if got := picked(p); len(got) != 0 {
			t.Fatalf("still %v after the hold", got)
		}

		// A non-empty answer during the hold cancels it, and says so:
		// it may change nothing else worth a line.
		sink.Update(snap(false, "10.0.0.1:1"))
		sink.Update(snap(true))
		sink.Update(snap(false, "10.0.0.2:1"))
		time.Sleep(10 * time.Second)
		synctest.Wait()
		p.Flush()
		if got := picked(p); !slices.Equal(got, []string{"10.0.0.2:1"}) {
			t.Fatalf("after a cancelled hold: %v", got)
		}
		if n := logs.FilterMessage("registry reports instances again; the hold ends").Len(); n != 1 {
			t.Fatalf("the hold's end logged %d times, want once", n)
		}
	})
}

// An error keeps the targets; the next answer clears it, changed or not.
func TestErrorsAndRecovery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := trusted(time.Second)
		defer p.Close()
		sink := p.NewSink()
		sink.Update(snap(true, "10.0.0.1:1"))
		p.Flush()
		synced := p.Discovery().LastSync
		time.Sleep(time.Second)
		sink.Error(discovery.TruncateError(errors.New(string(make([]byte, 5000)))))
		p.Flush()
		d := p.Discovery()
		if d.OK || d.Errors != 1 || len(d.LastError) > discovery.MaxText+20 || len(picked(p)) != 1 {
			t.Fatalf("after an error: %+v, %d targets", d, len(picked(p)))
		}
		sink.Error(errors.Join(errors.New("watch stale"), discovery.ErrStale))
		if d := p.Discovery(); !d.Stale {
			t.Fatal("a stale watch not reported")
		}
		time.Sleep(time.Second)
		sink.Synced()
		d = p.Discovery()
		if !d.OK || d.Stale || d.LastError != "" || !d.LastSync.After(synced) {
			t.Fatalf("after an unchanged answer: %+v", d)
		}
	})
}

// What a replaced watcher still pushes is ignored.
func TestOldSinksAreIgnored(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := trusted(time.Second)
		defer p.Close()
		old := p.NewSink()
		old.Update(snap(true, "10.0.0.1:1"))
		sink := p.NewSink()
		sink.Update(snap(true, "10.0.0.2:1"))
		old.Update(snap(false, "10.0.0.9:1"))
		old.Error(errors.New("old watcher failing"))
		p.Flush()
		if got := picked(p); !slices.Equal(got, []string{"10.0.0.2:1"}) {
			t.Fatalf("picked %v", got)
		}
		if !p.Discovery().OK {
			t.Fatal("an old watcher's error was recorded")
		}
	})
}

// Malformed registry entries are listed while present and counted once.
func TestWarnings(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := trusted(time.Second)
		defer p.Close()
		sink := p.NewSink()
		w1 := discovery.Warning{Key: "a", Reason: "not JSON"}
		w2 := discovery.Warning{Key: "b", Reason: "no port"}
		s := snap(true, "10.0.0.1:1")
		s.Warnings = []discovery.Warning{w1}
		sink.Update(s)
		s = snap(false, "10.0.0.1:1")
		s.Warnings = []discovery.Warning{w1, w2}
		sink.Update(s)
		p.Flush()
		if v := p.View(); len(v.Warnings) != 2 || p.Discovery().Malformed != 2 {
			t.Fatalf("warnings %v, counted %d", v.Warnings, p.Discovery().Malformed)
		}
		sink.Update(snap(false, "10.0.0.1:1"))
		p.Flush()
		if v := p.View(); len(v.Warnings) != 0 || p.Discovery().Malformed != 2 {
			t.Fatalf("after the keys were fixed: warnings %v, counted %d", v.Warnings, p.Discovery().Malformed)
		}
	})
}

// listeners opens n loopback listeners that accept and close.
func listeners(t *testing.T, n int) []string {
	t.Helper()
	var addrs []string
	for range n {
		var wg sync.WaitGroup
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		})
		t.Cleanup(func() { ln.Close(); wg.Wait() })
		addrs = append(addrs, ln.Addr().String())
	}
	return addrs
}

func deadAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func waitPicked(t *testing.T, p *pool.Pool, what string, want []string) {
	t.Helper()
	want = slices.Sorted(slices.Values(want))
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Equal(picked(p), want) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s: picked %v, want %v", what, picked(p), want)
		}
		time.Sleep(time.Millisecond)
	}
}

// A snapshot that replaces every live target is applied make-before-break:
// the old targets serve until a new one passes its first probe.
func TestMakeBeforeBreak(t *testing.T) {
	addrs := listeners(t, 4)
	old, fresh := addrs[:2], addrs[2:]
	p := pool.New(pool.Config{Health: health.Config{Check: health.CheckTCP, Interval: time.Hour, Timeout: time.Second}}, nil)
	defer p.Close()
	sink := p.NewSink()
	sink.Update(snap(true, old...))
	waitPicked(t, p, "the old targets live", old)

	sink.Update(snap(false, fresh...))
	p.Flush()
	if got := picked(p); len(got) == 0 {
		t.Fatal("nothing to route to while the new targets are probed")
	}
	waitPicked(t, p, "the new targets, and only them", fresh)

	// New targets that never come up: the old ones go after the probe
	// timeout all the same.
	dead := []string{deadAddr(t)}
	p2 := pool.New(pool.Config{Health: health.Config{Check: health.CheckTCP, Interval: time.Hour, Timeout: 300 * time.Millisecond}}, nil)
	defer p2.Close()
	sink2 := p2.NewSink()
	sink2.Update(snap(true, old...))
	waitPicked(t, p2, "the old targets live", old)
	start := time.Now()
	sink2.Update(snap(false, dead...))
	waitPicked(t, p2, "the old targets dropped", nil)
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("old targets kept %v after the bridge deadline", took)
	}
}
