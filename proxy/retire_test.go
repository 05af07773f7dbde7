package proxy_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rota-proxy/rota/internal/testenv"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/proxy"
)

// streamByte is byte i of an endless stream: a reader can tell a prefix of it
// from anything else.
func streamByte(i int64) byte { return byte(i*7 + i>>8) }

// streamer is a backend connection that sends the pattern without pause
// and counts what it receives, until it reads EOF; then it closes. What
// it got and how its read ended are reported on done.
type streamer struct {
	got  atomic.Int64
	done chan streamEnd
	// hold, while open, keeps the backend from reading (its socket
	// buffers fill, and so do rota's).
	hold chan struct{}
}

type streamEnd struct {
	got int64
	err error // of the read that ended it: nil for EOF
}

func newStreamer(hold bool) *streamer {
	s := &streamer{done: make(chan streamEnd, 1)}
	if hold {
		s.hold = make(chan struct{})
	}
	return s
}

func (s *streamer) handle(c net.Conn) {
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		buf := make([]byte, 32<<10)
		var off int64
		for {
			select {
			case <-stop:
				return
			default:
			}
			for i := range buf {
				buf[i] = streamByte(off + int64(i))
			}
			c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			n, err := c.Write(buf)
			off += int64(n)
			if err != nil && !isTimeout(err) {
				return
			}
		}
	})
	if s.hold != nil {
		<-s.hold
	}
	n, err := io.Copy(io.Discard, c)
	s.got.Store(n)
	close(stop)
	wg.Wait()
	s.done <- streamEnd{got: n, err: err}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// pin makes rr offer only t, so the next connections go to it.
func pin(rr *balancer.RoundRobinBalancer, t *balancer.Target) { rr.Update([]*balancer.Target{t}) }

func TestRetireWindsDownAfterGrace(t *testing.T) { bothRelays(t, testRetireWindsDownAfterGrace) }

