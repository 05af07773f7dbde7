package admin_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rota-proxy/rota/admin"
)

// get sends one request on a new connection and reads the answer, all
// within limit.
func timedGet(addr, path, token string, limit time.Duration) (int, string, time.Duration, error) {
	begin := time.Now()
	c, err := net.DialTimeout("tcp", addr, limit)
	if err != nil {
		return 0, "", 0, err
	}
	defer c.Close()
	c.SetDeadline(begin.Add(limit))
	auth := ""
	if token != "" {
		auth = "Authorization: Bearer " + token + "\r\n"
	}
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sConnection: close\r\n\r\n", path, auth)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, "", time.Since(begin), err
	}
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), time.Since(begin), err
}

func dialN(t *testing.T, addr string, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, 0, n)
	for range n {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		conns = append(conns, c)
	}
	return conns
}

// Hundreds of silent, slow and keep-alive connections on the admin port do
// not starve kubelet's probes nor an operator: each new connection makes
// room by closing the longest idle one, so /healthz, /readyz and an
// authenticated /api/v1/targets answer within 100 ms, and the connections
// held stay within the cap.
func TestAdminProbesNeverStarve(t *testing.T) {
	before := runtime.NumGoroutine()
	h := &admin.Handler{State: idleState{}}
	h.SetToken("s3cret")
	srv, err := admin.Listen("127.0.0.1:0", h)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown(context.Background())
	addr := srv.Addr().String()

	// 100 keep-alive connections, each with one answered request (each
	// past the 64th closes the longest idle).
	for range 100 {
		c := dialN(t, addr, 1)[0]
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("keep-alive connection's request: %v", err)
		}
		io.Copy(io.Discard, resp.Body)
	}
	// 100 slow ones, half a header each, and 100 that say nothing.
	for _, c := range dialN(t, addr, 100) {
		fmt.Fprintf(c, "GET /api/v1/targets HTTP/1.1\r\nHost: 127.0.0.1\r\n")
	}
	dialN(t, addr, 100)

	for round := range 5 {
		for _, path := range []string{"/healthz", "/readyz", "/api/v1/targets"} {
			code, body, took, err := timedGet(addr, path, "s3cret", time.Second)
			if err != nil || code != http.StatusOK || took > 100*time.Millisecond {
				t.Fatalf("round %d: %s: %d %q after %v (%v); want 200 within 100ms", round, path, code, body, took, err)
			}
		}
	}
	// The 300 cost at most the cap's goroutines (64, plus 8 reserved).
	if n := runtime.NumGoroutine() - before; n > 64+8+10 {
		t.Fatalf("%d goroutines for 300 open admin connections", n)
	}
}

// When every connection is serving a request (here reloads that take their
// time), a probe still gets one of the reserved places, and is closed after
// its answer; any other request there is told the port is busy.
func TestAdminReservesPlacesForProbes(t *testing.T) {
	release := make(chan struct{})
	var inReload sync.WaitGroup
	inReload.Add(2)
	h := &admin.Handler{State: idleState{}, MaxConns: 2, Reload: func(ctx context.Context) error {
		inReload.Done()
		<-release
		return nil
	}}
	srv, err := admin.Listen("127.0.0.1:0", h)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown(context.Background())
	defer close(release)
	addr := srv.Addr().String()
	for _, c := range dialN(t, addr, 2) {
		fmt.Fprintf(c, "POST /api/v1/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
	}
	inReload.Wait()

	for range 3 {
		for _, path := range []string{"/healthz", "/readyz"} {
			code, _, took, err := timedGet(addr, path, "", time.Second)
			if err != nil || code != http.StatusOK || took > 100*time.Millisecond {
				t.Fatalf("%s with every connection busy: %d after %v (%v)", path, code, took, err)
			}
		}
	}
	code, body, _, err := timedGet(addr, "/api/v1/targets", "", time.Second)
	if err != nil || code != http.StatusServiceUnavailable || !strings.Contains(body, "busy") {
		t.Fatalf("/api/v1/targets on a reserved place: %d %q (%v); want 503", code, body, err)
	}
	// A reserved place serves one request, then closes.
	c := dialN(t, addr, 1)[0]
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusOK || !resp.Close {
		t.Fatalf("probe on a reserved place: %v, close %v", err, resp != nil && resp.Close)
	}
	io.Copy(io.Discard, resp.Body)
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("reserved place after its answer: %v, want EOF", err)
	}
	// Past the reserve too, a newcomer is closed at once rather than left
	// waiting in the accept queue.
	held := dialN(t, addr, 8)
	for _, c := range held {
		fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
	}
	// (The reserved places fill as the server accepts them; wait until a
	// newcomer finds none.)
	deadline := time.Now().Add(5 * time.Second)
	for {
		c := dialN(t, addr, 1)[0]
		c.SetReadDeadline(time.Now().Add(time.Second))
		_, err := c.Read(make([]byte, 1))
		if err == io.EOF {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a connection past the cap and the reserve: %v, want closed at once", err)
		}
	}
}

// Idle keep-alive connections are closed after the idle timeout.
func TestAdminClosesIdleConnections(t *testing.T) {
	srv, err := admin.Listen("127.0.0.1:0", &admin.Handler{State: idleState{}, IdleTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown(context.Background())
	conns := dialN(t, srv.Addr().String(), 4)
	for _, c := range conns {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("keep-alive request: %v", err)
		}
		io.Copy(io.Discard, resp.Body)
	}
	start := time.Now()
	for _, c := range conns {
		if _, err := c.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("idle connection: %v, want EOF from the server", err)
		}
	}
	if d := time.Since(start); d < 250*time.Millisecond {
		t.Fatalf("idle connections closed after %v, before the idle timeout", d)
	}
}
