package proxy_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/proxy"
)

// On Linux an open connection is two descriptors in a relay loop, not
// goroutines: a thousand idle clients must not cost a thousand stacks,
// whether they have spoken yet or not.
func TestIdleConnectionsHoldNoGoroutines(t *testing.T) {
	be := startBackend(t, echoHandler)
	s := startProxy(t, proxy.Settings{}, be.addr())
	warm := dial(t, s.addr) // starts the loops
	defer warm.Close()
	warm.Write([]byte("x"))
	io.ReadFull(warm, make([]byte, 1))

	// The backend runs in this process too, with a goroutine per
	// connection; count the proxy's share by subtracting it.
	base := runtime.NumGoroutine() - int(be.accepts.Load())
	const n = 200
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := range n {
		c := dial(t, s.addr)
		conns = append(conns, c)
		if i%2 == 0 { // half of them exchange a byte first
			c.Write([]byte("y"))
			if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
		}
	}
	testenv.Eventually(t, "all connections relayed", 10*time.Second, func() bool {
		return s.p.ActiveConns() == n+1 && be.accepts.Load() == n+1
	})
	testenv.Eventually(t, "handler goroutines gone", 10*time.Second, func() bool {
		return runtime.NumGoroutine()-int(be.accepts.Load())-base < n/10
	})
}

// Closing a proxy.Listener from outside (as a reload moving to a new
// address does) ends Serve, while connections it accepted carry on.
func TestClosingListenerEndsServeKeepsConnections(t *testing.T) {
	be := startBackend(t, echoHandler)
	rr := &balancer.RoundRobinBalancer{}
	rr.Update([]*balancer.Target{balancer.NewTarget(be.addr())})
	p := &proxy.Proxy{}
	p.Configure(proxy.Settings{}, proxy.Single(rr))
	defer p.Close()
	ln, err := proxy.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Serve(ln) }()
	c := dial(t, ln.Addr().String())
	defer c.Close()
	if _, err := c.Write([]byte("before")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	ln.Close()
	// Serve waits for its connections: it returns once c is done.
	if _, err := c.Write([]byte("after!")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "after!" {
		t.Fatalf("connection after the listener closed: %q %v", buf, err)
	}
	if _, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		t.Fatal("closed listener still accepts")
	}
	c.CloseWrite()
	io.ReadAll(c)
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Serve returned %v, want net.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after its listener was closed")
	}
}

