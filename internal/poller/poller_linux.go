//go:build linux

// Package poller is an epoll event loop that owns the descriptors registered
// in it and the deadlines of their owners.
//
// A Poller is driven by one goroutine (Run); every method but Post, Stop and
// Wait belongs to that goroutine and is called only from handlers it runs.
// Its rules are those of HAProxy's run_poll_loop and gnet's poller:
//
//   - Every registration carries a generation in the event's data, so an
//     event collected for a descriptor that was closed (and its number
//     reused) in the same batch is dropped instead of reaching the new owner.
//     The data names the registration's slot in this poller, not the
//     descriptor number: the table is as dense as the loop's own
//     registrations, where a table by number would span every descriptor of
//     the process in every loop (issue 13: 0.3 KiB per connection).
//   - A descriptor is closed by its owner, once, through Close, which forgets
//     its registration first.
//   - Deadlines live in a heap that is checked after every batch of events,
//     however busy the loop is, and the wait for the next batch ends at the
//     earliest deadline. The clock is read for every event.
//   - A panic in a handler is contained: the handler's Abort is called, the
//     stack is logged once, the OnPanic hook counts it, and the loop goes on.
//
// The loop does not block in epoll_wait itself: its epoll descriptor is
// registered with Go's netpoller, so the loop goroutine parks like any other
// and the scheduler keeps serving other goroutines on the same threads. The
// deadline of that park is the earliest timer. A paced loop (NewPaced)
// sleeps between rounds instead, and its events wait for the next round.
package poller

import (
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/rota-proxy/rota/internal/sock"
)

// Event bits, as epoll reports them.
const (
	In    = unix.EPOLLIN
	Out   = unix.EPOLLOUT
	RdHup = unix.EPOLLRDHUP
	Hup   = unix.EPOLLHUP
	Err   = unix.EPOLLERR
	// Edge makes a registration edge-triggered.
	Edge = unix.EPOLLET
	// Exclusive wakes one of the pollers that share a descriptor (a
	// listening socket in every loop).
	Exclusive = unix.EPOLLEXCLUSIVE
)

// Handler owns registrations and a timer in a Poller. Its methods run on the
// poller's goroutine.
type Handler interface {
	// Ready reports events on the registration made with tag.
	Ready(tag uint8, events uint32)
	// Expired reports that the handler's timer came due.
	Expired()
	// Abort is called after Ready or Expired panicked: the handler must
	// close what it owns without relying on its state, and never panic.
	Abort(cause any)
}

// FD is a descriptor owned by a handler and registered in a poller. The
// zero FD is none; Close makes it none again.
type FD struct {
	n    int32
	slot uint32 // the registration's place in the poller's table
	gen  uint32 // its generation; 0, which none has, for none
}

// Num is the descriptor number, for system calls; -1 for none.
func (f *FD) Num() int {
	if f.gen == 0 {
		return -1
	}
	return int(f.n)
}

// Valid reports whether f holds a descriptor.
func (f *FD) Valid() bool { return f.gen != 0 }

// registration is one slot of the table: its handler while in use, and
// the last generation given out in it, which outlives the use.
type registration struct {
	h   Handler
	gen uint32
	tag uint8
}

// Slots come in chunks that never move: the table grows without copying
// (and without leaving the old copy as garbage).
const (
	chunkBits = 8
	chunkSize = 1 << chunkBits
)

type chunk [chunkSize]registration

// reg is slot s of the table.
func (p *Poller) reg(s uint32) *registration { return &p.regs[s>>chunkBits][s&(chunkSize-1)] }

