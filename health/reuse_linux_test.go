package health

import (
	"bufio"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rota-proxy/rota/internal/testenv"
)

// startProbe hands pr one probe of ap; its result comes on the channel.
func startProbe(t *testing.T, pr *tcpProber, ap netip.AddrPort, timeout time.Duration) <-chan error {
	t.Helper()
	errc := make(chan error, 1)
	if !pr.start([]tcpJob{{addr: ap, timeout: timeout, done: func(err error, _ *spec, _ *keptConn) { errc <- err }}}) {
		t.Fatal("prober closed")
	}
	return errc
}

// result waits for a probe's result.
func result(t *testing.T, errc <-chan error) error {
	t.Helper()
	select {
	case err := <-errc:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("probe did not end")
		return nil
	}
}

// idleSockets is the descriptors of pr's idle IPv4 sockets, read on its
// loop (which runs posts in order, so after every probe started before).
func idleSockets(pr *tcpProber) []int {
	got := make(chan []int, 1)
	pr.p.Post(func() {
		var fds []int
		for _, s := range pr.idle[0] {
			fds = append(fds, s.fd.Num())
		}
		got <- fds
	})
	return <-got
}

func startProber(t *testing.T) *tcpProber {
	t.Helper()
	pr, err := newTCPProber(nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pr.close)
	return pr
}

// A probe's socket serves the next probe of its family: it is kept after a
// probe ends, disconnected (the target reads a reset, as from a closed
// check), and the next probe connects it again rather than opening one, in
// the same registration.
func TestProbeSocketsAreUsedAgain(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pr := startProber(t)
	ap := netip.MustParseAddrPort(ln.Addr().String())
	var kept []int
	for i := range 5 {
		if err := result(t, startProbe(t, pr, ap, 5*time.Second)); err != nil {
			t.Fatalf("probe: %v", err)
		}
		now := idleSockets(pr)
		if len(now) != 1 || (i > 0 && now[0] != kept[0]) {
			t.Fatalf("after probe %d the idle sockets are %v, want the one kept before (%v)", i+1, now, kept)
		}
		kept = now
		ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("probe %d: the target read %v, want a reset", i+1, err)
		}
		c.Close()
	}
}

// A socket used again also waits again: a probe that timed out on a target
// whose accept queue is full leaves its socket idle, and the next probe on
// it, answered only when the kernel retries its SYN after the queue has
// room, ends through the same registration, connected, not on an event the
// timed-out connect or its disconnect left behind.
func TestProbeSocketUsedAgainWaitsForItsOwnAnswer(t *testing.T) {
	addr, makeRoom := testenv.StuckListenerWithRoom(t)
	ap := netip.MustParseAddrPort(addr)
	pr := startProber(t)
	if err := result(t, startProbe(t, pr, ap, 300*time.Millisecond)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a probe of a full queue: %v, want a timeout", err)
	}
	errc := startProbe(t, pr, ap, 5*time.Second) // the idle socket, its SYN dropped
	if n := len(idleSockets(pr)); n != 0 {       // read after the connect started
		t.Fatalf("%d idle sockets while the second probe runs, want its one in use", n)
	}
	makeRoom() // for the retried SYN
	start := time.Now()
	if err := result(t, errc); err != nil {
		t.Fatalf("the second probe: %v", err)
	}
	took := time.Since(start)
	t.Logf("answered %v after the queue had room", took)
	if took < 100*time.Millisecond {
		t.Fatalf("answered after %v: the connect did not wait for the retried SYN", took)
	}
	if n := len(idleSockets(pr)); n != 1 {
		t.Fatalf("%d idle sockets after two probes in turn, want the one used twice", n)
	}
}

// startKept hands pr one send_expect probe of ap, on kept if not nil; its
// result and the connection it leaves come on the channel.
func startKept(t *testing.T, pr *tcpProber, ap netip.AddrPort, steps []step, kept *probeSocket) <-chan keptResult {
	t.Helper()
	return startKeptTimeout(t, pr, ap, steps, kept, time.Second)
}

func startKeptTimeout(t *testing.T, pr *tcpProber, ap netip.AddrPort, steps []step, kept *probeSocket, timeout time.Duration) <-chan keptResult {
	t.Helper()
	res := make(chan keptResult, 1)
	j := tcpJob{addr: ap, timeout: timeout, steps: steps, kept: kept, done: func(err error, _ *spec, k *keptConn) {
		res <- keptResult{err, k}
	}}
	if !pr.start([]tcpJob{j}) {
		t.Fatal("prober closed")
	}
	return res
}

// serveLines serves connections that answer each line they read with
// answer, until it returns false (then the connection closes).
func serveLines(t *testing.T, answer func(c net.Conn) bool) string {
	t.Helper()
	return testenv.Serve(t, func(c net.Conn) {
		defer c.Close()
		r := bufio.NewReader(c)
		for {
			if _, err := r.ReadString('\n'); err != nil || !answer(c) {
				return
			}
		}
	})
}

// acked waits, up to 10 s, until the peer has acknowledged what was
// written on c: the bytes are in its socket's buffer, which told its
// epoll, and no longer in flight. A write on loopback returns before its
// bytes arrive when the kernel defers their delivery to ksoftirqd (a
// loaded machine: a CI run).
func acked(c net.Conn) {
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		return
	}
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		n := -1
		rc.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.TIOCOUTQ) }) // SIOCOUTQ: unacknowledged bytes
		if n == 0 {
			return
		}
	}
}

type keptResult struct {
	err  error
	kept *keptConn
}