// One loop relaying 64 bulk streams still keeps time: a quiet connection is
// cut between one and two idle timeouts after its last byte, and a dial
// timeout fires on time. (The loop checks its timers after every batch of
// events, not only when it runs out of them.) The bulk backend and its
// clients run in another process, as they would in production, so that the
// loop does not share this process's scheduler with 128 busy goroutines.
func TestTimersKeepTimeUnderBulkLoad(t *testing.T) {
	const idle = 300 * time.Millisecond
	helper := startBulkHelper(t)
	engine := proxy.NewEngine(1, nil)
	defer engine.Close()
	p := &proxy.Proxy{Engine: engine}
	p.Configure(proxy.Settings{IdleTimeout: idle}, proxy.Single(newOrderedPicker(helper.backend)))
	stuck := testenv.StuckListener(t)
	pd := &proxy.Proxy{Engine: engine}
	pd.Configure(proxy.Settings{DialTimeout: 200 * time.Millisecond, Retries: 0}, proxy.Single(newOrderedPicker(stuck)))
	var serving sync.WaitGroup
	serve := func(px *proxy.Proxy) string {
		ln, err := proxy.Listen("127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		serving.Go(func() { px.Serve(ln) })
		return ln.Addr().String()
	}
	bulkAddr, dialAddr := serve(p), serve(pd)
	defer func() {
		helper.stop(t)
		p.Close()
		pd.Close()
		serving.Wait()
	}()
	helper.pull(t, bulkAddr, 64)

	for i := range 3 {
		quiet := dial(t, bulkAddr)
		// The proxy sees the connection's last byte (the echo) between
		// this write and the echo's arrival: the cut may come no sooner
		// than idle after the first and no later than 2*idle after the
		// second.
		// (An echo later than idle is a quiet connection too: then the
		// request was the last byte.)
		probe := startLatencyProbe()
		sent := time.Now()
		quiet.Write([]byte("q"))
		last := sent
		_, err := io.ReadFull(quiet, make([]byte, 1))
		if err == nil {
			last = time.Now()
			_, err = io.ReadAll(quiet)
		} else if err == io.EOF {
			err = nil
		}
		quiet.Close()
		early, late := time.Since(sent), time.Since(last)
		// On a shared machine this goroutine itself may run late: what
		// it sees is allowed that much more (the loop's own lateness,
		// seconds when its timers starved, is not).
		lag := probe()
		if err != nil || early < idle || late > 2*idle+lag {
			t.Fatalf("quiet connection %d cut %v after its request, %v after the answer (%v); want between %v and %v (+%v of this process's scheduling lag)",
				i, early, late, err, idle, 2*idle, lag)
		}
		t.Logf("quiet connection cut %v after its request, %v after the answer (scheduling lag %v)", early, late, lag)

		began := time.Now() // before the proxy can have accepted and dialled
		c := dial(t, dialAddr)
		_, err = io.ReadAll(c)
		took := time.Since(began)
		c.Close()
		if err != nil || took < 200*time.Millisecond || took > 500*time.Millisecond {
			t.Fatalf("dial timeout of 200ms ended the client after %v (%v)", took, err)
		}
		t.Logf("dial timeout of 200ms ended the client after %v", took)
	}
	if p.Stats.BytesIn.Load() < 64<<20 {
		t.Fatal("the bulk streams did not flow through the proxy")
	}
}

// A connection that sent one byte and got no answer costs the proxy no
// more than 2 KiB: with replay off nothing is kept once the byte reached the
// target, and an open connection holds no goroutine. The clients are raw
// sockets and the target never accepts (the kernel completes the
// handshakes), so the memory measured is the proxy's alone.
func TestSlowClientsCostLittleMemory(t *testing.T) {
	const n = 2000
	target, err := net.Listen("tcp", "127.0.0.1:0") // never accepts
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	s := startProxy(t, proxy.Settings{}, target.Addr().String())
	proxyAddr := netip.MustParseAddrPort(s.addr)

	// Warm up: the loops and their tables exist before measuring.
	warm := rawClients(t, proxyAddr, 50)
	defer closeAll(warm)
	testenv.Eventually(t, "warm-up relayed", 10*time.Second, func() bool { return s.p.Stats.BytesOut.Load() == 50 })

	before := goMemory()
	fds := rawClients(t, proxyAddr, n)
	defer closeAll(fds)
	testenv.Eventually(t, "every byte relayed", 10*time.Second, func() bool { return s.p.Stats.BytesOut.Load() == 50+n })
	after := goMemory()
	per := (int64(after) - int64(before)) / n
	t.Logf("%d one-byte connections: %d bytes of Go memory each", n, per)
	if per > 2048 {
		t.Fatalf("%d bytes per connection, want at most 2 KiB", per)
	}
	// What it holds is its conn (a 512-byte size class) and its two
	// registrations in the poller's slot table. The tighter bound catches
	// a table that spans every descriptor of the process in every loop
	// (912 bytes a connection at two loops) or a struct that outgrows its
	// class; measured 557.
	if per > 640 {
		t.Fatalf("%d bytes per connection, want at most 640: more than the conn and its registrations", per)
	}
}

// goMemory is the Go heap and stacks in use after a collection.
func goMemory() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc + ms.StackInuse
}

// rawClients connects n raw sockets to addr, each sending one byte.
func rawClients(t *testing.T, addr netip.AddrPort, n int) []int {
	t.Helper()
	sa := &unix.SockaddrInet4{Port: int(addr.Port()), Addr: addr.Addr().As4()}
	fds := make([]int, 0, n)
	for range n {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			closeAll(fds)
			t.Fatal(err)
		}
		if err := unix.Connect(fd, sa); err != nil {
			unix.Close(fd)
			closeAll(fds)
			t.Fatal(err)
		}
		unix.Write(fd, []byte("x"))
		fds = append(fds, fd)
	}
	return fds
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// startLatencyProbe measures how late this process's goroutines are
// scheduled: it sleeps 5 ms over and over and keeps the worst overshoot.
// The returned function stops it and reports that overshoot.
func startLatencyProbe() func() time.Duration {
	stop := make(chan struct{})
	done := make(chan time.Duration)
	go func() {
		var worst time.Duration
		for {
			select {
			case <-stop:
				done <- worst
				return
			default:
			}
			start := time.Now()
			time.Sleep(5 * time.Millisecond) // the measurement itself, not synchronisation
			worst = max(worst, time.Since(start)-5*time.Millisecond)
		}
	}()
	return func() time.Duration {
		close(stop)
		return <-done
	}
}

