package relay

import (
	"bytes"
	"errors"
	"math"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/rota-proxy/rota/balancer"
)

// fixed is a picker over a fixed list, starting at the first.
type fixed []*balancer.Target

func (f fixed) PickFor(netip.Addr, string) balancer.Cursor { return f.Pick() }

func (f fixed) Pick() balancer.Cursor {
	var rr balancer.RoundRobinBalancer
	rr.Update(f)
	c := rr.Pick()
	// RoundRobin starts at a random index; walk to the first target so
	// the tests know the order.
	for i := 0; i < len(f); i++ {
		probe := c
		if probe.Next() == f[0] {
			return c
		}
		c = rr.Pick()
	}
	return c
}

var (
	client = netip.MustParseAddrPort("10.1.1.1:5000")
	listen = netip.MustParseAddrPort("10.2.2.2:80")
)

type harness struct {
	t       *testing.T
	c       Conn
	cfg     Config
	stats   Stats
	targets []*balancer.Target
	reports []string
	now     int64
}

func newHarness(t *testing.T, cfg Config, n int) *harness {
	h := &harness{t: t, cfg: cfg}
	for i := range n {
		h.targets = append(h.targets, balancer.NewTarget(string(rune('a'+i))+":1"))
	}
	if h.cfg.Route == nil {
		h.cfg.Picker = fixed(h.targets)
	}
	h.c.Init(&h.cfg, &h.stats, func(addr string, err error) { h.reports = append(h.reports, addr) }, client, listen, 0)
	return h
}

func (h *harness) want(got, want Action) {
	h.t.Helper()
	if got != want {
		h.t.Fatalf("action %v, want %v (state %v, err %v)", got, want, h.c.State(), h.c.Err)
	}
}

// connect starts the connection and completes the dial to the first target.
func (h *harness) connect() {
	h.t.Helper()
	h.want(h.c.Start(h.now), Dial)
	h.want(h.c.Dialed(h.now), Flush)
	h.flush(-1)
}

// flush writes up to n bytes of Pending (all when n < 0) and returns them.
func (h *harness) flush(n int) []byte {
	var out []byte
	for {
		p := h.c.Pending()
		if len(p) == 0 || n == 0 {
			return out
		}
		k := len(p)
		if n > 0 {
			k = min(k, n)
			n -= k
		}
		out = append(out, p[:k]...)
		h.c.Wrote(k)
	}
}

func TestNoTargetRefuses(t *testing.T) {
	h := newHarness(t, Config{}, 0)
	h.want(h.c.Start(0), Refused)
	if !errors.Is(h.c.Err, ErrNoTarget) || h.stats.NoTarget.Load() != 1 {
		t.Fatalf("err %v, NoTarget %d", h.c.Err, h.stats.NoTarget.Load())
	}
}

func TestFailedDialsTryEachTargetOnceUpToRetries(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{Retries: 5}}, 3)
	h.want(h.c.Start(0), Dial)
	var tried []string
	for range 3 {
		tried = append(tried, h.c.Target().Addr)
		a := h.c.DialFailed(syscall.ECONNREFUSED, 0)
		if len(tried) < 3 {
			h.want(a, Dial)
		} else {
			h.want(a, Refused)
		}
	}
	if strings.Join(tried, ",") != "a:1,b:1,c:1" || strings.Join(h.reports, ",") != "a:1,b:1,c:1" {
		t.Fatalf("tried %v, reported %v", tried, h.reports)
	}
	if !errors.Is(h.c.Err, syscall.ECONNREFUSED) || h.stats.DialErrors.Load() != 3 || h.targets[0].DialErrors.Load() != 1 {
		t.Fatalf("err %v, dial errors %d", h.c.Err, h.stats.DialErrors.Load())
	}

	h = newHarness(t, Config{Settings: Settings{Retries: 1}}, 3)
	h.want(h.c.Start(0), Dial)
	h.want(h.c.DialFailed(syscall.ECONNREFUSED, 0), Dial)
	h.want(h.c.DialFailed(syscall.ECONNREFUSED, 0), Refused)
	if len(h.reports) != 2 {
		t.Fatalf("%d attempts, want 1 + retries", len(h.reports))
	}
}

