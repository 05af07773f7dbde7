package health_test

import (
	"bufio"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/internal/testenv"
)

// watch starts a checker of one target with cfg and returns a function
// that waits until the target is up (true) or down (false) and returns
// its status.
func watch(t *testing.T, cfg health.Config, addr string) func(what string, up bool) health.Status {
	t.Helper()
	c := health.New(cfg, nil, nil)
	t.Cleanup(c.Close)
	c.Update([]string{addr})
	return func(what string, up bool) health.Status {
		t.Helper()
		want := health.Down
		if up {
			want = health.Up
		}
		var s health.Status
		testenv.Eventually(t, what, 10*time.Second, func() bool { s = stateOf(c, addr); return s.State == want })
		return s
	}
}

// closedPort is a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// A Patroni-like management port: the check asks port:, path:, host:,
// expect_status: and expect_body:, not the target's own port.
func TestHTTPCheckOnAManagementPort(t *testing.T) {
	var status atomic.Int64
	var body atomic.Value
	status.Store(200)
	body.Store(`{"role": "primary"}`)
	var hosts sync.Map
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hosts.Store(r.Host, true)
		if r.URL.Path != "/primary" {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		w.WriteHeader(int(status.Load()))
		w.Write([]byte(body.Load().(string)))
	}))
	defer srv.Close()
	_, mgmtPort, _ := net.SplitHostPort(srv.Listener.Addr().String())
	target := closedPort(t) // the traffic port: nothing listens, the check must not care
	cfg := fast()
	cfg.Check, cfg.Path, cfg.Host = health.CheckHTTP, "/primary", "db.internal"
	cfg.Port = atoi(t, mgmtPort)
	cfg.ExpectStatus, cfg.ExpectBody = []string{"200"}, `"primary"`
	wait := watch(t, cfg, target)

	wait("up through the management port", true)
	if _, ok := hosts.Load("db.internal"); !ok {
		t.Error("the Host header was not the configured host")
	}
	status.Store(204) // a 2xx, but not the 200 asked for
	if s := wait("down on 204", false); !strings.Contains(s.LastError, "status 204 (want 200)") {
		t.Errorf("last error %q", s.LastError)
	}
	status.Store(200)
	wait("up again", true)
	body.Store(`{"role": "replica"}`)
	if s := wait("down on a replica's body", false); !strings.Contains(s.LastError, `body lacked "\"primary\""`) {
		t.Errorf("last error %q", s.LastError)
	}
}

// An answer that begins with interim answers (103 Early Hints, as a server
// behind a CDN may send) is judged by its final one, on the loop's path (an
// IP literal) and the goroutine path (a name) alike.
func TestHTTPCheckSkipsInterimAnswers(t *testing.T) {
	var status atomic.Int64
	status.Store(200)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</style.css>; rel=preload; as=style")
		w.WriteHeader(http.StatusEarlyHints)
		w.WriteHeader(http.StatusEarlyHints)
		w.WriteHeader(int(status.Load()))
		w.Write([]byte("ok"))
	}))
	defer srv.Close()
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	for _, addr := range []string{"127.0.0.1:" + port, "localhost:" + port} {
		status.Store(200)
		cfg := fast()
		cfg.Check, cfg.Path, cfg.ExpectStatus, cfg.ExpectBody = health.CheckHTTP, "/", []string{"200"}, "ok"
		wait := watch(t, cfg, addr)
		wait(addr+": up through two 103s", true)
		status.Store(503)
		if s := wait(addr+": down on the final 503", false); !strings.Contains(s.LastError, "status 503 (want 200)") {
			t.Errorf("%s: last error %q", addr, s.LastError)
		}
	}
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// https and tls checks against a server with its own CA: up with that CA,
// down with another one (and the reason); https probes keep their
// connection, and resume the TLS session when the server closes it.
func TestHTTPSAndTLSChecksWithTheirOwnCA(t *testing.T) {
	ca, other := testenv.NewCA(t, "service"), testenv.NewCA(t, "other")
	certFile, keyFile := ca.Issue("server", "127.0.0.1")
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	var requests, resumed, conns atomic.Int64
	var closing atomic.Bool
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		if r.TLS != nil && r.TLS.DidResume {
			resumed.Add(1)
		}
		if closing.Load() {
			w.Header().Set("Connection", "close")
		}
		w.Write([]byte("ok"))
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	countConns(srv, &conns)
	srv.StartTLS()
	defer srv.Close()
	addr := srv.Listener.Addr().String()

	for _, kind := range []string{health.CheckHTTPS, health.CheckTLS} {
		t.Run(kind, func(t *testing.T) {
			cfg := fast()
			cfg.Check, cfg.Path = kind, "/healthz"
			cfg.TLS.CAFile = ca.File
			watch(t, cfg, addr)("up with the service's CA", true)
			if kind == health.CheckHTTPS {
				n, c := requests.Load(), conns.Load()
				testenv.Eventually(t, "more probes", 10*time.Second, func() bool { return requests.Load() >= n+3 })
				if got := conns.Load() - c; got != 0 {
					t.Errorf("%d new connections for %d probes of a live target: want them kept", got, requests.Load()-n)
				}
				closing.Store(true) // each probe on a new connection, its session resumed
				n = requests.Load()
				testenv.Eventually(t, "probes on new connections", 10*time.Second, func() bool { return requests.Load() >= n+3 })
			}

			cfg.TLS.CAFile = other.File
			s := watch(t, cfg, addr)("down with another CA", false)
			if !strings.Contains(s.LastError, "certificate signed by unknown authority") {
				t.Errorf("last error %q", s.LastError)
			}
		})
	}
	if resumed.Load() == 0 {
		t.Error("no https probe resumed a TLS session")
	}
}