// Poller is one event loop. Create it with New, run it with Run.
type Poller struct {
	epfd int
	file *os.File // epfd, registered with Go's netpoller
	rc   syscall.RawConn
	evfd int // wakes the loop for its inbox
	log  *zap.Logger
	// OnPanic, if set, is told about every contained panic (a counter).
	// Set it before Run.
	OnPanic func()

	mu      sync.Mutex
	inbox   []func()
	woken   bool // evfd written, inbox not yet taken
	stopped bool // Stop was called: Post drops, the loop ends
	exited  chan struct{}

	// Below: the loop goroutine's own.
	taken    []func()
	regs     []*chunk // registrations by slot
	free     []uint32 // slots not in use, the most recently freed last
	events   [256]unix.EpollEvent
	timers   timerHeap
	deferred []*Timer // set due during expire: fired next round
	round    uint64   // expire rounds, to tell those apart
	base     time.Time
	now      int64 // nanoseconds since base, read per event
	wakeAt   int64 // deadline set on file; 0: none
	stop     bool
	logged   bool // a panic stack has been logged
	pollFn   func(uintptr) bool

	// A paced loop's (NewPaced): how long it waits between rounds while a
	// timer is armed, and what wakes it from waiting for a post.
	pace  time.Duration
	kick  chan struct{}
	sleep bool // under mu: the loop waits for a post, which kicks it
}

// New creates a poller. log may be nil.
func New(log *zap.Logger) (*Poller, error) {
	p, err := newPoller(log)
	if err != nil {
		return nil, err
	}
	epfd := p.epfd
	evfd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	fail := func(err error) (*Poller, error) {
		unix.Close(epfd)
		unix.Close(evfd)
		return nil, err
	}
	// The eventfd's data is generation 0, which no registration has
	// (generations start at 1).
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, evfd, &unix.EpollEvent{Events: unix.EPOLLIN}); err != nil {
		return fail(fmt.Errorf("epoll_ctl eventfd: %w", err))
	}
	// Non-blocking, so os.NewFile registers it with the netpoller.
	if err := unix.SetNonblock(epfd, true); err != nil {
		return fail(fmt.Errorf("epoll fd: %w", err))
	}
	file := os.NewFile(uintptr(epfd), "epoll")
	rc, err := file.SyscallConn()
	if err != nil {
		file.Close()
		unix.Close(evfd)
		return nil, fmt.Errorf("epoll fd: %w", err)
	}
	p.file, p.rc, p.evfd, p.pollFn = file, rc, evfd, p.poll
	return p, nil
}

// newPoller is what New and NewPaced share: the epoll descriptor (blocking,
// out of the netpoller until New says otherwise) and the clock.
func newPoller(log *zap.Logger) (*Poller, error) {
	if log == nil {
		log = zap.NewNop()
	}
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	return &Poller{epfd: epfd, evfd: -1, log: log, base: time.Now(), exited: make(chan struct{})}, nil
}

// NewPaced creates a poller whose loop is not woken by events: it handles
// what is ready in rounds, every pace while a timer is armed, and waits for
// a post when none is. An event waits for the next round, at most pace or
// until the earliest timer; a post waits for it too unless the loop is
// idle, and runs after every event that came before it (handleReady).
// For a loop whose events come in bursts and no one waits on them (the
// health prober's answers): one wake-up a round instead of one an answer,
// each of which costs about what the answer's packets do
// (bench/README.md). Its epoll descriptor is not in Go's netpoller, whose
// thread would otherwise wake for every event all the same.
func NewPaced(log *zap.Logger, pace time.Duration) (*Poller, error) {
	p, err := newPoller(log)
	if err != nil {
		return nil, err
	}
	p.pace, p.kick = pace, make(chan struct{}, 1)
	return p, nil
}

// Now is the loop's clock: nanoseconds since the poller was created, read
// before each event and after each batch.
func (p *Poller) Now() int64 { return p.now }

// Clock reads the clock afresh.
func (p *Poller) Clock() int64 { return int64(time.Since(p.base)) }

// Time converts a reading of the clock to a time.Time.
func (p *Poller) Time(t int64) time.Time { return p.base.Add(time.Duration(t)) }

// Add registers fd, which the caller hands over: from now on it is closed
// only by Close. Events on it are reported to h.Ready with tag. On failure
// fd is closed and f stays none.
func (p *Poller) Add(f *FD, fd int, events uint32, h Handler, tag uint8) error {
	if err := p.add(f, fd, events, h, tag); err != nil {
		sock.Close(fd)
		return err
	}
	return nil
}

// Share registers fd like Add, but fd stays its caller's: Forget (not
// Close) takes it out. Listening sockets, shared by every loop, are
// registered this way.
func (p *Poller) Share(f *FD, fd int, events uint32, h Handler, tag uint8) error {
	return p.add(f, fd, events, h, tag)
}

