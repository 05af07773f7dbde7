package proxy

import (
	"crypto/tls"

	"github.com/rota-proxy/rota/proxy/internal/relay"
	"github.com/rota-proxy/rota/proxy/internal/sni"
)

// Route is one service of a listener that routes by server name.
type Route struct {
	// SNI are the server names it serves: exact ("api.example.com"), a
	// wildcard for any name below a domain ("*.api.example.com", at any
	// depth, not the domain itself) or "*" (anything else, a client that
	// sends no server name, or no TLS).
	SNI    []string
	Picker Picker
	Name   string // in the access log and the metrics
	NoLog  bool   // its connections are not in the access log
	// TargetTLS, if set, is how rota speaks TLS to its targets
	// (origination); see certfile.ForHost for a config without a server
	// name.
	TargetTLS *tls.Config
	// TLS, if set, terminates the TLS of the clients routed here: the
	// ClientHello read to route is the handshake's, and the targets get
	// plaintext.
	TLS *tls.Config
}

// Router chooses a connection's targets by the TLS server name (SNI) its
// client asks for, so that one port serves many services. rota reads the
// ClientHello and forwards it, and everything after it, unchanged: TLS is
// passed through, never terminated. A Router is immutable: a reload builds
// a new one.
type Router struct {
	table     *sni.Table
	routes    []Route
	single    relay.Picker // Single's: every client, no ClientHello read
	singleTLS *tls.Config  // Single's TargetTLS
}

// Single is the Router of a listener without routes: every client goes to
// p, and nothing is read from it first.
func Single(p Picker) *Router { return &Router{single: p} }

// SingleTLS is Single whose targets rota speaks TLS to with targetTLS.
func SingleTLS(p Picker, targetTLS *tls.Config) *Router {
	return &Router{single: p, singleTLS: targetTLS}
}

// targetTLS is the TLS configuration for the targets of route i (-1: the
// single pool's), nil for plain TCP.
func (r *Router) targetTLS(i int) *tls.Config {
	switch {
	case r == nil:
		return nil
	case r.single != nil:
		return r.singleTLS
	case i >= 0 && i < len(r.routes):
		return r.routes[i].TargetTLS
	}
	return nil
}

// terminates is route i's TLS termination, nil for passthrough.
func (r *Router) terminates(i int) *tls.Config {
	if r == nil || r.single != nil || i < 0 || i >= len(r.routes) {
		return nil
	}
	return r.routes[i].TLS
}

// terminatesSome reports whether some route terminates TLS.
func (r *Router) terminatesSome() bool {
	if r == nil {
		return false
	}
	for _, rt := range r.routes {
		if rt.TLS != nil {
			return true
		}
	}
	return false
}

// Originates reports whether some of its targets get TLS from rota, or
// some of its routes terminate it: its listener must then be served by
// goroutines.
func (r *Router) Originates() bool {
	if r == nil {
		return false
	}
	if r.singleTLS != nil {
		return true
	}
	for _, rt := range r.routes {
		if rt.TargetTLS != nil || rt.TLS != nil {
			return true
		}
	}
	return false
}

// NewRouter routes by the routes' server names. Names match without
// regard to case; the most specific pattern wins: exact, then the longest
// wildcard, then "*". A client no pattern matches is closed and counted
// (Stats.NoRoute).
func NewRouter(routes []Route) *Router {
	patterns := make([][]string, len(routes))
	for i, r := range routes {
		patterns[i] = r.SNI
	}
	return &Router{table: sni.NewTable(patterns), routes: append([]Route(nil), routes...)}
}

// Match returns the index of the route for a server name ("" for none),
// or -1.
func (r *Router) Match(serverName string) int { return r.table.Match(serverName) }

func (r *Router) route(serverName string) (relay.Picker, int) {
	if i := r.table.Match(serverName); i >= 0 {
		return r.routes[i].Picker, i
	}
	return nil, -1
}

// named is route i's name and whether its connections are logged; ok
// false when there is no such route (an unrouted connection).
func (r *Router) named(i int) (name string, logged, ok bool) {
	if r == nil || i < 0 || i >= len(r.routes) {
		return "", false, false
	}
	return r.routes[i].Name, !r.routes[i].NoLog, true
}