// send_expect: a Redis-like PING; a refusal says what came instead.
func TestSendExpectCheck(t *testing.T) {
	var auth atomic.Bool
	addr := testenv.Serve(t, func(c net.Conn) {
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			switch {
			case line != "PING\r\n":
				c.Write([]byte("-ERR unknown command\r\n"))
			case auth.Load():
				c.Write([]byte("-NOAUTH Authentication required.\r\n"))
			default:
				c.Write([]byte("+PONG\r\n"))
			}
		}
	})
	cfg := fast()
	cfg.Timeout = 200 * time.Millisecond // a refusal waits for "+PONG" until the timeout
	cfg.Check = health.CheckSendExpect
	cfg.Steps = []health.Step{{Send: `PING\r\n`}, {Expect: "+PONG"}}
	wait := watch(t, cfg, addr)
	wait("up on +PONG", true)
	auth.Store(true)
	s := wait("down on -NOAUTH", false)
	if !strings.Contains(s.LastError, `expected "+PONG", got "-NOAUTH Authentication required.\r\n"`) {
		t.Errorf("last error %q", s.LastError)
	}

	// hex: form and two exchanges on one connection.
	auth.Store(false)
	cfg.Steps = []health.Step{{Send: "hex:50494e470d0a"}, {Expect: "PONG"}, {Send: `PING\r\n`}, {Expect: `+PONG\r\n`}}
	watch(t, cfg, addr)("up on two exchanges", true)

	// A host name is probed in a goroutine (the event loop takes IP
	// addresses): the same verdicts.
	_, port, _ := net.SplitHostPort(addr)
	named := watch(t, cfg, "localhost:"+port)
	named("a named target up", true)
	auth.Store(true)
	if s := named("a named target down", false); !strings.Contains(s.LastError, `expected "PONG", got "-NOAUTH`) {
		t.Errorf("last error %q", s.LastError)
	}
}

// grpc: grpc-go's own health server; SERVING and NOT_SERVING flip the
// target, and a service the server does not know says so.
func TestGRPCCheck(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := grpchealth.NewServer()
	gs := grpc.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	cl := &countingListener{Listener: ln}
	var wg sync.WaitGroup
	wg.Go(func() { gs.Serve(cl) })
	defer wg.Wait()
	defer gs.Stop()
	addr := ln.Addr().String()
	hs.SetServingStatus("db", healthpb.HealthCheckResponse_SERVING)

	cfg := fast()
	cfg.Check = health.CheckGRPC
	c := health.New(cfg, nil, nil)
	c.Update([]string{addr})
	testenv.Eventually(t, "up", 10*time.Second, func() bool { return stateOf(c, addr).State == health.Up })
	ok, conns := stateOf(c, addr).ChecksOK, cl.n.Load()
	testenv.Eventually(t, "five more probes", 10*time.Second, func() bool { return stateOf(c, addr).ChecksOK >= ok+5 })
	c.Close()
	if got := cl.n.Load() - conns; got != 0 {
		t.Errorf("%d new connections for five probes of a live target: want the one kept", got)
	}

	wait := watch(t, cfg, addr)
	wait("the server SERVING", true)
	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	if s := wait("the server NOT_SERVING", false); !strings.Contains(s.LastError, "is NOT_SERVING") {
		t.Errorf("last error %q", s.LastError)
	}

	cfg.GRPCService = "db"
	watch(t, cfg, addr)("service db SERVING", true)
	cfg.GRPCService = "cache"
	if s := watch(t, cfg, addr)("an unknown service", false); !strings.Contains(s.LastError, "NotFound") {
		t.Errorf("last error %q", s.LastError)
	}
}