func (p *Poller) add(f *FD, fd int, events uint32, h Handler, tag uint8) error {
	if len(p.free) == 0 {
		base := uint32(len(p.regs)) << chunkBits
		p.regs = append(p.regs, new(chunk))
		for i := uint32(chunkSize); i > 0; i-- {
			p.free = append(p.free, base+i-1) // lowest slot taken first
		}
	}
	slot := p.free[len(p.free)-1]
	r := p.reg(slot)
	gen := r.gen + 1
	if gen == 0 {
		gen = 1
	}
	ev := unix.EpollEvent{Events: events, Fd: int32(slot), Pad: int32(gen)}
	if err := epollCtl(p.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return fmt.Errorf("epoll_ctl add: %w", err)
	}
	p.free = p.free[:len(p.free)-1]
	*r = registration{h: h, gen: gen, tag: tag}
	*f = FD{n: int32(fd), slot: slot, gen: gen}
	return nil
}

// Close forgets f's registration and closes its descriptor; f becomes none.
// Events for it still in the current batch are dropped. Closing none does
// nothing.
func (p *Poller) Close(f *FD) {
	if f.gen == 0 {
		return
	}
	fd := int(f.n)
	p.forget(f)
	sock.Close(fd)
}

// Forget takes a descriptor out of this poller without closing it: a shared
// one, or one its owner takes back to use again (the health prober's
// sockets). Events for it still in the current batch are dropped.
func (p *Poller) Forget(f *FD) {
	if f.gen == 0 {
		return
	}
	fd := int(f.n)
	p.forget(f)
	epollCtl(p.epfd, unix.EPOLL_CTL_DEL, fd, nil)
}

// Pause takes f out of the epoll set, keeping its registration, until
// Resume (a listener backing off after running out of descriptors).
func (p *Poller) Pause(f *FD) error {
	return epollCtl(p.epfd, unix.EPOLL_CTL_DEL, int(f.n), nil)
}

// Resume puts a paused f back with events.
func (p *Poller) Resume(f *FD, events uint32) error {
	return p.ctl(unix.EPOLL_CTL_ADD, f, events)
}

// Modify changes the events f is registered for. Edge-triggered, an event
// that is already true when added is reported (the kernel checks at once),
// so none is lost between a failed write and asking for Out.
func (p *Poller) Modify(f *FD, events uint32) error {
	return p.ctl(unix.EPOLL_CTL_MOD, f, events)
}

// ctl is epoll_ctl op for f's registration, its slot and generation in the
// event's data.
func (p *Poller) ctl(op int, f *FD, events uint32) error {
	ev := unix.EpollEvent{Events: events, Fd: int32(f.slot), Pad: int32(f.gen)}
	return epollCtl(p.epfd, op, int(f.n), &ev)
}

func (p *Poller) forget(f *FD) {
	if r := p.reg(f.slot); r.gen == f.gen && r.h != nil {
		r.h = nil // the generation stays: the slot's next one is newer
		p.free = append(p.free, f.slot)
	}
	*f = FD{}
}

// Post queues fn to run on the loop and wakes it. It never blocks. After
// Stop, fn is dropped and Post reports false.
func (p *Poller) Post(fn func()) bool {
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		return false
	}
	p.inbox = append(p.inbox, fn)
	if p.kick != nil {
		kick := p.sleep
		p.sleep = false
		p.mu.Unlock()
		if kick {
			p.kick <- struct{}{} // the loop took the last kick before it slept
		}
		return true
	}
	wake := !p.woken
	p.woken = true
	p.mu.Unlock()
	if wake {
		one := [8]byte{1}
		Write(p.evfd, one[:])
	}
	return true
}

// Stop ends Run after the functions posted so far have run (a paced loop's
// at its next round). Handlers still registered then are aborted (their
// owners must have closed them before, so this is a last resort). It does
// not wait; Wait does.
func (p *Poller) Stop() {
	p.Post(func() { p.stop = true })
	p.mu.Lock()
	p.stopped = true
	p.mu.Unlock()
}

// Wait blocks until Run has returned.
func (p *Poller) Wait() { <-p.exited }

