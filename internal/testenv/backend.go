package testenv

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Backend is a real TCP server on 127.0.0.1 that answers every connection
// with its name once it has read the client's request line. Kill closes it
// the way a crashed process goes: the listener and every connection not yet
// answered at once, with resets.
type Backend struct {
	Name string
	Addr string

	mu    sync.Mutex
	ln    net.Listener
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
	// Hits counts the requests answered.
	Hits atomic.Int64
}

// StartBackend starts a Backend named name; the test's end kills it.
func StartBackend(t T, name string) *Backend {
	t.Helper()
	b := &Backend{Name: name, conns: map[net.Conn]struct{}{}}
	if err := b.listen("127.0.0.1:0"); err != nil {
		t.Fatalf("backend %s: %v", name, err)
	}
	t.Cleanup(b.Kill)
	return b
}

// StartBackendAt starts a Backend named name on addr (another loopback
// address, a port shared with other backends); the test's end kills it.
func StartBackendAt(t T, name, addr string) *Backend {
	t.Helper()
	b := &Backend{Name: name, conns: map[net.Conn]struct{}{}}
	if err := b.listen(addr); err != nil {
		t.Fatalf("backend %s: %v", name, err)
	}
	t.Cleanup(b.Kill)
	return b
}

// StartBackendOn starts a Backend named name on ln (a listener in a
// network namespace of the test's, say), taking ownership of it; the
// test's end kills it.
func StartBackendOn(t T, name string, ln net.Listener) *Backend {
	t.Helper()
	b := &Backend{Name: name, conns: map[net.Conn]struct{}{}}
	b.serve(ln)
	t.Cleanup(b.Kill)
	return b
}

func (b *Backend) listen(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	b.serve(ln)
	return nil
}

func (b *Backend) serve(ln net.Listener) {
	b.mu.Lock()
	b.ln, b.Addr = ln, ln.Addr().String()
	b.mu.Unlock()
	b.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.mu.Lock()
			if b.ln != ln { // killed meanwhile
				b.mu.Unlock()
				reset(c)
				return
			}
			b.conns[c] = struct{}{}
			b.mu.Unlock()
			b.wg.Go(func() {
				defer func() {
					b.mu.Lock()
					delete(b.conns, c)
					b.mu.Unlock()
					c.Close()
				}()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				buf := make([]byte, 64)
				if _, err := c.Read(buf); err != nil {
					return // a health probe: connect and close
				}
				// The answer is written under mu, so that a kill comes
				// before it (the connection is reset: the request is
				// the proxy's to retry) or after it, never between the
				// read and the write: there a crash closes with a plain
				// FIN, an empty answer no proxy can tell from a real one
				// (TestBackendKilledUnderLoad failed once on that).
				b.mu.Lock()
				defer b.mu.Unlock()
				if _, live := b.conns[c]; !live {
					return // killed: reset already
				}
				delete(b.conns, c) // answered: a kill from now on closes nothing of it
				b.Hits.Add(1)
				io.WriteString(c, b.Name)
			})
		}
	})
}

// Kill stops the backend abruptly, as a crash does: the listener closes
// (the kernel resets the connections waiting in its accept queue) and every
// connection not yet answered is reset, whatever its handler was doing.
func (b *Backend) Kill() {
	b.mu.Lock()
	if b.ln != nil {
		b.ln.Close()
		b.ln = nil
	}
	for c := range b.conns {
		reset(c)
	}
	clear(b.conns)
	b.mu.Unlock()
	b.wg.Wait()
}

// reset closes c with a reset instead of a FIN.
func reset(c net.Conn) {
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
}

// Revive listens again on the same address.
func (b *Backend) Revive(t T) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := b.listen(b.Addr)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("revive %s: %v", b.Addr, err)
		}
		time.Sleep(10 * time.Millisecond) // the port may linger in the kernel briefly
	}
}

// Request makes one client connection through addr and returns the answer.
func Request(addr string) (string, error) { return RequestFrom("", addr) }

// RequestFrom is Request from the loopback address src ("" for any).
func RequestFrom(src, addr string) (string, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	if src != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "hello\n"); err != nil {
		return "", err
	}
	c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil {
		return string(b), err
	}
	if len(b) == 0 {
		return "", errors.New("empty answer")
	}
	return string(b), nil
}

// Get makes one HTTP/1.0 GET / through addr (a new connection) and returns
// the body of a 200 answer without its final newline: a demo backend's name.
func Get(addr string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return "", err
	}
	head, body, ok := strings.Cut(string(b), "\r\n\r\n")
	if !ok || !strings.HasPrefix(head, "HTTP/1.0 200 ") && !strings.HasPrefix(head, "HTTP/1.1 200 ") {
		return "", fmt.Errorf("answer %q", Truncate(string(b), 80))
	}
	return strings.TrimSuffix(body, "\n"), nil
}

// Truncate cuts s to n bytes.
func Truncate(s string, n int) string { return s[:min(n, len(s))] }

// Serve starts a backend on loopback that runs handle for each
// connection, in a goroutine of its own, until the test ends (then the
// listener closes and Serve waits for the handlers: each must end once its
// peer closes or its deadline passes). handle owns its connection and
// closes it. It returns the address.
func Serve(t T, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("backend: %v", err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { handle(c) })
		}
	})
	return ln.Addr().String()
}

// Greeter starts a backend that writes msg to each connection at once and
// closes it, until the test ends, and returns its address.
func Greeter(t T, msg string) string {
	t.Helper()
	return Serve(t, func(c net.Conn) {
		io.WriteString(c, msg)
		c.Close()
	})
}
