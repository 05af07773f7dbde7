// Package demo provides the HTTP backends of `rota demo`, `rota
// demo-backend` and the benchmarks: tiny servers whose `GET /` answers
// with their name, so that a curl loop through the proxy shows the
// round-robin.
//
// Ownership: StartBackend and StartFleet start goroutines that only
// Shutdown or Close stop; ServeBackend owns everything it starts and
// returns once it has stopped it all. The context given to the Start
// functions bounds start-up only.
package demo

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultListen is where a backend listens when given no address: a
// loopback ephemeral port.
const DefaultListen = "127.0.0.1:0"

// readHeaderTimeout bounds how long a client may take to send its request
// headers.
const readHeaderTimeout = 10 * time.Second

// Backend is a running demo HTTP server. `GET /` answers "<name>\n",
// `GET /healthz` answers 200 "ok\n"; HEAD works too, other methods get
// 405 and other paths 404. Every answer carries an X-Backend header with
// the name. Its owner must call Shutdown or Close.
type Backend struct {
	name string
	ln   net.Listener
	srv  *http.Server

	downFile atomic.Pointer[string] // /healthz answers 503 while this file exists
	draining atomic.Bool            // /healthz answers 503: shutting down

	done     chan struct{} // closed once Serve has returned
	serveErr error         // Serve's error other than http.ErrServerClosed; read after done
	stopOnce sync.Once
}

// StartBackend starts a backend called name listening on addr (host:port;
// "" means DefaultListen, port 0 an ephemeral port). It returns once the
// socket listens, so the backend answers as soon as it returns. ctx bounds
// start-up only: the backend runs until Shutdown or Close.
func StartBackend(ctx context.Context, name, addr string) (*Backend, error) {
	if name == "" {
		return nil, errors.New("demo: backend name is empty")
	}
	if strings.ContainsAny(name, "\r\n") {
		return nil, fmt.Errorf("demo: backend name %q contains a line break", name)
	}
	if addr == "" {
		addr = DefaultListen
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("demo: backend %s: listen on %s: %w", name, addr, err)
	}
	return StartBackendOn(name, ln), nil
}

// StartBackendOn starts a backend called name on ln (one opened in another
// network namespace, say), taking ownership of it: Shutdown and Close
// close it.
func StartBackendOn(name string, ln net.Listener) *Backend {
	b := &Backend{name: name, ln: ln, done: make(chan struct{})}
	b.srv = &http.Server{
		Handler: handler(name, func() bool {
			if b.draining.Load() {
				return true
			}
			p := b.downFile.Load()
			if p == nil {
				return false
			}
			_, err := os.Stat(*p)
			return err == nil
		}),
		ReadHeaderTimeout: readHeaderTimeout,
	}
	go func() {
		defer close(b.done)
		if err := b.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			b.serveErr = fmt.Errorf("demo: backend %s: serve: %w", name, err)
		}
	}()
	return b
}

// SetDownFile makes /healthz answer 503 while a file exists at path (a
// maintenance switch an operator, or a test, can flip from outside the
// process, even in a container with no shell: docker cp); "" turns it off.
func (b *Backend) SetDownFile(path string) {
	if path == "" {
		b.downFile.Store(nil)
		return
	}
	b.downFile.Store(&path)
}

// SetDraining makes /healthz answer 503 from now on while the backend
// still serves: a shutting-down app fails its health first, so that
// proxies that learn of it only by checking (DNS-discovered targets) stop
// sending it connections before it stops accepting them.
func (b *Backend) SetDraining() { b.draining.Store(true) }

// Handler returns the HTTP handler of a backend called name.
func Handler(name string) http.Handler { return handler(name, func() bool { return false }) }

// handler is Handler whose /healthz answers 503 while down says so.
func handler(name string, down func() bool) http.Handler {
	body := []byte(name + "\n")
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write(body)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if down() {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("down\n"))
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Backend", name)
		mux.ServeHTTP(w, r)
	})
}

// Name returns the backend's name, the body of `GET /` without its newline.
func (b *Backend) Name() string { return b.name }

// Addr returns the address the backend listens on, host:port with the
// real port.
func (b *Backend) Addr() string { return b.ln.Addr().String() }

// URL returns http://<Addr>/.
func (b *Backend) URL() string { return "http://" + b.Addr() + "/" }

// Shutdown stops accepting, lets requests in flight finish and closes idle
// connections, like http.Server.Shutdown; when ctx ends first it closes
// the remaining connections and returns ctx's error. It returns once the
// server goroutine has ended. Calling it again, or after Close, returns
// nil at once.
func (b *Backend) Shutdown(ctx context.Context) error {
	var err error
	first := false
	b.stopOnce.Do(func() {
		first = true
		if err = b.srv.Shutdown(ctx); err != nil {
			_ = b.srv.Close()
			err = fmt.Errorf("demo: backend %s: graceful shutdown: %w", b.name, err)
		}
	})
	<-b.done
	if !first {
		return nil
	}
	return errors.Join(err, b.serveErr)
}

// Close closes the listener and every connection at once and waits for
// the server goroutine. It is safe to call more than once.
func (b *Backend) Close() error {
	var err error
	first := false
	b.stopOnce.Do(func() {
		first = true
		err = b.srv.Close()
	})
	<-b.done
	if !first {
		return nil
	}
	return errors.Join(err, b.serveErr)
}