// A kept connection is asked again only after what the last answer left
// unread is gone: an answer's tail that arrived after its probe matched
// (here naming the role the expect wants) does not pass the next probe,
// which reads its own answer.
func TestKeptConnectionDiscardsTheLastAnswersTail(t *testing.T) {
	tail := make(chan struct{})
	var answers atomic.Int64
	addr := serveLines(t, func(c net.Conn) bool {
		if answers.Add(1) == 1 {
			c.Write([]byte("role:master\r\n"))
			<-tail // the probe has matched and ended
			c.Write([]byte("connected_slaves:0\r\nrole:master\r\n"))
			acked(c)
			tail <- struct{}{}
			return true
		}
		c.Write([]byte("role:slave\r\n"))
		return true
	})
	ap := netip.MustParseAddrPort(addr)
	pr := startProber(t)
	steps := []step{{send: []byte("INFO replication\r\n")}, {expect: []byte("role:master")}}
	first := <-startKept(t, pr, ap, steps, nil)
	if first.err != nil || first.kept == nil {
		t.Fatalf("first probe: %v, kept %v", first.err, first.kept)
	}
	tail <- struct{}{}
	<-tail // in the kept socket's buffer, its event in the prober's epoll
	second := <-startKept(t, pr, ap, steps, first.kept.loop)
	if second.err == nil || !strings.Contains(second.err.Error(), `got "role:slave\r\n"`) {
		t.Fatalf("second probe on the kept connection: %v, want it to fail on its own answer", second.err)
	}
	if second.kept != nil {
		t.Fatal("a failed probe kept its connection")
	}
	if n := answers.Load(); n != 2 {
		t.Fatalf("the server answered %d times, want 2 (one connection, asked twice)", n)
	}
}

// An http check runs on the prober's loop: its request and answer, a
// kept connection asked again, and an answer that arrives in pieces (a
// chunked body, written a chunk at a time) judged once it is whole.
func TestHTTPCheckOnTheLoop(t *testing.T) {
	var conns, asks atomic.Int64
	next, stop := make(chan struct{}), make(chan struct{})
	addr := testenv.Serve(t, func(c net.Conn) {
		defer c.Close()
		conns.Add(1)
		r := bufio.NewReader(c)
		for {
			req, err := http.ReadRequest(r)
			if err != nil {
				return
			}
			if req.URL.Path != "/healthz" || req.Host != "check.example" {
				c.Write([]byte("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
				continue
			}
			if asks.Add(1) == 1 {
				c.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
				continue
			}
			c.Write([]byte("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\no\r\n"))
			select { // the probe has read the first chunk and waits
			case <-next:
			case <-stop:
				return
			}
			c.Write([]byte("1\r\nk\r\n0\r\n\r\n"))
		}
	})
	t.Cleanup(func() { close(stop) }) // before Serve's, which waits for the handler
	ap := netip.MustParseAddrPort(addr)
	sp := compile(Config{Check: CheckHTTP, Path: "/healthz", Host: "check.example", ExpectBody: "ok"})
	pr := startProber(t)
	probe := func(kept *probeSocket) <-chan keptResult {
		res := make(chan keptResult, 1)
		j := tcpJob{addr: ap, timeout: 5 * time.Second, req: []byte(sp.request(addr)), sp: sp, kept: kept,
			done: func(err error, _ *spec, k *keptConn) { res <- keptResult{err, k} }}
		if !pr.start([]tcpJob{j}) {
			t.Fatal("prober closed")
		}
		return res
	}
	first := <-probe(nil)
	if first.err != nil || first.kept == nil {
		t.Fatalf("first probe: %v, kept %v", first.err, first.kept)
	}
	s := first.kept.loop
	res := probe(s)
	// Read on the loop: the probe has the first chunk and goes on (a probe
	// that ended would have forgotten what it got).
	testenv.Eventually(t, "the probe holding the first chunk", 5*time.Second, func() bool {
		n := make(chan int, 1)
		pr.p.Post(func() { n <- len(s.got) })
		return <-n > 0
	})
	select {
	case r := <-res:
		t.Fatalf("the probe ended on half a chunked body: %v", r.err)
	default:
	}
	next <- struct{}{}
	second := <-res
	if second.err != nil || second.kept == nil {
		t.Fatalf("second probe: %v, kept %v", second.err, second.kept)
	}
	if n, a := conns.Load(), asks.Load(); n != 1 || a != 2 {
		t.Fatalf("%d connections and %d requests, want one connection asked twice", n, a)
	}
	second.kept.close()
}

// The loop reads a probe's socket only when an edge says something came
// (bench/README.md): an answer that arrives in two pieces, the expected
// text split between them, still passes; an answer cut short by the
// server's close fails at the close, with what came, not at the timeout.
func TestExchangeReadsWhatEachEdgeBrings(t *testing.T) {
	var mode atomic.Int64 // 0: split; 1: partial, then close
	addr := serveLines(t, func(c net.Conn) bool {
		c.Write([]byte("+PO"))
		if mode.Load() == 1 {
			return false // closed
		}
		time.Sleep(50 * time.Millisecond) // a second segment, a second edge
		c.Write([]byte("NG\r\n"))
		return true
	})
	ap := netip.MustParseAddrPort(addr)
	pr := startProber(t)
	steps := []step{{send: []byte("PING\r\n")}, {expect: []byte("+PONG")}}
	var kept *probeSocket
	for i := range 3 {
		r := <-startKept(t, pr, ap, steps, kept)
		if r.err != nil || r.kept == nil {
			t.Fatalf("probe %d of a split answer: %v, kept %v", i, r.err, r.kept)
		}
		kept = r.kept.loop
	}
	mode.Store(1)
	r := <-startKeptTimeout(t, pr, ap, steps, kept, 10*time.Second)
	if r.err == nil || !strings.Contains(r.err.Error(), `got "+PO" (EOF)`) {
		t.Fatalf("an answer cut short by a close: %v, want it to fail at the close with what came", r.err)
	}
}