// Retries at the int's limit try every target once; it does not wrap to
// no tries at all.
func TestRetriesAtTheLimitTryEveryTarget(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{Retries: math.MaxInt}}, 3)
	h.want(h.c.Start(0), Dial)
	h.want(h.c.DialFailed(syscall.ECONNREFUSED, 0), Dial)
	h.want(h.c.DialFailed(syscall.ECONNREFUSED, 0), Dial)
	h.want(h.c.DialFailed(syscall.ECONNREFUSED, 0), Refused)
	if len(h.reports) != 3 {
		t.Fatalf("%d attempts, want each of the 3 targets once", len(h.reports))
	}
}

func TestDialTimeout(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{DialTimeout: time.Second, Retries: 1}}, 2)
	h.want(h.c.Start(0), Dial)
	if d := h.c.Deadline(); d != int64(time.Second) {
		t.Fatalf("deadline %v", time.Duration(d))
	}
	h.want(h.c.Expired(int64(time.Second)-1), Continue)
	h.want(h.c.Expired(int64(time.Second)), Dial)
	if h.c.Target().Addr != "b:1" || len(h.reports) != 1 {
		t.Fatalf("after a timeout: target %s, reports %v", h.c.Target().Addr, h.reports)
	}
	if d := h.c.Deadline(); d != int64(2*time.Second) {
		t.Fatalf("second attempt's deadline %v", time.Duration(d))
	}
}

// With replay off (the default) the first client byte to reach the target
// ends the window: a later reset is the client's, and nothing is kept.
func TestReplayOffResetAfterFirstByteIsTheClients(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{Retries: 2}}, 2)
	h.connect()
	h.want(h.c.FromClient([]byte("GET /"), 1), Forward)
	if !h.c.Committed() || h.c.held != nil {
		t.Fatalf("state %v, held %q", h.c.State(), h.c.held)
	}
	h.want(h.c.TargetReset(syscall.ECONNRESET, 2), Reset)
	if len(h.reports) != 0 || h.targets[0].Active.Load() != 0 {
		t.Fatalf("reports %v, active %d", h.reports, h.targets[0].Active.Load())
	}
}

// A reset before any client byte reached the target, soon after its
// connect, is a dying instance's: a failed attempt, replay or not.
func TestResetBeforeAnyClientByteTriesNext(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{Retries: 2}}, 2)
	h.connect()
	h.want(h.c.TargetReset(syscall.ECONNRESET, 1), Dial)
	if h.c.Target().Addr != "b:1" || len(h.reports) != 1 || h.targets[0].Active.Load() != 0 {
		t.Fatalf("target %s, reports %v, active %d", h.c.Target().Addr, h.reports, h.targets[0].Active.Load())
	}
}

func TestReplayOnKeepsBytesUntilTheTargetAnswers(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{Retries: 2, ReplayOnReset: true, ProxyProtocol: 1}}, 2)
	h.connect()
	h.want(h.c.FromClient([]byte("hello "), 1), Flush)
	h.want(h.c.FromClient([]byte("world"), 1), Flush)
	if got := h.flush(-1); string(got) != "hello world" {
		t.Fatalf("wrote %q", got)
	}
	// The target resets: the next one gets the header and every byte again.
	h.want(h.c.TargetReset(syscall.ECONNRESET, 2), Dial)
	h.want(h.c.Dialed(3), Flush)
	got := string(h.flush(-1))
	if !strings.HasPrefix(got, "PROXY TCP4 10.1.1.1 10.2.2.2 5000 80\r\n") || !strings.HasSuffix(got, "\r\nhello world") {
		t.Fatalf("replayed %q", got)
	}
	h.want(h.c.FromTarget(3, 4), Forward)
	if !h.c.Committed() || h.c.held != nil {
		t.Fatalf("after the first byte: state %v, held %q", h.c.State(), h.c.held)
	}
	h.want(h.c.FromClient([]byte("more"), 5), Forward)
	h.want(h.c.TargetReset(syscall.ECONNRESET, 6), Reset)
	if h.targets[0].Active.Load() != 0 || h.targets[1].Active.Load() != 0 {
		t.Fatal("active counts not settled")
	}
}

func TestReplayBufferIsSizedToWhatIsHeld(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{ReplayOnReset: true}}, 1)
	h.connect()
	h.c.FromClient([]byte("x"), 1)
	h.flush(-1)
	if c := cap(h.c.held); c > 64 {
		t.Fatalf("one byte held in a buffer of %d", c)
	}
}

