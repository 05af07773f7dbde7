//go:build linux

package poller

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// slack is how late a timer may fire on a loaded machine.
const slack = 250 * time.Millisecond

// recorder is a handler that records what it is told, on the loop.
type recorder struct {
	mu      sync.Mutex
	ready   []uint32
	expired int
	aborted []any
	onReady func(tag uint8, ev uint32)
	onTimer func()
}

func (r *recorder) Ready(tag uint8, ev uint32) {
	r.mu.Lock()
	r.ready = append(r.ready, ev)
	f := r.onReady
	r.mu.Unlock()
	if f != nil {
		f(tag, ev)
	}
}

func (r *recorder) Expired() {
	r.mu.Lock()
	r.expired++
	f := r.onTimer
	r.mu.Unlock()
	if f != nil {
		f()
	}
}

func (r *recorder) Abort(v any) {
	r.mu.Lock()
	r.aborted = append(r.aborted, v)
	r.mu.Unlock()
}

func (r *recorder) readyCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.ready)
}

func start(t *testing.T) *Poller {
	t.Helper()
	p, err := New(nil)
	return running(t, p, err)
}

// startPaced starts a paced loop, stopped when the test ends.
func startPaced(t *testing.T, pace time.Duration) *Poller {
	t.Helper()
	p, err := NewPaced(nil, pace)
	return running(t, p, err)
}

// running runs p, just created (err: how that failed), until the test ends.
func running(t *testing.T, p *Poller, err error) *Poller {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	go p.Run()
	t.Cleanup(func() {
		p.Stop()
		p.Wait()
	})
	return p
}

// addPairs registers on p, for each of hs, one end of a new socket pair
// (In, edge-triggered), and puts the other end, whose writes make it
// readable, in peers (on the loop). Both are closed when the test ends.
func addPairs(t *testing.T, p *Poller, hs []*recorder, peers []int) {
	t.Helper()
	fds := make([]FD, len(hs))
	on(t, p, func() {
		for i, h := range hs {
			a, b := socketpair(t)
			peers[i] = b
			if err := p.Add(&fds[i], a, In|Edge, h, 0); err != nil {
				t.Error(err)
			}
		}
	})
	t.Cleanup(func() {
		on(t, p, func() {
			for i := range fds {
				p.Close(&fds[i])
			}
		})
		for _, b := range peers {
			unix.Close(b)
		}
	})
}

// on runs fn on p's loop and waits for it.
func on(t *testing.T, p *Poller, fn func()) {
	t.Helper()
	done := make(chan struct{})
	if !p.Post(func() { defer close(done); fn() }) {
		t.Fatal("poller stopped")
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the loop did not run a posted function")
	}
}

func socketpair(t *testing.T) (int, int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fds[0], fds[1]
}

// An event collected for a descriptor that a handler earlier in the same
// batch closed, and whose number was reused at once for a new registration,
// never reaches the new owner.
func TestStaleEventAfterReuseIsDropped(t *testing.T) {
	p := start(t)
	a0, a1 := socketpair(t)
	b0, b1 := socketpair(t)
	defer func() {
		if a1 >= 0 { // closed below, and its number reused at once
			unix.Close(a1)
		}
	}()
	defer unix.Close(b1)
	var fa, fb, fc FD
	hA, hB, hC := &recorder{}, &recorder{}, &recorder{}
	var reused atomic.Bool
	var c1 int
	hB.onReady = func(uint8, uint32) {
		if reused.Load() {
			return // only the first event matters
		}
		// Close A, then make a new socket take A's number, as accept4 or
		// connect would, and register it.
		num := fa.Num()
		p.Close(&fa)
		c0, c := socketpair(t)
		c1 = c
		if c0 != num { // the lowest free number is usually A's already
			if err := unix.Dup3(c0, num, unix.O_CLOEXEC); err != nil {
				t.Error(err)
				return
			}
			unix.Close(c0)
		}
		if err := p.Add(&fc, num, In|RdHup|Edge, hC, 0); err != nil {
			t.Error(err)
			return
		}
		reused.Store(true)
	}
	on(t, p, func() {
		if err := p.Add(&fa, a0, In|RdHup|Edge, hA, 0); err != nil {
			t.Fatal(err)
		}
		if err := p.Add(&fb, b0, In|Edge, hB, 0); err != nil {
			t.Fatal(err)
		}
		// Both become ready while the loop runs this: the next epoll_wait
		// returns B's event, then A's, in one batch.
		unix.Write(b1, []byte("b"))
		unix.Close(a1)
		a1 = -1
	})
	// B's and A's events come in one batch, but the loop's inbox may come
	// first in it (its eventfd is level-triggered, so epoll keeps it at
	// the head of its ready list): wait for B's handler, then for a batch
	// after it. (One empty function posted was not enough: it ran before
	// B's event about once in 3,000 runs under -race.)
	deadline := time.Now().Add(5 * time.Second)
	for !reused.Load() {
		if time.Now().After(deadline) {
			t.Fatal("B's handler did not run")
		}
		on(t, p, func() {})
	}
	on(t, p, func() {})
	if n := hA.readyCount(); n != 0 {
		t.Fatalf("closed A got %d events", n)
	}
	if n := hC.readyCount(); n != 0 {
		t.Fatalf("the new owner of A's number got %d events meant for A", n)
	}
	// The new registration works.
	unix.Write(c1, []byte("c"))
	deadline = time.Now().Add(5 * time.Second)
	for hC.readyCount() == 0 && time.Now().Before(deadline) {
		on(t, p, func() {})
	}
	if hC.readyCount() == 0 {
		t.Fatal("the new registration got no event")
	}
	on(t, p, func() { p.Close(&fb); p.Close(&fc) })
	unix.Close(c1)
}