// Downloads whose clients do not read hold their splice pipes full; the
// engine keeps at most its bound of pipes open, and the transfers past it
// go by read and write, every byte intact.
func TestPipesBoundedUnderStalledDownloads(t *testing.T) {
	const size, clients, limit = 4 << 20, 6, 2
	payload := make([]byte, size)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	be := startBackend(t, func(c net.Conn) { c.Write(payload) })
	e := proxy.NewEngine(0, nil)
	t.Cleanup(e.Close) // after the proxy's (cleanups run last first)
	proxy.LimitPipes(e, limit)
	s := startProxyWith(t, &proxy.Proxy{Engine: e}, proxy.Settings{}, be.addr())
	var peak atomic.Int64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			if n := int64(proxy.PipesOpen(e)); n > peak.Load() {
				peak.Store(n)
			}
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	var cs []*net.TCPConn
	for range clients {
		c := dial(t, s.addr)
		defer c.Close()
		cs = append(cs, c)
	}
	testenv.Eventually(t, "the bound's pipes taken by stalled downloads", 10*time.Second, func() bool { return proxy.PipesOpen(e) == limit })
	for i, c := range cs {
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		got := make([]byte, size)
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("download %d: %v, bytes intact %v", i, err, bytes.Equal(got, payload))
		}
	}
	close(stop)
	<-sampled
	if p := peak.Load(); p > limit {
		t.Fatalf("%d pipes open at once, bound %d", p, limit)
	}
}

// Clients queued beyond an accept batch (32) are all taken, even when
// nothing else happens in the loop to wake it again: a listener is
// level-triggered, and epoll wakes no one for what it reports again, so
// the loop must ask before it parks. Clients over max_conns are closed at
// once, unregistered, so taking them is the loop's only work.
func TestQueuedClientsBeyondABatchAreAccepted(t *testing.T) {
	be := startBackend(t, echoHandler)
	e := proxy.NewEngine(1, nil)
	t.Cleanup(e.Close) // after the proxy's
	s := startProxyWith(t, &proxy.Proxy{Engine: e}, proxy.Settings{MaxConns: 1}, be.addr())
	held := dial(t, s.addr) // the one slot, held
	defer held.Close()
	held.Write([]byte("x"))
	if _, err := io.ReadFull(held, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	release := proxy.StallLoops(t, e)
	const n = 100
	for range n {
		c := dial(t, s.addr) // completes in the listener's queue
		defer c.Close()
	}
	release()
	testenv.Eventually(t, "every queued client taken", 10*time.Second, func() bool { return s.p.Stats.Rejected.Load() == n })
}

// A client's socket is in its loop's epoll set without Out until a write
// to it blocks: each change of its state (our shutdown, the client's ACK
// of that FIN) would otherwise raise an Out edge that wakes the loop for
// nothing. Once a write blocks, Out is there, and a client that
// was slow to read still gets every byte.
func TestClientRegisteredForOutOnlyOnceAWriteBlocks(t *testing.T) {
	const big = 16 << 20
	echo := startBackend(t, echoHandler)
	bulk := startBackend(t, func(c net.Conn) {
		c.Write(make([]byte, big))
		c.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c)
	})
	s := startProxy(t, proxy.Settings{}, echo.addr())
	c := dial(t, s.addr)
	defer c.Close()
	for range 3 {
		c.Write([]byte("ping"))
		if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
			t.Fatal(err)
		}
	}
	if ev, ok := loopEvents(t, s.addr, c.LocalAddr().String()); !ok || ev&unix.EPOLLOUT != 0 || ev&unix.EPOLLIN == 0 {
		t.Fatalf("an exchanging client's registration: events %#x (found %v), want In without Out", ev, ok)
	}

	s.rr.Update([]*balancer.Target{balancer.NewTarget(bulk.addr())})
	slow := dial(t, s.addr) // reads nothing yet: the proxy's writes block
	defer slow.Close()
	testenv.Eventually(t, "Out added once a write blocked", 10*time.Second, func() bool {
		ev, ok := loopEvents(t, s.addr, slow.LocalAddr().String())
		return ok && ev&unix.EPOLLOUT != 0
	})
	n, err := io.Copy(io.Discard, slow)
	if err != nil || n != big {
		t.Fatalf("the slow client got %d bytes (%v), want %d", n, err, big)
	}
}