// port: a tcp check (on the event loop: an IP target) probes the target's
// host on that port.
func TestTCPCheckPort(t *testing.T) {
	ln := listen(t)
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	cfg := fast()
	cfg.Port = atoi(t, port)
	wait := watch(t, cfg, closedPort(t))
	wait("up through the check port", true)
	ln.Close()
	wait("down once the check port closes", false)
}

// An http check keeps its connection while the target passes (one
// connection for many probes); a connection the server closed while idle
// costs a new one, not a failed probe; a dial the proxy reports failed
// makes the next probe dial too.
func TestHTTPCheckKeepsItsConnection(t *testing.T) {
	var requests, conns atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		w.Write([]byte("ok"))
	}))
	countConns(srv, &conns)
	srv.Start()
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	c := httpCheckerUp(t, addr)
	// SetKeepAlivesEnabled(false) closes idle connections now, and each
	// connection after its answer.
	keptConnectionPhases(t, c, addr, &requests, &conns, func(closes bool) { srv.Config.SetKeepAlivesEnabled(!closes) })
}

// httpCheckerUp is a checker of addr with a fast http check of /healthz,
// once addr is up.
func httpCheckerUp(t *testing.T, addr string) *health.Checker {
	t.Helper()
	cfg := fast()
	cfg.Check, cfg.Path = health.CheckHTTP, "/healthz"
	c := health.New(cfg, nil, nil)
	t.Cleanup(c.Close)
	c.Update([]string{addr})
	waitState(t, c, addr, health.Up, "up")
	return c
}

// keptConnectionPhases checks what a check that keeps its connection does,
// c checking addr, up: ten more probes ask on the connection kept
// (asks counts the server's answers, conns its connections); while
// serverCloses(true) has the server close each connection, each probe
// finds its kept one closed and asks again on a new one, without failing;
// serverCloses(false), a connection is kept again, and a dial the proxy
// reports failed makes the next probe dial.
func keptConnectionPhases(t *testing.T, c *health.Checker, addr string, asks, conns *atomic.Int64, serverCloses func(bool)) {
	t.Helper()
	n, before := asks.Load(), conns.Load()
	testenv.Eventually(t, "ten more probes", 10*time.Second, func() bool { return asks.Load() >= n+10 })
	if got := conns.Load() - before; got != 0 {
		t.Fatalf("%d new connections for %d probes: want the one kept", got, asks.Load()-n)
	}

	serverCloses(true)
	n, before = asks.Load(), conns.Load()
	failed := stateOf(c, addr).ChecksFailed
	testenv.Eventually(t, "five probes on new connections", 10*time.Second, func() bool {
		return asks.Load() >= n+5 && conns.Load() >= before+5
	})
	if s := stateOf(c, addr); s.ChecksFailed != failed || s.State != health.Up {
		t.Fatalf("after the server closed kept connections: %+v (failed before: %d)", s, failed)
	}

	serverCloses(false)
	testenv.Eventually(t, "a kept connection again", 10*time.Second, func() bool {
		n, before := asks.Load(), conns.Load()
		if _, ok := testenv.Poll(time.Second, func() bool { return asks.Load() >= n+3 }); !ok {
			return false
		}
		return conns.Load() == before
	})
	before = conns.Load()
	c.ReportFailure(addr, errors.New("connection refused"))
	testenv.Eventually(t, "a new connection after the reported failure", 10*time.Second, func() bool { return conns.Load() > before })
	waitState(t, c, addr, health.Up, "up again")
}