func TestReplayLimitCommits(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{Retries: 1, ReplayOnReset: true}}, 2)
	h.connect()
	h.want(h.c.FromClient(make([]byte, ReplayLimit), 1), Flush)
	h.flush(-1)
	if h.c.Committed() {
		t.Fatal("committed at the limit")
	}
	h.want(h.c.FromClient([]byte("!"), 1), Flush)
	if !h.c.Committed() {
		t.Fatal("not committed past the limit")
	}
	if got := h.flush(-1); string(got) != "!" {
		t.Fatalf("after commit %q is still to write", got)
	}
	h.want(h.c.TargetReset(syscall.ECONNRESET, 2), Reset)
}

// A clean close before the first byte is an answer: never replayed.
func TestCleanCloseIsAnAnswer(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{Retries: 1, ReplayOnReset: true}}, 2)
	h.connect()
	h.c.FromClient([]byte("req"), 1)
	h.flush(-1)
	h.want(h.c.TargetEOF(2), Linger)
	h.want(h.c.Settled(false, 3), ShutClient)
	if !h.c.Committed() || len(h.reports) != 0 {
		t.Fatalf("state %v, reports %v", h.c.State(), h.reports)
	}
}

// A target that closes before any client byte reached it was asked
// nothing: the next one is tried, replay or not.
func TestCloseBeforeAnyClientByteTriesNext(t *testing.T) {
	for _, replay := range []bool{false, true} {
		h := newHarness(t, Config{Settings: Settings{Retries: 1, ReplayOnReset: replay}}, 2)
		h.connect()
		h.want(h.c.TargetEOF(1), Dial)
		h.want(h.c.Dialed(2), Flush)
		h.want(h.c.FromClient([]byte("req"), 3), map[bool]Action{false: Forward, true: Flush}[replay])
		if len(h.reports) != 1 {
			t.Fatalf("replay=%v: reports %v", replay, h.reports)
		}
	}
}

// A target that closes or resets a connection whose client stayed silent
// past DyingWindow (a server's header or idle timeout: nginx, Go, Redis,
// PostgreSQL) answers that client: the client sees the close (FIN for FIN,
// reset for reset), nothing is reported, nothing retried, replay or not.
func TestCloseOfASilentClientAfterTheWindowIsAnAnswer(t *testing.T) {
	for _, replay := range []bool{false, true} {
		for _, reset := range []bool{false, true} {
			h := newHarness(t, Config{Settings: Settings{Retries: 2, ReplayOnReset: replay}}, 3)
			h.connect()
			h.want(h.c.Expired(int64(DyingWindow)), Continue)
			now := int64(DyingWindow)
			if reset {
				h.want(h.c.TargetReset(syscall.ECONNRESET, now), Reset)
			} else {
				h.want(h.c.TargetEOF(now), ShutClient)
				if !h.c.Committed() {
					t.Fatalf("replay=%v: state %v after the target's FIN", replay, h.c.State())
				}
			}
			if len(h.reports) != 0 || h.stats.DialErrors.Load() != 0 || h.c.Target() != h.targets[0] {
				t.Fatalf("replay=%v reset=%v: reports %v, dial errors %d, target %v",
					replay, reset, h.reports, h.stats.DialErrors.Load(), h.c.Target())
			}
		}
	}
	// One nanosecond earlier it is a dying instance's.
	h := newHarness(t, Config{Settings: Settings{Retries: 2}}, 3)
	h.connect()
	h.want(h.c.TargetEOF(int64(DyingWindow)-1), Dial)
	if len(h.reports) != 1 {
		t.Fatalf("reports %v inside the window", h.reports)
	}
}