// busy is a handler whose descriptor is always readable (level-triggered,
// never read), so the loop always has events.
func busy(t *testing.T, p *Poller) func() {
	t.Helper()
	r0, r1 := socketpair(t)
	unix.Write(r1, []byte("x"))
	var f FD
	h := &recorder{}
	on(t, p, func() {
		if err := p.Add(&f, r0, In, h, 0); err != nil {
			t.Fatal(err)
		}
	})
	return func() {
		on(t, p, func() { p.Close(&f) })
		unix.Close(r1)
	}
}

// Timers fire on time while the loop never runs out of events, and a
// handler that keeps setting its timer to now does not starve them.
func TestTimersFireUnderLoad(t *testing.T) {
	p := start(t)
	defer busy(t, p)()
	spinner := &recorder{}
	var spin Timer
	spinner.onTimer = func() { p.Set(&spin, p.Now(), spinner) }
	on(t, p, func() { p.Set(&spin, p.Now(), spinner) })

	for _, d := range []time.Duration{20 * time.Millisecond, 100 * time.Millisecond, 300 * time.Millisecond} {
		fired := make(chan time.Duration, 1)
		h := &recorder{}
		var tm Timer
		var setAt int64
		h.onTimer = func() { fired <- time.Duration(p.Clock() - setAt) }
		on(t, p, func() {
			setAt = p.Clock()
			p.Set(&tm, setAt+int64(d), h)
		})
		select {
		case got := <-fired:
			// Never early; late only by scheduling (a loaded machine runs
			// other processes too): a starved timer fires only when the
			// events stop, which they never do here.
			if got < d || got > d+slack {
				t.Errorf("timer of %v fired after %v", d, got)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("timer of %v never fired", d)
		}
	}
	on(t, p, func() { p.Cancel(&spin) })
	spinner.mu.Lock()
	n := spinner.expired
	spinner.mu.Unlock()
	if n < 10 {
		t.Fatalf("the spinning timer ran %d times; the test proves nothing", n)
	}
}

// With nothing to do, the loop parks until its earliest timer.
func TestIdleLoopWakesForTimer(t *testing.T) {
	p := start(t)
	fired := make(chan time.Duration, 3)
	var ts [3]Timer
	hs := [3]*recorder{{}, {}, {}}
	var setAt int64
	for i := range hs {
		hs[i].onTimer = func() { fired <- time.Duration(p.Clock() - setAt) }
	}
	on(t, p, func() {
		setAt = p.Clock()
		p.Set(&ts[0], setAt+int64(150*time.Millisecond), hs[0])
		p.Set(&ts[1], setAt+int64(50*time.Millisecond), hs[1])
		p.Set(&ts[2], setAt+int64(100*time.Millisecond), hs[2])
		p.Cancel(&ts[2])
	})
	for _, want := range []time.Duration{50 * time.Millisecond, 150 * time.Millisecond} {
		select {
		case got := <-fired:
			if got < want || got > want+slack {
				t.Errorf("fired after %v, want %v", got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("timer never fired")
		}
	}
	select {
	case got := <-fired:
		t.Fatalf("a cancelled timer fired after %v", got)
	case <-time.After(150 * time.Millisecond):
	}
}

// A panic in one handler aborts that handler only; the loop and the others
// carry on.
func TestPanicIsContained(t *testing.T) {
	p := start(t)
	var panics atomic.Int64
	p.OnPanic = func() { panics.Add(1) } // before any event: set on the loop below
	bad, good := &recorder{}, &recorder{}
	bad.onReady = func(uint8, uint32) { panic("boom") }
	a0, a1 := socketpair(t)
	b0, b1 := socketpair(t)
	defer unix.Close(a1)
	defer unix.Close(b1)
	var fa, fb FD
	on(t, p, func() {
		p.Add(&fa, a0, In|Edge, bad, 0)
		p.Add(&fb, b0, In|Edge, good, 0)
	})
	unix.Write(a1, []byte("x"))
	deadline := time.Now().Add(5 * time.Second)
	for panics.Load() == 0 && time.Now().Before(deadline) {
		on(t, p, func() {})
	}
	if panics.Load() != 1 {
		t.Fatalf("panics counted %d, want 1", panics.Load())
	}
	bad.mu.Lock()
	aborted := len(bad.aborted) == 1 && bad.aborted[0] == "boom"
	bad.mu.Unlock()
	if !aborted {
		t.Fatal("the panicking handler was not aborted with its panic value")
	}
	unix.Write(b1, []byte("y"))
	for good.readyCount() == 0 && time.Now().Before(deadline) {
		on(t, p, func() {})
	}
	if good.readyCount() == 0 {
		t.Fatal("the loop stopped serving other handlers after a panic")
	}
	on(t, p, func() { p.Close(&fa); p.Close(&fb) })
}

// Registrations live in slots of a table as dense as the loop's own: more
// than a chunk of them each reach their own handler, and closing them all
// and registering as many again reuses the slots instead of growing the
// table (a table by descriptor number spanned the whole process's).
func TestSlotsAreDenseAndReused(t *testing.T) {
	p := start(t)
	const n = chunkSize + chunkSize/2
	fds := make([]FD, n)
	peers := make([]int, n)
	hs := make([]*recorder, n)
	register := func() {
		on(t, p, func() {
			for i := range fds {
				a, b := socketpair(t)
				peers[i], hs[i] = b, &recorder{}
				if err := p.Add(&fds[i], a, In|Edge, hs[i], 0); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
	closeAll := func() {
		on(t, p, func() {
			for i := range fds {
				p.Close(&fds[i])
				unix.Close(peers[i])
			}
		})
	}
	register()
	var chunks int
	on(t, p, func() { chunks = len(p.regs) })
	if chunks != 2 {
		t.Fatalf("%d registrations took %d chunks, want 2", n, chunks)
	}
	written := map[int]bool{}
	for _, i := range []int{0, chunkSize - 1, chunkSize, n - 1} {
		written[i] = true
		unix.Write(peers[i], []byte("x"))
		deadline := time.Now().Add(5 * time.Second)
		for hs[i].readyCount() == 0 && time.Now().Before(deadline) {
			on(t, p, func() {})
		}
		for j, h := range hs {
			want := 0
			if written[j] {
				want = 1
			}
			if got := h.readyCount(); got != want {
				t.Fatalf("after writes to %v: handler %d got %d events, want %d", written, j, got, want)
			}
		}
	}
	closeAll()
	register()
	on(t, p, func() { chunks = len(p.regs) })
	if chunks != 2 {
		t.Fatalf("registering again grew the table to %d chunks", chunks)
	}
	closeAll()
}

// A paced loop is not woken by events: those that come between rounds are
// handled together at the next round, a pace after the last, as is a post
// to the loop while it paces; a timer due sooner ends the wait on time; a
// post to an idle loop (no timer armed) runs at once.
func TestPacedLoopHandlesEventsInRounds(t *testing.T) {
	const pace = time.Second
	p := startPaced(t, pace)
	posted := time.Now()
	on(t, p, func() {})
	if d := time.Since(posted); d > slack {
		t.Fatalf("a post to an idle paced loop ran after %v", d)
	}

	type at struct {
		who  string
		when int64
	}
	seen := make(chan at, 8)
	peers := make([]int, 2)
	hs := []*recorder{{}, {}}
	var far, near Timer
	farH, nearH := &recorder{}, &recorder{}
	nearH.onTimer = func() { seen <- at{"timer", p.Clock()} }
	for i := range hs {
		hs[i].onReady = func(_ uint8, ev uint32) {
			if ev&In != 0 {
				seen <- at{[]string{"event 0", "event 1"}[i], p.Clock()}
			}
		}
	}
	// A timer's handler makes both sockets readable and posts: the last
	// thing its round does (nothing else is ready or posted), so what it
	// started waits for the next round.
	var trigger Timer
	var round int64
	triggerH := &recorder{}
	triggerH.onTimer = func() {
		round = p.Clock()
		unix.Write(peers[0], []byte("x"))
		unix.Write(peers[1], []byte("y"))
		p.Post(func() {
			seen <- at{"post", p.Clock()}
			p.Set(&near, p.Now()+int64(100*time.Millisecond), nearH)
		})
	}
	addPairs(t, p, hs, peers)
	on(t, p, func() {
		p.Set(&far, p.Now()+int64(time.Hour), farH) // the loop paces
		p.Set(&trigger, p.Now()+int64(100*time.Millisecond), triggerH)
	})
	t.Cleanup(func() { on(t, p, func() { p.Cancel(&far); p.Cancel(&near); p.Cancel(&trigger) }) })
	got := map[string]int64{}
	for len(got) < 4 {
		select {
		case a := <-seen:
			got[a.who] = a.when
		case <-time.After(10 * time.Second):
			t.Fatalf("only %v of two events, the post and the timer", got)
		}
	}
	for _, who := range []string{"event 0", "event 1", "post"} {
		if d := time.Duration(got[who] - round); d < pace {
			t.Errorf("%s handled %v after the round before, want the next round, %v after it: the loop woke for it", who, d, pace)
		}
	}
	if d := time.Duration(got["timer"] - got["post"]); d < 100*time.Millisecond || d > 100*time.Millisecond+slack {
		t.Errorf("a timer due 100ms after it was set fired after %v in a loop pacing every %v", d, pace)
	}
}

// A paced loop runs a posted function after every event that came before
// it, even when more are ready than one epoll_wait returns.
func TestPacedLoopPostsSeeEveryEventBefore(t *testing.T) {
	p := startPaced(t, time.Hour)
	n := len(p.events) + 44
	peers := make([]int, n)
	hs := make([]*recorder, n)
	for i := range hs {
		hs[i] = &recorder{}
	}
	addPairs(t, p, hs, peers)
	for _, b := range peers {
		unix.Write(b, []byte("x"))
	}
	var unseen int
	on(t, p, func() {
		for _, h := range hs {
			if h.readyCount() == 0 {
				unseen++
			}
		}
	})
	if unseen > 0 {
		t.Fatalf("a posted function ran before the events of %d of %d sockets written to before it was posted", unseen, n)
	}
}

// A function posted during a paced loop's round, after that round's
// epoll_wait, runs after the events that came before it even so: here a
// handler makes the second socket readable and then posts, on the loop, a
// check that the second socket's event was handled (a post from another
// goroutine can land at the same point of a round).
func TestPacedLoopPostDuringARoundWaitsForItsEvents(t *testing.T) {
	p := startPaced(t, time.Hour)
	peers := make([]int, 2)
	hs := []*recorder{{}, {}}
	result := make(chan int, 1)
	hs[0].onReady = func(_ uint8, ev uint32) {
		if ev&In == 0 {
			return
		}
		unix.Write(peers[1], []byte("y")) // after this round's epoll_wait
		p.Post(func() { result <- hs[1].readyCount() })
	}
	addPairs(t, p, hs, peers)
	unix.Write(peers[0], []byte("x"))
	p.Post(func() {}) // a round: the loop is idle, its events wait for one
	select {
	case n := <-result:
		if n == 0 {
			t.Fatal("a function posted during a round ran before the event that came before it")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the posted check never ran")
	}
}