// Run is the loop. It returns after Stop.
func (p *Poller) Run() {
	defer p.exit()
	if p.kick != nil {
		p.runPaced()
		return
	}
	for !p.stop {
		err := p.rc.Read(p.pollFn)
		switch {
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded):
			// The deadline is spent, and a Read with a past deadline fails
			// before polling: clear it; the next park sets one anew.
			p.file.SetReadDeadline(time.Time{})
			p.wakeAt = 0
		default:
			p.log.Error("event loop: waiting failed", zap.Error(err))
			return
		}
	}
}

func (p *Poller) exit() {
	p.mu.Lock()
	p.stopped = true
	p.mu.Unlock()
	for _, c := range p.regs {
		for i := range c {
			if h := c[i].h; h != nil {
				c[i].h = nil
				p.contain(func() { h.Abort(errors.New("event loop stopped")) })
			}
		}
	}
	if p.file != nil {
		p.file.Close()
		unix.Close(p.evfd)
	} else {
		unix.Close(p.epfd)
	}
	close(p.exited)
}

// runPaced is a paced loop: rounds of handleReady, and between them a wait
// for the next round (a timer armed) or for a post (none).
func (p *Poller) runPaced() {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		p.handleReady()
		if p.stop {
			return
		}
		next := p.timers.next()
		if next == 0 {
			p.mu.Lock()
			p.sleep = len(p.inbox) == 0
			sleep := p.sleep
			p.mu.Unlock()
			if sleep {
				<-p.kick
			}
			continue
		}
		timer.Reset(min(time.Duration(next-p.Clock()), p.pace))
		<-timer.C
	}
}

// handleReady is a paced loop's round: the posted functions are taken,
// then the events that are ready are handled, then the functions run, then
// the timers that came due fire, and again until none of them was there,
// or the loop is to stop. A posted function runs after an epoll_wait that
// began after it was posted and returned everything ready, so it finds
// every event that came before it handled: what a socket's handler last
// heard is what the socket held when the function was posted (the health
// prober's kept connections need no read to learn they hold nothing).
func (p *Poller) handleReady() {
	for {
		posted := p.takePosted()
		n := p.handleEvents()
		for n == len(p.events) { // more are ready
			n = p.handleEvents()
		}
		p.now = p.Clock()
		p.runPosted(posted)
		p.expire()
		if p.stop || n == 0 && len(posted) == 0 && !p.timers.due(p.now) {
			return
		}
	}
}

// handleEvents waits for nothing: it handles the events that are ready,
// as many as fit in the buffer, and returns how many.
func (p *Poller) handleEvents() int {
	n, err := epollWait(p.epfd, p.events[:])
	if err != nil && err != unix.EINTR {
		p.log.Error("event loop: epoll_wait", zap.Error(err))
		n = 0
	}
	for i := range n {
		ev := &p.events[i]
		p.now = p.Clock()
		p.event(ev)
	}
	return n
}

// takePosted takes what the inbox holds, for the caller to run
// (runPosted); the next Post wakes a loop that is not paced again.
func (p *Poller) takePosted() []func() {
	p.mu.Lock()
	p.taken, p.inbox = p.inbox, p.taken[:0]
	p.woken = false
	p.mu.Unlock()
	return p.taken
}

// runPosted runs fns, taken by takePosted, each with its panic contained.
func (p *Poller) runPosted(fns []func()) {
	for i, fn := range fns {
		fns[i] = nil
		p.contain(fn)
	}
}

// poll handles everything that is ready, then the timers that came due, and
// again until nothing is; it returns false, which parks the loop in the
// netpoller until the epoll descriptor has events or the earliest timer is
// due. It returns true (ending the park) only to stop.
//
// It asks epoll once more after every batch, even one that did not fill
// the buffer: under load, what came while the batch was handled is there,
// and that call is cheaper than parking and being woken by the netpoller
// for it (parking at once lost 2-14 % of a bulk stream's rate and saved
// nothing under connection load; bench/README.md).
func (p *Poller) poll(uintptr) bool {
	for {
		n := p.handleEvents()
		p.now = p.Clock()
		p.expire()
		if p.stop {
			return true
		}
		if n > 0 || p.timers.due(p.now) {
			continue
		}
		p.park()
		return false
	}
}