// A request that makes every target reset after taking it (a query of
// death), with replay on: it is replayed once, to one more target, and the
// client then sees the reset; no target is reported by the data path.
func TestQueryOfDeathIsReplayedOnceAndReportsNothing(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{Retries: 5, ReplayOnReset: true}}, 4)
	h.connect()
	h.want(h.c.FromClient([]byte("KILL"), 1), Flush)
	h.flush(-1)
	h.want(h.c.TargetReset(syscall.ECONNRESET, 2), Dial)
	h.want(h.c.Dialed(3), Flush)
	if got := h.flush(-1); string(got) != "KILL" {
		t.Fatalf("replayed %q", got)
	}
	// The second target closes after taking it: no linger, no replay.
	h.want(h.c.TargetReset(syscall.ECONNRESET, 4), Reset)
	if len(h.reports) != 0 || h.stats.DialErrors.Load() != 0 || h.stats.Replays.Load() != 1 {
		t.Fatalf("reports %v, dial errors %d, replays %d", h.reports, h.stats.DialErrors.Load(), h.stats.Replays.Load())
	}
	for i, tg := range h.targets {
		if tg.Active.Load() != 0 || (i >= 2 && tg.Total.Load() != 0) {
			t.Fatalf("target %d: active %d, total %d", i, tg.Active.Load(), tg.Total.Load())
		}
	}
	// The same through a FIN and the linger's reset.
	h = newHarness(t, Config{Settings: Settings{Retries: 5, ReplayOnReset: true}}, 4)
	h.connect()
	h.c.FromClient([]byte("KILL"), 1)
	h.flush(-1)
	h.want(h.c.TargetEOF(2), Linger)
	h.want(h.c.Settled(true, 3), Dial)
	h.want(h.c.Dialed(4), Flush)
	h.flush(-1)
	h.want(h.c.TargetEOF(5), ShutClient)
	if len(h.reports) != 0 || h.stats.Replays.Load() != 1 {
		t.Fatalf("reports %v, replays %d", h.reports, h.stats.Replays.Load())
	}
}

// A client that connects and closes without a word: the target's close in
// answer to the FIN is no failure.
func TestCloseAfterTheClientsFINIsAnAnswer(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{Retries: 1}}, 2)
	h.connect()
	h.want(h.c.ClientEOF(), ShutTarget)
	h.want(h.c.TargetEOF(1), ShutClient)
	if len(h.reports) != 0 || h.stats.DialErrors.Load() != 0 {
		t.Fatalf("reported %v", h.reports)
	}
}

// With replay on, a target that closed after taking bytes is watched for
// the reset that says it never read them.
func TestCloseAfterBytesLingersForAReset(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{Retries: 1, ReplayOnReset: true}}, 2)
	h.connect()
	h.c.FromClient([]byte("req"), 1)
	h.flush(-1)
	h.want(h.c.TargetEOF(2), Linger)
	if d := h.c.Deadline(); d != 2+int64(ResetGrace) {
		t.Fatalf("deadline %v", d)
	}
	h.want(h.c.Expired(1+int64(ResetGrace)), Continue)
	h.want(h.c.Expired(2+int64(ResetGrace)), Settle)
	h.want(h.c.Settled(true, 3), Dial)
	h.want(h.c.Dialed(4), Flush)
	if got := h.flush(-1); string(got) != "req" {
		t.Fatalf("replayed %q", got)
	}
	h.c.FromClient([]byte("!"), 5)
	h.flush(-1)
	// Replayed once already: the second target's close is its answer,
	// not watched for a reset that could replay the bytes again.
	h.want(h.c.TargetEOF(6), ShutClient)
	if !h.c.Committed() || len(h.reports) != 0 {
		t.Fatalf("state %v, reports %v: a reset after bytes is never reported", h.c.State(), h.reports)
	}
}

// With replay off, a clean close after the request is the answer at once.
func TestCleanCloseIsAnAnswerWithoutReplay(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{Retries: 1}}, 2)
	h.connect()
	h.want(h.c.FromClient([]byte("req"), 1), Forward)
	h.want(h.c.TargetEOF(2), ShutClient)
	if len(h.reports) != 0 {
		t.Fatalf("reports %v", h.reports)
	}
}

// Linux reports a reset once: a write that saw it makes the next EOF a reset.
func TestEOFAfterAWriteResetIsAReset(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{Retries: 1, ReplayOnReset: true}}, 2)
	h.connect()
	h.c.FromClient([]byte("req"), 1)
	h.want(h.c.WriteReset(syscall.ECONNRESET), Continue)
	h.want(h.c.TargetEOF(2), Dial)
	h.want(h.c.Dialed(3), Flush)
	if got := h.flush(-1); string(got) != "req" {
		t.Fatalf("replayed %q", got)
	}
}

