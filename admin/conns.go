package admin

import (
	"context"
	"net"
	"net/http"
	"sync"
	"time"
)

// The admin port is probed by orchestrators (kubelet every second) and read
// by operators; a cap on its connections keeps it from taking the proxy's
// descriptors. A cap alone lets whoever holds the connections starve the
// probes: 64 keep-alive clients, or 64 that send half a header, and
// /healthz waits in the kernel's accept queue until kubelet restarts the
// pod. So connections are never left waiting to be accepted; at the cap:
//
//  1. the connection idle the longest (keep-alive, between requests) is
//     closed to make room, else the one that has been reading its first
//     request the longest (a silent or slow client);
//  2. when every connection is serving a request, the newcomer takes one
//     of a few reserved places, where it may ask /healthz or /readyz only
//     (then it is closed);
//  3. past those, it is closed at once.
//
// A request being served is never cut.

// reservedConns is the number of places kept for probes when every
// connection is serving a request.
const reservedConns = 8

// connGuard owns the admin server's connection table. Its listener admits
// or refuses each accepted connection; the http.Server reports each one's
// state to track; serve marks the reserved ones' requests. mu guards the
// table; Close on a connection is the only call made under it, and that
// never waits on the server.
type connGuard struct {
	max int

	mu       sync.Mutex
	conns    map[net.Conn]*trackedConn
	reserved int
	closing  bool // shutting down: nothing more is admitted
}

type trackedConn struct {
	state    http.ConnState
	since    time.Time // when it entered state
	reserved bool
}

func newConnGuard(max int) *connGuard {
	return &connGuard{max: max, conns: make(map[net.Conn]*trackedConn)}
}

// admit takes c into the table, making room as above; false: c was
// closed.
func (g *connGuard) admit(c net.Conn) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	t := &trackedConn{state: http.StateNew, since: time.Now()}
	if g.closing {
		c.Close()
		return false
	}
	if len(g.conns)-g.reserved >= g.max {
		if victim := g.victimLocked(); victim != nil {
			g.forgetLocked(victim)
			victim.Close() // its server goroutine sees the error and ends
		} else if g.reserved < reservedConns {
			t.reserved = true
			g.reserved++
		} else {
			c.Close()
			return false
		}
	}
	g.conns[c] = t
	return true
}

// victimLocked is the connection to close for room: the longest idle, else
// the longest reading its first request; nil when all are serving.
func (g *connGuard) victimLocked() net.Conn {
	var victim net.Conn
	var vt *trackedConn
	for c, t := range g.conns {
		if t.reserved || t.state == http.StateActive {
			continue
		}
		if vt == nil || evictRank(t) < evictRank(vt) || evictRank(t) == evictRank(vt) && t.since.Before(vt.since) {
			victim, vt = c, t
		}
	}
	return victim
}

// fresh counts the connections accepted whose first request has not
// started.
func (g *connGuard) fresh() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := 0
	for _, t := range g.conns {
		if t.state == http.StateNew {
			n++
		}
	}
	return n
}

// close admits nothing more and closes every connection that is not
// serving a request: a shutdown need not wait for clients that sent
// nothing (http.Server waits 5 s before it counts those idle).
func (g *connGuard) close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closing = true
	for c, t := range g.conns {
		if t.state != http.StateActive {
			g.forgetLocked(c)
			c.Close()
		}
	}
}

// evictRank orders the candidates for room: idle ones first.
func evictRank(t *trackedConn) int {
	if t.state == http.StateIdle {
		return 0
	}
	return 1
}

func (g *connGuard) forgetLocked(c net.Conn) {
	if t, ok := g.conns[c]; ok {
		if t.reserved {
			g.reserved--
		}
		delete(g.conns, c)
	}
}

// connState is the http.Server's ConnState hook.
func (g *connGuard) connState(c net.Conn, s http.ConnState) {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch s {
	case http.StateClosed, http.StateHijacked:
		g.forgetLocked(c)
	default:
		if t, ok := g.conns[c]; ok {
			t.state, t.since = s, time.Now()
		}
	}
}

type connKey struct{}

// connContext is the http.Server's ConnContext hook: requests carry their
// connection, so that serve can tell a reserved one.
func (g *connGuard) connContext(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, c)
}

// serve answers only probes on a reserved connection, and closes it after.
func (g *connGuard) serve(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, _ := r.Context().Value(connKey{}).(net.Conn)
		g.mu.Lock()
		t := g.conns[c]
		reserved := t != nil && t.reserved
		g.mu.Unlock()
		if reserved {
			w.Header().Set("Connection", "close")
			if r.URL.Path != "/healthz" && r.URL.Path != "/readyz" {
				deny(w, http.StatusServiceUnavailable, "every admin connection is busy serving a request; only /healthz and /readyz are answered now")
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// guardedListener admits each accepted connection through its guard.
type guardedListener struct {
	net.Listener
	g *connGuard
}

func (l guardedListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil || l.g.admit(c) {
			return c, err
		}
	}
}