// A retired target's connections, idle and busy, are closed after the
// grace: every byte rota took from either side reaches the other, both
// sides see a FIN (never a reset), and the connections of other targets
// carry on.
func testRetireWindsDownAfterGrace(t *testing.T) {
	const grace = 300 * time.Millisecond
	echo := startBackend(t, echoHandler)
	busy := newStreamer(false)
	held := newStreamer(true)
	arrived := make(chan byte, 2)
	streams := startBackend(t, func(c net.Conn) {
		var role [1]byte // which client this is
		if _, err := io.ReadFull(c, role[:]); err != nil {
			return
		}
		arrived <- role[0]
		if role[0] == 'b' {
			busy.handle(c)
		} else {
			held.handle(c)
		}
	})
	other := startBackend(t, echoHandler)
	s := startProxy(t, proxy.Settings{RemovedConnGrace: proxy.Grace(grace)})
	tEcho, tStreams, tOther := balancer.NewTarget(echo.addr()), balancer.NewTarget(streams.addr()), balancer.NewTarget(other.addr())

	pin(s.rr, tEcho)
	idle := dial(t, s.addr)
	defer idle.Close()
	mustEcho(t, idle, "before")
	pin(s.rr, tStreams)
	busyC := dial(t, s.addr) // the backend streams to it
	defer busyC.Close()
	busyC.Write([]byte("b"))
	// rota picks when it takes the connection on: wait for that before
	// pinning another target.
	if r := <-arrived; r != 'b' {
		t.Fatalf("backend got role %q first", r)
	}
	heldC := dial(t, s.addr) // it streams to a backend that does not read
	defer heldC.Close()
	heldC.Write([]byte("h"))
	if r := <-arrived; r != 'h' {
		t.Fatalf("backend got role %q second", r)
	}
	pin(s.rr, tOther)
	spared := dial(t, s.addr)
	defer spared.Close()
	mustEcho(t, spared, "before")

	// The held backend's buffers and rota's fill; the client's writes
	// block until the wind-down stops reading it.
	var sent atomic.Int64
	var writer sync.WaitGroup
	writer.Go(func() {
		buf := make([]byte, 32<<10)
		var off int64
		for {
			for i := range buf {
				buf[i] = streamByte(off + int64(i))
			}
			n, err := heldC.Write(buf)
			off += int64(n)
			sent.Store(off)
			if err != nil {
				return
			}
		}
	})
	// The held client reads what its backend streams, to the end.
	heldRead := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, heldC)
		heldC.Close() // as a client does on EOF: its writes stop
		heldRead <- err
	}()
	// The busy client reads the stream as it comes, checking it.
	type readEnd struct {
		n   int64
		err error
		bad bool
		at  time.Time
	}
	busyDone := make(chan readEnd, 1)
	go func() {
		buf := make([]byte, 32<<10)
		var off int64
		for {
			n, err := busyC.Read(buf)
			for i := range n {
				if buf[i] != streamByte(off+int64(i)) {
					busyDone <- readEnd{n: off, bad: true}
					return
				}
			}
			off += int64(n)
			if err != nil {
				if err == io.EOF {
					err = nil
				}
				busyC.Close() // as a client does on EOF
				busyDone <- readEnd{n: off, err: err, at: time.Now()}
				return
			}
		}
	}()
	testenv.Eventually(t, "the busy stream and the held one to flow", 10*time.Second, func() bool {
		return tStreams.BytesIn.Load() > 256<<10 && tStreams.BytesOut.Load() > 256<<10
	})

	start := time.Now()
	s.p.Retire(tEcho, balancer.Removed)
	s.p.Retire(tStreams, balancer.Removed)

	// The idle client gets a FIN after the grace.
	idle.SetReadDeadline(time.Now().Add(grace + 10*time.Second))
	rest, err := io.ReadAll(idle)
	idleAt := time.Since(start)
	idle.Close() // as a client does on EOF
	if err != nil || len(rest) != 0 {
		t.Fatalf("idle connection: read %q, %v; want a clean EOF", rest, err)
	}
	if idleAt < grace-5*time.Millisecond {
		t.Fatalf("idle connection closed after %v, before the grace of %v", idleAt, grace)
	}

	b := <-busyDone
	if b.bad || b.err != nil {
		t.Fatalf("busy client: the stream broke at byte %d (corrupt %v, error %v); want the pattern then EOF", b.n, b.bad, b.err)
	}
	if b.at.Sub(start) < grace-5*time.Millisecond {
		t.Fatalf("busy connection closed after %v, before the grace", b.at.Sub(start))
	}
	if in := int64(tStreams.BytesIn.Load()); b.n > in {
		t.Fatalf("busy client got %d bytes, more than rota read from the backends (%d)", b.n, in)
	}
	// Let the held backend read now: it must get all rota took, then EOF.
	close(held.hold)
	h := <-held.done
	writer.Wait()
	if err := <-heldRead; err != nil {
		t.Fatalf("held client: %v; want EOF", err)
	}
	bs := <-busy.done
	if bs.err != nil || h.err != nil {
		t.Fatalf("the backends' reads ended with %v and %v; want EOF (a FIN, not a reset)", bs.err, h.err)
	}
	// What rota took from the clients reached the backends.
	if out := int64(tStreams.BytesOut.Load()) - 2; h.got+bs.got != out { // less the role bytes
		t.Fatalf("the backends got %d+%d bytes; rota took %d from the clients", h.got, bs.got, out)
	}
	if h.got == 0 || h.got > sent.Load() {
		t.Fatalf("held backend got %d bytes of the %d the client wrote", h.got, sent.Load())
	}
	if got := s.p.Stats.Closed[balancer.Removed].Load(); got != 3 {
		t.Fatalf("rota_connections_closed_total{reason=removed} = %d, want 3", got)
	}

	// The other target's connection was left alone.
	mustEcho(t, spared, "after")
	if a := tOther.Active.Load(); a != 1 {
		t.Fatalf("the other target has %d connections open, want 1", a)
	}
	// Once the peers closed, so did rota: well before WindLinger.
	deadline := time.Now().Add(relayWindLinger / 2)
	for tEcho.Active.Load() != 0 || tStreams.Active.Load() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the retired targets still have %d+%d connections open after their peers closed",
				tEcho.Active.Load(), tStreams.Active.Load())
		}
		time.Sleep(time.Millisecond)
	}
}

// relayWindLinger is relay.WindLinger (internal to proxy).
const relayWindLinger = 10 * time.Second

func TestRetireCalledOff(t *testing.T) { bothRelays(t, testRetireCalledOff) }

// A target taking connections again before the grace ends keeps them.
func testRetireCalledOff(t *testing.T) {
	const grace = 200 * time.Millisecond
	a := startBackend(t, echoHandler)
	b := startBackend(t, echoHandler)
	s := startProxy(t, proxy.Settings{RemovedConnGrace: proxy.Grace(grace)})
	ta, tb := balancer.NewTarget(a.addr()), balancer.NewTarget(b.addr())
	pin(s.rr, ta)
	ca := dial(t, s.addr)
	defer ca.Close()
	mustEcho(t, ca, "a")
	pin(s.rr, tb)
	cb := dial(t, s.addr)
	defer cb.Close()
	mustEcho(t, cb, "b")

	s.p.Retire(ta, balancer.Drained)
	s.p.Retire(ta, balancer.Kept) // undrained within the grace
	s.p.Retire(tb, balancer.Down)
	// b's wind-down, due at the same time as a's was, is the clock.
	cb.SetReadDeadline(time.Now().Add(10 * time.Second))
	if rest, err := io.ReadAll(cb); err != nil || len(rest) != 0 {
		t.Fatalf("down target's connection: %q, %v; want EOF", rest, err)
	}
	mustEcho(t, ca, "still here")
	if s.p.Stats.Closed[balancer.Drained].Load() != 0 || s.p.Stats.Closed[balancer.Down].Load() != 1 {
		t.Fatalf("closed: drained %d, down %d; want 0 and 1", s.p.Stats.Closed[balancer.Drained].Load(), s.p.Stats.Closed[balancer.Down].Load())
	}
}

func TestMaxConnAge(t *testing.T) { bothRelays(t, testMaxConnAge) }