func TestPartialWritesKeepOrder(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{ProxyProtocol: 2}}, 1)
	h.want(h.c.Start(0), Dial)
	h.want(h.c.Dialed(0), Flush)
	head := h.flush(5) // part of the header: the socket was full
	h.want(h.c.FromClient([]byte("abc"), 1), Flush)
	h.want(h.c.FromClient([]byte("def"), 1), Flush)
	if h.c.Committed() {
		t.Fatal("committed before a client byte was written")
	}
	rest := h.flush(-1)
	all := append(head, rest...)
	if !bytes.HasSuffix(all, []byte("abcdef")) || !bytes.HasPrefix(all, proxyproto.SIGV2) {
		t.Fatalf("wrote %q", all)
	}
	if !h.c.Committed() || h.c.held != nil {
		t.Fatalf("state %v held %q", h.c.State(), h.c.held)
	}
	h.want(h.c.FromClient([]byte("g"), 2), Forward)
}

func TestClientEOFWhileDialingShutsTargetAfterConnect(t *testing.T) {
	h := newHarness(t, Config{}, 1)
	h.want(h.c.Start(0), Dial)
	h.want(h.c.ClientEOF(), Continue)
	h.want(h.c.Dialed(1), ShutTarget)
	h.want(h.c.ClientEOF(), ShutTarget)

	// After a retry with bytes to replay, too: the FIN follows them.
	h = newHarness(t, Config{Settings: Settings{ReplayOnReset: true, Retries: 1}}, 2)
	h.connect()
	h.c.FromClient([]byte("req"), 1)
	h.flush(-1)
	h.want(h.c.ClientEOF(), ShutTarget)
	h.want(h.c.TargetReset(syscall.ECONNRESET, 2), Dial)
	h.want(h.c.Dialed(3), ShutTarget)
	if got := h.flush(-1); string(got) != "req" {
		t.Fatalf("replayed %q before the FIN", got)
	}
}

func TestIdleDeadlineFollowsTraffic(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{IdleTimeout: time.Second}}, 1)
	h.connect()
	h.c.FromClient([]byte("x"), int64(500*time.Millisecond))
	h.want(h.c.Expired(int64(time.Second)), Continue)
	if d := h.c.Deadline(); d != int64(1500*time.Millisecond) {
		t.Fatalf("deadline %v", time.Duration(d))
	}
	h.c.FromTarget(1, int64(1200*time.Millisecond))
	h.want(h.c.Expired(int64(1500*time.Millisecond)), Continue)
	h.want(h.c.Expired(int64(2200*time.Millisecond)), Close)
	if !errors.Is(h.c.Err, ErrIdle) || h.targets[0].Active.Load() != 0 {
		t.Fatalf("err %v active %d", h.c.Err, h.targets[0].Active.Load())
	}
}

func TestShutdownIsNotTheTargetsFailure(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{Retries: 2}}, 2)
	h.want(h.c.Start(0), Dial)
	h.c.Shutdown()
	h.want(h.c.DialFailed(errors.New("cancelled"), 1), Close)
	if len(h.reports) != 0 || h.stats.DialErrors.Load() != 0 {
		t.Fatalf("reported %v", h.reports)
	}
}

func TestAccounting(t *testing.T) {
	h := newHarness(t, Config{}, 1)
	h.connect()
	tg := h.targets[0]
	if tg.Active.Load() != 1 || tg.Total.Load() != 1 {
		t.Fatalf("active %d total %d", tg.Active.Load(), tg.Total.Load())
	}
	h.c.FromClient([]byte("abc"), 1)
	h.c.FromTarget(5, 2)
	if h.stats.BytesOut.Load() != 3 || h.stats.BytesIn.Load() != 5 || tg.BytesOut.Load() != 3 || tg.BytesIn.Load() != 5 {
		t.Fatal("byte counters")
	}
	h.c.Close(nil)
	h.c.Close(nil)
	if tg.Active.Load() != 0 {
		t.Fatalf("active %d after close", tg.Active.Load())
	}
}

func trusted(a netip.Addr) bool { return a.IsPrivate() }