// A failure the proxy reports while a probe is in flight on the kept
// connection: the probe's answer does not keep that connection, and the
// next probe dials, as after a report between probes.
func TestFailureReportedMidProbeDropsItsConnection(t *testing.T) {
	var conns atomic.Int64
	entered := make(chan struct{}, 1)
	release := make(chan struct{})
	var hold atomic.Bool
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if hold.Load() {
			entered <- struct{}{}
			<-release
		}
		w.Write([]byte("ok"))
	}))
	countConns(srv, &conns)
	srv.Start()
	defer srv.Close()
	defer close(release) // a probe still held ends before the server closes
	addr := srv.Listener.Addr().String()
	c := httpCheckerUp(t, addr)
	hold.Store(true)
	select {
	case <-entered: // a probe is in flight on the kept connection
	case <-time.After(10 * time.Second):
		t.Fatal("no probe reached the server")
	}
	before := conns.Load()
	c.ReportFailure(addr, errors.New("connection refused"))
	hold.Store(false)
	release <- struct{}{}
	testenv.Eventually(t, "a new connection after the failure reported mid-probe", 10*time.Second, func() bool { return conns.Load() > before })
}

// countingListener counts the connections it accepts.
type countingListener struct {
	net.Listener
	n atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// countConns counts in n the connections srv accepts (set before it
// starts).
func countConns(srv *httptest.Server, n *atomic.Int64) {
	srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			n.Add(1)
		}
	}
}

// A send_expect check that starts with a send and ends with an expect asks
// again on its connection while the target passes (as an http check
// does); a replica is down on its own answer; a connection the server closed costs a new one, not a failed probe; a
// check that waits for a greeting dials every probe.
func TestSendExpectKeepsItsConnection(t *testing.T) {
	var asks, conns atomic.Int64
	var role atomic.Value
	role.Store("master")
	var closeAfter atomic.Bool
	addr := testenv.Serve(t, func(c net.Conn) {
		defer c.Close()
		conns.Add(1)
		c.Write([]byte("+OK ready\r\n"))
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			if line == "QUIT\r\n" {
				return
			}
			asks.Add(1)
			r := role.Load().(string)
			c.Write([]byte("# Replication\r\nrole:" + r + "\r\nconnected_slaves:0\r\n"))
			if closeAfter.Load() {
				return
			}
		}
	})
	cfg := fast()
	cfg.Check = health.CheckSendExpect
	cfg.Steps = []health.Step{{Send: `INFO replication\r\n`}, {Expect: "role:master"}}
	c := health.New(cfg, nil, nil)
	t.Cleanup(c.Close)
	c.Update([]string{addr})
	testenv.Eventually(t, "up", 10*time.Second, func() bool { return stateOf(c, addr).State == health.Up })
	keptConnectionPhases(t, c, addr, &asks, &conns, closeAfter.Store)

	// The unread "role:master" of the last answer does not pass the next
	// probe: the replica is down on its own answer.
	role.Store("slave")
	s := waitState(t, c, addr, health.Down, "down as a replica")
	if !strings.Contains(s.LastError, `expected "role:master", got "`) || !strings.Contains(s.LastError, `role:slave`) {
		t.Errorf("last error %q", s.LastError)
	}
	role.Store("master")
	waitState(t, c, addr, health.Up, "up as the master again")

	// Steps that wait for the greeting, or end with a send, cannot be
	// asked again on a connection: each probe dials.
	for _, steps := range [][]health.Step{
		{{Expect: "+OK ready"}, {Send: `INFO replication\r\n`}, {Expect: "role:master"}},
		{{Send: `INFO replication\r\n`}, {Expect: "role:master"}, {Send: `QUIT\r\n`}},
	} {
		cfg.Steps = steps
		c.SetConfig(cfg)
		n, before := asks.Load(), conns.Load()
		testenv.Eventually(t, "five probes", 10*time.Second, func() bool { return asks.Load() >= n+5 })
		if got, probes := conns.Load()-before, asks.Load()-n; got < probes-1 {
			t.Errorf("steps %v: %d connections for %d probes: want one each", steps, got, probes)
		}
		if s := stateOf(c, addr); s.State != health.Up {
			t.Errorf("steps %v: %+v", steps, s)
		}
	}
}

// waitState waits until addr's state is want, and returns its status.
func waitState(t *testing.T, c *health.Checker, addr string, want health.State, what string) health.Status {
	t.Helper()
	var s health.Status
	testenv.Eventually(t, what, 10*time.Second, func() bool { s = stateOf(c, addr); return s.State == want })
	return s
}