// Connections older than max_conn_age are closed with a FIN, spread over
// +-10 % of it.
func testMaxConnAge(t *testing.T) {
	const age = 400 * time.Millisecond
	be := startBackend(t, echoHandler)
	s := startProxy(t, proxy.Settings{MaxConnAge: age}, be.addr())
	const n = 10
	type end struct {
		life time.Duration
		at   time.Time
		err  error
	}
	ends := make(chan end, n)
	for range n {
		c := dial(t, s.addr)
		defer c.Close()
		opened := time.Now()
		mustEcho(t, c, "x")
		go func() {
			rest, err := io.ReadAll(c)
			if err == nil && len(rest) != 0 {
				err = errors.New("unexpected bytes")
			}
			ends <- end{life: time.Since(opened), at: time.Now(), err: err}
		}()
	}
	var first, last time.Time
	for range n {
		e := <-ends
		if e.err != nil {
			t.Fatalf("connection ended with %v, want a clean EOF", e.err)
		}
		// Opened a little before rota accepted it; closed on rota's
		// timer, which may be late by this machine's scheduling.
		if e.life < age*9/10-5*time.Millisecond || e.life > age*11/10+2*time.Second {
			t.Fatalf("a connection lived %v; max_conn_age %v +-10 %%", e.life, age)
		}
		if first.IsZero() || e.at.Before(first) {
			first = e.at
		}
		if e.at.After(last) {
			last = e.at
		}
	}
	if last.Sub(first) < time.Millisecond {
		t.Fatalf("%d connections closed within %v of each other: no jitter", n, last.Sub(first))
	}
	if got := s.p.Stats.Closed[balancer.MaxAge].Load(); got != n {
		t.Fatalf("closed for max_age: %d, want %d", got, n)
	}
}

// mustEcho writes msg on c and reads it back.
func mustEcho(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, []byte(msg)) {
		t.Fatalf("echo: %q, %v; want %q", got, err, msg)
	}
	c.SetDeadline(time.Time{})
}

func TestMaxConnAgeBusy(t *testing.T) { bothRelays(t, testMaxConnAgeBusy) }

// A busy connection past max_conn_age is wound down without losing a byte:
// everything the target echoed reaches the client, in order, then a clean
// EOF; a younger connection is left alone.
func testMaxConnAgeBusy(t *testing.T) {
	const age = 500 * time.Millisecond
	be := startBackend(t, echoHandler)
	s := startProxy(t, proxy.Settings{MaxConnAge: age}, be.addr())
	busy := dial(t, s.addr)
	defer busy.Close()
	opened := time.Now()
	var sent bytes.Buffer
	received := make(chan []byte, 1)
	readErr := make(chan error, 1)
	go func() {
		b, err := io.ReadAll(busy)
		received <- b
		readErr <- err
	}()
	var young *net.TCPConn
	var youngOpened time.Time
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 256) // 4 KiB
	for i := 0; ; i++ {
		if young == nil && time.Since(opened) > age/2 {
			young = dial(t, s.addr)
			youngOpened = time.Now()
			defer young.Close()
			mustEcho(t, young, "y")
		}
		chunk[0] = byte(i)
		if _, err := busy.Write(chunk); err != nil {
			break // rota closed its side after the wind-down
		}
		sent.Write(chunk)
		select {
		case b := <-received:
			received <- b
		default:
			if time.Since(opened) < 5*time.Second {
				time.Sleep(time.Millisecond) // paces the stream; synchronises nothing
				continue
			}
			t.Fatal("the busy connection was not wound down within 5s")
		}
		break
	}
	got := <-received
	if err := <-readErr; err != nil {
		t.Fatalf("busy connection ended with %v, want a clean EOF", err)
	}
	life := time.Since(opened)
	if life < age*9/10 {
		t.Fatalf("wound down after %v, before max_conn_age", life)
	}
	if len(got) == 0 || !bytes.Equal(got, sent.Bytes()[:min(len(got), sent.Len())]) || len(got) > sent.Len() {
		t.Fatalf("received %d bytes that are not a prefix of the %d sent", len(got), sent.Len())
	}
	// The younger connection still works, while it is younger than its
	// own max_conn_age can be. (On a loaded machine the check may come
	// later: then it must have been wound down for its own age.)
	if time.Since(youngOpened) < age*9/10 {
		mustEcho(t, young, "still here")
		if n := s.p.Stats.Closed[balancer.MaxAge].Load(); n != 1 {
			t.Fatalf("closed for max_age: %d, want 1", n)
		}
		return
	}
	t.Logf("the check came %v after the young connection opened: it must have aged out too", time.Since(youngOpened))
	testenv.Eventually(t, "the young connection wound down for its own age", 10*time.Second, func() bool { return s.p.Stats.Closed[balancer.MaxAge].Load() == 2 })
	young.SetDeadline(time.Now().Add(10 * time.Second))
	if got, err := io.ReadAll(young); err != nil || len(got) != 0 {
		t.Fatalf("young connection after its max_conn_age: %q, %v; want a clean EOF", got, err)
	}
}