func TestPROXYHeaderPrelude(t *testing.T) {
	v2, _ := proxyproto.HeaderProxyFromAddrs(2,
		&net.TCPAddr{IP: net.ParseIP("192.0.2.7"), Port: 4000},
		&net.TCPAddr{IP: net.ParseIP("192.0.2.8"), Port: 443}).Format()
	local := []byte("PROXY UNKNOWN\r\n")
	for _, tc := range []struct {
		name     string
		in       []byte
		src      string
		rest     string
		bytewise bool
	}{
		{name: "v1", in: []byte("PROXY TCP4 192.0.2.1 192.0.2.2 1234 80\r\nGET"), src: "192.0.2.1:1234", rest: "GET"},
		{name: "v1 one byte at a time", in: []byte("PROXY TCP4 192.0.2.1 192.0.2.2 1234 80\r\nGET"), src: "192.0.2.1:1234", rest: "GET", bytewise: true},
		{name: "v2 one byte at a time", in: append(append([]byte{}, v2...), "hi"...), src: "192.0.2.7:4000", rest: "hi", bytewise: true},
		{name: "local", in: local, src: client.String()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, Config{AcceptProxy: trusted}, 1)
			h.want(h.c.Start(0), ReadPrelude)
			var a Action
			if tc.bytewise {
				// The header one byte at a time; its last byte arrives
				// with the rest.
				last := len(tc.in) - len(tc.rest) - 1
				for i := range last {
					h.want(h.c.Prelude(tc.in[i:i+1], 0), ReadPrelude)
				}
				a = h.c.Prelude(tc.in[last:], 0)
			} else {
				a = h.c.Prelude(tc.in, 0)
			}
			h.want(a, Dial)
			if h.c.Src.String() != tc.src {
				t.Fatalf("client %s, want %s", h.c.Src, tc.src)
			}
			h.want(h.c.Dialed(1), Flush)
			if got := h.flush(-1); string(got) != tc.rest {
				t.Fatalf("sent %q after the header, want %q", got, tc.rest)
			}
		})
	}
}

func TestPROXYHeaderErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		src  netip.AddrPort
		in   string
		eof  bool
		late bool
	}{
		{name: "untrusted source", src: netip.MustParseAddrPort("8.8.8.8:1")},
		{name: "no header", in: "GET / HTTP/1.1\r\n"},
		{name: "garbage v1", in: "PROXY TCP4 nonsense\r\n"},
		{name: "v1 too long", in: "PROXY " + strings.Repeat("x", 120)},
		{name: "eof inside", in: "PROXY TCP4", eof: true},
		{name: "late", in: "PROX", late: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, Config{AcceptProxy: trusted, Settings: Settings{ProxyHeaderTimeout: time.Second}}, 1)
			if tc.src.IsValid() {
				h.c.Src = tc.src
			}
			a := h.c.Start(0)
			if a == ReadPrelude && tc.in != "" {
				a = h.c.Prelude([]byte(tc.in), 0)
			}
			switch {
			case tc.eof:
				h.want(a, ReadPrelude)
				a = h.c.PreludeEOF()
			case tc.late:
				h.want(a, ReadPrelude)
				h.want(h.c.Expired(int64(time.Second)-1), Continue)
				a = h.c.Expired(int64(time.Second))
			}
			h.want(a, Close)
			if h.stats.HeaderErrors.Load() != 1 || h.c.Err == nil || len(h.reports) != 0 {
				t.Fatalf("header errors %d, err %v", h.stats.HeaderErrors.Load(), h.c.Err)
			}
		})
	}
}

// FuzzProxyHeader feeds arbitrary connection openings, in arbitrary pieces,
// to the PROXY header prelude: it must not panic, must end (read more only
// while the header may still be valid, and never past its bound), and on
// success hand on exactly the bytes that followed the header.
func FuzzProxyHeader(f *testing.F) {
	f.Add([]byte("PROXY TCP4 192.0.2.1 192.0.2.2 1234 80\r\nGET / HTTP/1.1\r\n"), uint8(7))
	f.Add([]byte("PROXY TCP6 ::1 ::2 1 2\r\n"), uint8(1))
	f.Add([]byte("PROXY UNKNOWN\r\nrest"), uint8(3))
	f.Add([]byte("\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00\x02\x01\xc0\x00\x02\x02\x04\xd2\x00\x50data"), uint8(5))
	f.Add([]byte("\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"), uint8(2))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"), uint8(4))
	f.Fuzz(func(t *testing.T, data []byte, piece uint8) {
		h := newHarness(t, Config{AcceptProxy: trusted}, 1)
		h.c.Src = netip.MustParseAddrPort("10.0.0.1:1")
		a := h.c.Start(0)
		step := int(piece%16) + 1
		fed := 0
		for a == ReadPrelude && fed < len(data) {
			n := min(step, len(data)-fed)
			a = h.c.Prelude(data[fed:fed+n], 0)
			fed += n
			if a == ReadPrelude && len(h.c.held) > maxPrelude+16 {
				t.Fatalf("still reading after %d bytes", len(h.c.held))
			}
		}
		if a != Dial {
			return
		}
		if !h.c.Src.IsValid() {
			t.Fatal("success without a client address")
		}
		h.want(h.c.Dialed(1), Flush)
		rest := h.flush(-1)
		if !bytes.HasSuffix(data[:fed], rest) {
			t.Fatalf("passed on %q, not the tail of the input", rest)
		}
	})
}

