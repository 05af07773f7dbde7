package server_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rota-proxy/rota/internal/testenv"

	"github.com/rota-proxy/rota/config"
)

// startHeaderTimeoutBackend is a real HTTP server that answers with its
// name and, like nginx's client_header_timeout, Redis' timeout or
// PostgreSQL's authentication_timeout, closes a connection whose client has
// sent no request within headerTimeout.
func startHeaderTimeoutBackend(t *testing.T, name string, headerTimeout time.Duration) string {
	t.Helper()
	s := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, name)
	}))
	s.Config.ReadHeaderTimeout = headerTimeout
	s.Start()
	t.Cleanup(s.Close)
	return s.Listener.Addr().String()
}

// A server's close of a connection whose client stayed silent is its
// answer to that client, not a sign of death: every target stays up, each
// silent client sees its target's close (once, not after every target in
// turn), and a request afterwards is answered.
func TestSilentClientsKeepTargetsUp(t *testing.T) {
	const headerTimeout = time.Second
	var addrs []string
	for i := range 3 {
		addrs = append(addrs, startHeaderTimeoutBackend(t, fmt.Sprintf("b%d", i+1), headerTimeout))
	}
	cfg := config.Default()
	cfg.Listeners = []config.Listener{fastListener("web", addrs...)}
	srv := startServer(t, cfg)
	testenv.Eventually(t, "three live targets", 5*time.Second, func() bool { return liveCount(srv, "web") == 3 })
	addr := proxyAddr(t, srv, "web")

	const silent, held = 6, 4 * time.Second
	type seen struct {
		after time.Duration
		n     int64
		err   error
	}
	closes := make(chan seen, silent)
	for range silent {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		begin := time.Now()
		c.SetReadDeadline(begin.Add(held))
		go func() {
			n, err := io.Copy(io.Discard, c) // nil at the target's FIN
			closes <- seen{time.Since(begin), n, err}
		}()
	}
	// While the silent clients are held, every target stays up. (The loop
	// watches for the whole span; its pause paces the polling.)
	for end := time.Now().Add(held); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		for _, a := range addrs {
			if st := targetState(t, srv, "web", a); st != "up" {
				t.Fatalf("target %s is %s while silent clients are held", a, st)
			}
		}
	}
	for range silent {
		s := <-closes
		if s.err != nil || s.n != 0 || s.after < headerTimeout || s.after > headerTimeout+headerTimeout/2 {
			t.Fatalf("silent client: %d bytes, %v after %v; want the target's close after about %v", s.n, s.err, s.after, headerTimeout)
		}
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}).Get("http://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || len(body) != 2 || body[0] != 'b' {
		t.Fatalf("request after the silent clients: %d %q", resp.StatusCode, body)
	}
	for _, tg := range targets(t, srv).Listeners[0].Targets {
		if tg.State != "up" || tg.ConsecutiveFailures != 0 {
			t.Fatalf("target %s: %s with %d failures", tg.Addr, tg.State, tg.ConsecutiveFailures)
		}
	}
}

// startQueryOfDeathBackend is a TCP server that reads a line and resets
// the connection (a crash on that request), counting the lines it saw.
func startQueryOfDeathBackend(t *testing.T, seen *atomic.Int64) string {
	t.Helper()
	return testenv.Serve(t, func(c net.Conn) {
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return // a health check: connect and close
		}
		if strings.HasPrefix(line, "KILL") {
			seen.Add(1)
			c.(*net.TCPConn).SetLinger(0)
		}
	})
}

// A request that makes every target reset (a query of death), with
// replay_on_reset: it is replayed once, to one more target, then the
// client sees the reset; no target is marked down by the data path.
func TestQueryOfDeathIsReplayedOnce(t *testing.T) {
	var seen atomic.Int64
	var addrs []string
	for range 3 {
		addrs = append(addrs, startQueryOfDeathBackend(t, &seen))
	}
	cfg := config.Default()
	l := fastListener("web", addrs...)
	l.ReplayOnReset = true
	l.Health.Interval = time.Hour // only the data path could mark a target down
	l.Health.BackoffMax = time.Hour
	l.Health.Rise = 1
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	testenv.Eventually(t, "three live targets", 5*time.Second, func() bool { return liveCount(srv, "web") == 3 })
	addr := proxyAddr(t, srv, "web")

	for i := range 3 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "KILL\n")
		got, err := io.ReadAll(c)
		c.Close()
		if !errors.Is(err, syscall.ECONNRESET) || len(got) != 0 {
			t.Fatalf("client %d: %q, %v; want the reset", i, got, err)
		}
		if n := seen.Load(); n != int64(2*(i+1)) {
			t.Fatalf("after %d clients the request reached targets %d times, want %d (once, then one replay)", i+1, n, 2*(i+1))
		}
	}
	for _, tg := range targets(t, srv).Listeners[0].Targets {
		if tg.State != "up" || tg.DialErrors != 0 {
			t.Fatalf("target %s: %s, %d dial errors reported by the data path", tg.Addr, tg.State, tg.DialErrors)
		}
	}
}