// loopEvents is the epoll event mask of the proxy's socket for the client
// at client (its local address) on the proxy's listen address, from the
// line for its descriptor in an epoll descriptor's fdinfo.
func loopEvents(t *testing.T, listen, client string) (uint32, bool) {
	t.Helper()
	sockFD, ok := socketFD(t, listen, client)
	if !ok {
		return 0, false
	}
	fds, _ := os.ReadDir("/proc/self/fd")
	for _, e := range fds {
		if link, _ := os.Readlink("/proc/self/fd/" + e.Name()); link != "anon_inode:[eventpoll]" {
			continue
		}
		info, _ := os.ReadFile("/proc/self/fdinfo/" + e.Name())
		for _, line := range strings.Split(string(info), "\n") {
			f := strings.Fields(line)
			if len(f) >= 4 && f[0] == "tfd:" && f[1] == strconv.Itoa(sockFD) && f[2] == "events:" {
				ev, err := strconv.ParseUint(f[3], 16, 32)
				return uint32(ev), err == nil
			}
		}
	}
	return 0, false
}

// socketFD is this process's descriptor of the TCP socket from local to
// remote: its inode in /proc/net/tcp, then the descriptor in
// /proc/self/fd that links to it.
func socketFD(t *testing.T, local, remote string) (int, bool) {
	t.Helper()
	f := procTCP(t, local, remote)
	if len(f) <= 9 {
		return 0, false
	}
	inode := f[9]
	fds, _ := os.ReadDir("/proc/self/fd")
	for _, e := range fds {
		if link, _ := os.Readlink("/proc/self/fd/" + e.Name()); link == "socket:["+inode+"]" {
			n, err := strconv.Atoi(e.Name())
			return n, err == nil
		}
	}
	return 0, false
}