// A retirement is a deadline: the earliest stands, balancer.Kept calls it
// off, and it winds the connection down (once), then closes it if the
// peers never close.
func TestRetireWindsDown(t *testing.T) {
	s := int64(time.Second)
	h := newHarness(t, Config{Settings: Settings{IdleTimeout: time.Hour}}, 1)
	h.connect()
	h.c.Retire(5*s, balancer.Drained)
	h.c.Retire(7*s, balancer.Removed) // later: the drain stands
	if d := h.c.Deadline(); d != 5*s {
		t.Fatalf("deadline %v, want 5s", time.Duration(d))
	}
	h.c.Retire(0, balancer.Kept)
	if d := h.c.Deadline(); d != int64(time.Hour) {
		t.Fatalf("called off: deadline %v, want the idle timeout", time.Duration(d))
	}
	h.c.Retire(2*s, balancer.Down)
	h.want(h.c.Expired(2*s-1), Continue)
	h.want(h.c.Expired(2*s), WindDown)
	if !h.c.Winding() || !h.c.Committed() || h.stats.Closed[balancer.Down].Load() != 1 || !errors.Is(h.c.Err, ErrWound) {
		t.Fatalf("winding %v committed %v closed(down) %d err %v", h.c.Winding(), h.c.Committed(), h.stats.Closed[balancer.Down].Load(), h.c.Err)
	}
	h.c.Retire(3*s, balancer.Removed) // too late to change anything
	if d := h.c.Deadline(); d != 2*s+int64(WindLinger) {
		t.Fatalf("winding: deadline %v, want WindLinger after", time.Duration(d))
	}
	h.want(h.c.Expired(2*s+int64(WindLinger)), Close)
	if h.targets[0].Active.Load() != 0 || h.stats.Closed[balancer.Removed].Load() != 0 {
		t.Fatalf("active %d, closed(removed) %d", h.targets[0].Active.Load(), h.stats.Closed[balancer.Removed].Load())
	}
}

// A retirement is the target's: a connection that moves on to the next
// target after a failed dial leaves it behind.
func TestRetireIsTheTargets(t *testing.T) {
	h := newHarness(t, Config{Settings: Settings{Retries: 1}}, 2)
	h.want(h.c.Start(0), Dial)
	h.c.Retire(int64(time.Second), balancer.Removed)
	h.want(h.c.DialFailed(errors.New("refused"), 0), Dial)
	h.want(h.c.Dialed(0), Flush)
	if d := h.c.Deadline(); d != 0 {
		t.Fatalf("deadline %v on the next target, want none", time.Duration(d))
	}
}

// max_conn_age: +-10 %, so connections opened together do not all close
// together.
func TestMaxConnAgeJitter(t *testing.T) {
	age := 10 * time.Second
	seen := map[int64]bool{}
	for range 200 {
		h := newHarness(t, Config{Settings: Settings{MaxConnAge: age}}, 1)
		h.connect()
		d := h.c.Deadline()
		if d < int64(age*9/10) || d > int64(age*11/10) {
			t.Fatalf("deadline %v, want %v +-10 %%", time.Duration(d), age)
		}
		seen[d] = true
		h.want(h.c.Expired(d), WindDown)
		if h.stats.Closed[balancer.MaxAge].Load() != 1 {
			t.Fatal("not counted as max_age")
		}
	}
	if len(seen) < 150 {
		t.Fatalf("only %d distinct deadlines of 200", len(seen))
	}
}
