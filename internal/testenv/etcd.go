package testenv

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/embedetcd"
)

// Etcd is an embedded etcd server for one test, on fixed 127.0.0.1 ports
// picked at start, so that Restart and RestartFresh come back on the same
// endpoints and clients reconnect as they would to a restarted etcd. The
// test's cleanup closes it. Methods are safe for concurrent use.
type Etcd struct {
	t                  testing.TB
	dir                string
	clientURL, peerURL string

	mu  sync.Mutex
	srv *embedetcd.Server // nil while stopped
}

// StartEtcd starts an embedded etcd with a temporary data dir on free
// loopback ports (client and peer), retrying on a port collision.
func StartEtcd(t testing.TB) *Etcd {
	t.Helper()
	e := &Etcd{t: t, dir: t.TempDir()}
	var lastErr error
	for range 10 {
		ports, err := freePorts(2)
		if err != nil {
			t.Fatalf("testenv: pick ports for etcd: %v", err)
		}
		e.clientURL = "http://" + ports[0]
		e.peerURL = "http://" + ports[1]
		if lastErr = e.start(); lastErr == nil {
			t.Cleanup(e.Stop)
			return e
		}
		if !isAddrInUse(lastErr) {
			break
		}
	}
	t.Fatalf("testenv: start etcd: %v", lastErr)
	return nil
}

// Endpoints returns the client URLs; they stay the same across restarts.
func (e *Etcd) Endpoints() []string { return []string{e.clientURL} }

// Client returns a client of the server, closed by t's cleanup.
func (e *Etcd) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{
		Endpoints:   e.Endpoints(),
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		t.Fatalf("testenv: etcd client: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// Stop closes the server, keeping its data dir; a no-op when stopped.
func (e *Etcd) Stop() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.srv != nil {
		e.srv.Close()
		e.srv = nil
	}
}

// Start starts the server again after Stop, on the same ports and data
// dir. Between the two, a client sees the outage for certain, where a
// Restart can be over before a client notices.
func (e *Etcd) Start() {
	e.t.Helper()
	e.mustStart()
}

// Restart stops the server (if running) and starts it again on the same
// ports and data dir: the registry's content survives.
func (e *Etcd) Restart() {
	e.t.Helper()
	e.Stop()
	e.mustStart()
}

// RestartFresh stops the server and starts it on the same ports with an
// empty data dir, as an etcd replaced by a new one would be: keys, leases
// and revisions are gone.
func (e *Etcd) RestartFresh() {
	e.t.Helper()
	e.Stop()
	if err := os.RemoveAll(e.dir); err != nil {
		e.t.Fatalf("testenv: wipe etcd data dir: %v", err)
	}
	e.mustStart()
}

// Compact compacts the key-value history up to rev (physically, so that a
// later watch from an older revision fails with ErrCompacted at once).
func (e *Etcd) Compact(t testing.TB, rev int64) {
	t.Helper()
	c := e.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Compact(ctx, rev, clientv3.WithCompactPhysical()); err != nil {
		t.Fatalf("testenv: compact etcd to revision %d: %v", rev, err)
	}
}

// mustStart starts the server on the known ports. Another process may
// have taken a port while the server was down; it retries for a while.
func (e *Etcd) mustStart() {
	e.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := e.start()
		if err == nil {
			return
		}
		if !isAddrInUse(err) || time.Now().After(deadline) {
			e.t.Fatalf("testenv: restart etcd: %v", err)
		}
		time.Sleep(50 * time.Millisecond) // backing off a port collision, not synchronising
	}
}

func (e *Etcd) start() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.srv != nil {
		return errors.New("already running")
	}
	srv, err := embedetcd.Start(context.Background(), embedetcd.Config{
		DataDir:      e.dir,
		ClientURL:    e.clientURL,
		PeerURL:      e.peerURL,
		Name:         "testenv",
		BcryptCost:   4, // bcrypt's least: tests of etcd users hash and check passwords
		ReadyTimeout: 20 * time.Second,
	})
	if err != nil {
		return err
	}
	e.srv = srv
	return nil
}

// freePorts returns n distinct free 127.0.0.1 ports. They are free when
// returned, not reserved: callers retry on a collision.
func freePorts(n int) ([]string, error) {
	var out []string
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			_ = l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("listen on 127.0.0.1:0: %w", err)
		}
		ls = append(ls, l)
		out = append(out, l.Addr().String())
	}
	return out, nil
}

func isAddrInUse(err error) bool {
	return errors.Is(err, syscall.EADDRINUSE) || strings.Contains(err.Error(), "address already in use")
}
