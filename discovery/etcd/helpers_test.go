package etcd

import (
	"context"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/internal/testenv"
)

func TestMain(m *testing.M) {
	// No ignores: the embedded server, the clients, every Watch and
	// Register call stop all their goroutines.
	goleak.VerifyTestMain(m)
}

// recorder is a discovery.Sink that keeps everything it is told.
type recorder struct {
	synced  atomic.Int64
	mu      sync.Mutex
	updates []update
	errs    []error
}

type update struct {
	at   time.Time
	snap discovery.Snapshot
}

func (r *recorder) Update(s discovery.Snapshot) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.updates = append(r.updates, update{time.Now(), s})
}

func (r *recorder) Synced() { r.synced.Add(1) }

func (r *recorder) Error(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs = append(r.errs, err)
}

func (r *recorder) allUpdates() []update {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.updates)
}

func (r *recorder) allErrors() []error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.errs)
}

func (r *recorder) last() (update, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.updates) == 0 {
		return update{}, false
	}
	return r.updates[len(r.updates)-1], true
}

// waitSnap waits until the latest snapshot holds exactly addrs and
// returns when it was delivered.
func (r *recorder) waitSnap(t *testing.T, timeout time.Duration, addrs ...string) time.Time {
	t.Helper()
	want := discovery.NewSnapshot(addrs...)
	var at time.Time
	testenv.Eventually(t, fmt.Sprintf("snapshot %v", want.Addrs()), timeout, func() bool {
		u, ok := r.last()
		at = u.at
		return ok && slices.Equal(u.snap.Addrs(), want.Addrs())
	})
	return at
}

// waitErr waits for a reported error matching match and returns it.
func (r *recorder) waitErr(t *testing.T, timeout time.Duration, what string, match func(error) bool) error {
	t.Helper()
	var found error
	testenv.Eventually(t, what, timeout, func() bool {
		for _, err := range r.allErrors() {
			if match(err) {
				found = err
				return true
			}
		}
		return false
	})
	return found
}

// startWatch runs w.Watch until the test ends; cleanup stops it and checks
// it returned nil.
func startWatch(t *testing.T, w *Watcher) *recorder {
	t.Helper()
	rec := &recorder{}
	testenv.RunWatcher(t, w, rec)
	return rec
}

// newClient is a client built by NewClient, closed by cleanup.
func newClient(t *testing.T, endpoints []string) *clientv3.Client {
	t.Helper()
	c, err := NewClient(Config{Endpoints: endpoints, Logger: zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func newWatcher(t *testing.T, c *clientv3.Client, service string, lg *zap.Logger) *Watcher {
	t.Helper()
	if lg == nil {
		lg = zaptest.NewLogger(t)
	}
	w, err := NewWatcher(c, "", service, lg)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func instanceValue(addr string) string {
	return fmt.Sprintf(`{"Op":0,"Addr":%q,"Metadata":null}`, addr)
}

// putInstance writes a valid instance key of service web and returns the
// write's revision.
func putInstance(t *testing.T, c *clientv3.Client, addr string, opts ...clientv3.OpOption) int64 {
	t.Helper()
	resp, err := c.Put(ctxT(t), DefaultPrefix+"web/"+addr, instanceValue(addr), opts...)
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

func deleteInstance(t *testing.T, c *clientv3.Client, addr string) int64 {
	t.Helper()
	resp, err := c.Delete(ctxT(t), DefaultPrefix+"web/"+addr)
	if err != nil {
		t.Fatal(err)
	}
	if resp.Deleted != 1 {
		t.Fatalf("delete %s: %d keys deleted", addr, resp.Deleted)
	}
	return resp.Header.Revision
}

func startEtcd(t *testing.T) *testenv.Etcd { return testenv.StartEtcd(t) }

// cutProxy forwards TCP from a loopback port to target and can cut the
// watcher off etcd while etcd keeps serving other clients.
type cutProxy struct {
	ln     net.Listener
	target string

	mu     sync.Mutex
	mode   proxyMode
	conns  map[net.Conn]struct{}
	held   []net.Conn
	wg     sync.WaitGroup
	frozen atomic.Bool // connections stay open, but nothing gets through
}

type proxyMode int

const (
	pass   proxyMode = iota // forward
	hold                    // accept new connections but forward nothing until pass
	refuse                  // accept and close at once
)

func startProxy(t *testing.T, target string) *cutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *cutProxy) addr() string { return p.ln.Addr().String() }

// freeze stops every byte, both ways, on open connections too, without
// closing them: a member cut off by the network, or frozen.
func (p *cutProxy) freeze(on bool) { p.frozen.Store(on) }

// set switches mode; leaving pass cuts every open connection, entering
// pass starts forwarding the held ones.
func (p *cutProxy) set(m proxyMode) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.mode = m
	if m != pass {
		for c := range p.conns {
			_ = c.Close()
		}
		return
	}
	for _, c := range p.held {
		p.forward(c)
	}
	p.held = nil
}

func (p *cutProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		switch p.mode {
		case pass:
			p.forward(c)
		case hold:
			p.held = append(p.held, c)
		case refuse:
			_ = c.Close()
		}
		p.mu.Unlock()
	}
}

// forward is called with p.mu held.
func (p *cutProxy) forward(c net.Conn) {
	p.conns[c] = struct{}{}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		defer func() {
			p.mu.Lock()
			delete(p.conns, c)
			p.mu.Unlock()
			_ = c.Close()
		}()
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			return
		}
		p.mu.Lock()
		p.conns[up] = struct{}{}
		p.mu.Unlock()
		defer func() {
			p.mu.Lock()
			delete(p.conns, up)
			p.mu.Unlock()
			_ = up.Close()
		}()
		done := make(chan struct{}, 2)
		cp := func(dst, src net.Conn) {
			buf := make([]byte, 32<<10)
			for {
				n, err := src.Read(buf)
				if n > 0 && !p.frozen.Load() { // frozen: dropped, as by a cut network
					if _, werr := dst.Write(buf[:n]); werr != nil {
						break
					}
				}
				if err != nil {
					break
				}
			}
			_ = dst.Close()
			_ = src.Close()
			done <- struct{}{}
		}
		go cp(up, c)
		go cp(c, up)
		<-done
		<-done
	}()
}

func (p *cutProxy) close() {
	_ = p.ln.Close()
	p.mu.Lock()
	for c := range p.conns {
		_ = c.Close()
	}
	for _, c := range p.held {
		_ = c.Close()
	}
	p.held = nil
	p.mu.Unlock()
	p.wg.Wait()
}