// A target's socket gets TCP_NODELAY before a write Nagle's algorithm
// could hold back (a second one, or a first longer than a segment), and
// not before: a connection that writes its target once saves the call.
func TestTargetGetsNoDelayBeforeAWriteNagleCouldHold(t *testing.T) {
	accepted := make(chan net.Conn, 2)
	be := startBackend(t, func(c net.Conn) {
		accepted <- c
		echoHandler(c)
	})
	s := startProxy(t, proxy.Settings{}, be.addr())
	noDelay := func(bc net.Conn) int {
		fd, ok := socketFD(t, bc.RemoteAddr().String(), bc.LocalAddr().String())
		if !ok {
			t.Fatal("the proxy's socket to the target not found")
		}
		v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	exchange := func(c net.Conn, msg []byte) {
		t.Helper()
		c.Write(msg)
		if _, err := io.ReadFull(c, make([]byte, len(msg))); err != nil {
			t.Fatal(err)
		}
	}

	c := dial(t, s.addr)
	defer c.Close()
	exchange(c, []byte("ping"))
	bc := <-accepted
	if v := noDelay(bc); v != 0 {
		t.Fatalf("after one small write: TCP_NODELAY %d, want 0 (not needed yet)", v)
	}
	exchange(c, []byte("pong"))
	if v := noDelay(bc); v == 0 {
		t.Fatal("after a second write: no TCP_NODELAY")
	}

	big := dial(t, s.addr)
	defer big.Close()
	exchange(big, bytes.Repeat([]byte("x"), 2000))
	if v := noDelay(<-accepted); v == 0 {
		t.Fatal("after a first write longer than a segment: no TCP_NODELAY")
	}
}

// A side's last bytes and its FIN, both in before the loop reads them,
// reach the other side in one segment, as HAProxy sends them: written with
// MSG_MORE, the bytes wait in the socket for the shutdown that follows,
// which adds the FIN to them. Two segments would cost the peer's kernel a
// second receive and an ACK of its own (bench/README.md). Both directions:
// a target's answer and close, and a client's request and half-close.
func TestLastBytesAndTheFINGoInOneSegment(t *testing.T) {
	accepted := make(chan net.Conn, 2)
	asked, answer, hold := make(chan struct{}, 1), make(chan struct{}), make(chan struct{})
	defer close(hold)
	got := make(chan string, 1)
	be := startBackend(t, func(c net.Conn) {
		accepted <- c
		b := make([]byte, 4)
		if _, err := io.ReadFull(c, b); err != nil {
			return
		}
		if string(b) == "ping" { // the target answers, then closes
			asked <- struct{}{}
			<-answer
			c.Write([]byte("pong"))
			c.Close()
			return
		}
		rest, _ := io.ReadAll(c) // the client's request ends with its FIN
		got <- string(b) + string(rest)
		<-hold // c stays open to be measured
	})
	e := proxy.NewEngine(1, nil)
	t.Cleanup(e.Close) // after the proxy's
	s := startProxyWith(t, &proxy.Proxy{Engine: e}, proxy.Settings{}, be.addr())

	// The target's answer and FIN, to the client.
	c := dial(t, s.addr)
	defer c.Close()
	c.Write([]byte("ping"))
	bc := <-accepted
	<-asked // the loop passed the request on: nothing of it waits in the loop
	release := proxy.StallLoops(t, e)
	close(answer)
	testenv.Eventually(t, "the target's answer and FIN in the proxy's socket", 10*time.Second, func() bool {
		return tcpState(t, bc.RemoteAddr().String(), bc.LocalAddr().String()) == tcpCloseWait
	})
	before := segsIn(t, c)
	release()
	if b, err := io.ReadAll(c); err != nil || string(b) != "pong" {
		t.Fatalf("the client got %q, %v", b, err)
	}
	if n := segsIn(t, c) - before; n != 1 {
		t.Fatalf("the answer and the FIN reached the client in %d segments, want 1", n)
	}

	// The client's request and FIN, to the target.
	c2 := dial(t, s.addr)
	defer c2.Close()
	bc2 := <-accepted
	release = proxy.StallLoops(t, e)
	c2.Write([]byte("request"))
	c2.CloseWrite()
	testenv.Eventually(t, "the client's request and FIN in the proxy's socket", 10*time.Second, func() bool {
		return tcpState(t, s.addr, c2.LocalAddr().String()) == tcpCloseWait
	})
	before = segsIn(t, bc2)
	release()
	if r := <-got; r != "request" {
		t.Fatalf("the target got %q", r)
	}
	if n := segsIn(t, bc2) - before; n != 1 {
		t.Fatalf("the request and the FIN reached the target in %d segments, want 1", n)
	}
}

// tcpCloseWait is CLOSE_WAIT as /proc/net/tcp writes it: the peer's FIN
// is in.
const tcpCloseWait = "08"

// tcpState is the state of the TCP socket from local to remote in
// /proc/net/tcp, or "" if there is none.
func tcpState(t *testing.T, local, remote string) string {
	t.Helper()
	if f := procTCP(t, local, remote); len(f) > 3 {
		return f[3]
	}
	return ""
}

// procTCP is the line of /proc/net/tcp for the socket from local to
// remote, split into its fields (the last such line), or nil.
func procTCP(t *testing.T, local, remote string) []string {
	t.Helper()
	tcp, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	l, r := hexAddr(local), hexAddr(remote)
	var found []string
	for _, line := range strings.Split(string(tcp), "\n") {
		f := strings.Fields(line)
		if len(f) > 2 && f[1] == l && f[2] == r {
			found = f
		}
	}
	return found
}

// segsIn is the count of segments c's socket has received (TCP_INFO).
func segsIn(t *testing.T, c net.Conn) uint32 {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	if err := rc.Control(func(fd uintptr) {
		info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); err != nil {
		t.Fatal(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	return info.Segs_in
}

// hexAddr is an IPv4 address and port as /proc/net/tcp writes them.
func hexAddr(a string) string {
	ap := netip.MustParseAddrPort(a)
	b := ap.Addr().As4()
	return fmt.Sprintf("%02X%02X%02X%02X:%04X", b[3], b[2], b[1], b[0], ap.Port())
}