func (p *Poller) event(ev *unix.EpollEvent) {
	slot := uint32(ev.Fd)
	gen := uint32(ev.Pad)
	if gen == 0 {
		p.takeInbox() // the eventfd's
		return
	}
	if slot>>chunkBits >= uint32(len(p.regs)) {
		return
	}
	r := p.reg(slot)
	if r.gen != gen || r.h == nil {
		return // stale: closed (and maybe its slot reused) earlier in this batch
	}
	p.dispatch(r.h, r.tag, ev.Events)
}

func (p *Poller) dispatch(h Handler, tag uint8, events uint32) {
	defer p.recover(h)
	h.Ready(tag, events)
}

// Within runs fn, on the loop, as h's work: a panic in it is contained as
// h's (logged, h.Abort), not as that of the handler that called Within (an
// acceptor starting a connection must not be aborted for the
// connection's panic, nor the connection left half-started).
func (p *Poller) Within(h Handler, fn func()) {
	defer p.recover(h)
	fn()
}

func (p *Poller) fire(h Handler) {
	defer p.recover(h)
	h.Expired()
}

// recover contains a panic of h: h aborts, the stack is logged (in full
// the first time, then one line each), and OnPanic counts it.
func (p *Poller) recover(h Handler) {
	v := recover()
	if v == nil {
		return
	}
	if !p.logged {
		p.logged = true
		p.log.Error("event loop: handler panicked; closing its connection",
			zap.Any("panic", v), zap.ByteString("stack", debug.Stack()))
	} else {
		p.log.Error("event loop: handler panicked; closing its connection", zap.Any("panic", v))
	}
	if p.OnPanic != nil {
		p.OnPanic()
	}
	p.contain(func() { h.Abort(v) })
}

// contain runs fn, logging a panic instead of propagating it.
func (p *Poller) contain(fn func()) {
	defer func() {
		if v := recover(); v != nil {
			p.log.Error("event loop: panic while containing a panic", zap.Any("panic", v), zap.ByteString("stack", debug.Stack()))
		}
	}()
	fn()
}

func (p *Poller) takeInbox() {
	var b [8]byte
	Read(p.evfd, b[:])
	p.runPosted(p.takePosted())
}

// park sets the netpoller deadline to the earliest timer.
func (p *Poller) park() {
	next := p.timers.next()
	if next == p.wakeAt {
		return
	}
	p.wakeAt = next
	if next == 0 {
		p.file.SetReadDeadline(time.Time{})
		return
	}
	p.file.SetReadDeadline(p.Time(next))
}

// Timer is one handler's deadline in a poller. The zero Timer is unarmed.
type Timer struct {
	when  int64
	idx   int // position in the heap + 1; 0: not armed; -1: due, deferred to the next round
	round uint64
	h     Handler
}

// Set arms t to call h.Expired at when (a reading of Now), replacing any
// earlier setting. A time at or before Now fires after the current batch of
// events; set from Expired, it fires after the next batch, so a handler that
// keeps setting its timer to now cannot starve the others.
func (p *Poller) Set(t *Timer, when int64, h Handler) {
	t.h = h
	t.when = when
	t.round = p.round
	switch {
	case t.idx > 0:
		p.timers.fix(t.idx - 1)
	case t.idx == 0:
		p.timers.push(t)
	}
}

// Cancel disarms t.
func (p *Poller) Cancel(t *Timer) {
	switch {
	case t.idx > 0:
		p.timers.remove(t.idx - 1)
	case t.idx < 0:
		t.idx = 0 // dropped when the deferred timers go back
	}
}

// Armed reports whether t is set, and for when.
func (t *Timer) Armed() (int64, bool) { return t.when, t.idx != 0 }

// expire fires the timers that are due.
func (p *Poller) expire() {
	p.round++
	for p.timers.len() > 0 && p.timers.top().when <= p.now {
		t := p.timers.pop()
		if t.round == p.round {
			t.idx = -1
			p.deferred = append(p.deferred, t)
			continue
		}
		p.fire(t.h)
	}
	for i, t := range p.deferred {
		p.deferred[i] = nil
		if t.idx == -1 {
			t.idx = 0
			p.timers.push(t)
		}
	}
	p.deferred = p.deferred[:0]
}
