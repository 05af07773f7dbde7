package proxy

import (
	"slices"

	"github.com/rota-proxy/rota/proxy/internal/relay"
	"github.com/rota-proxy/rota/proxy/internal/sni"
)

// Router chooses a connection's targets by the TLS server name (SNI) its
// client asks for, so that one port serves many services. rota reads the
// ClientHello and forwards it, and everything after it, unchanged: TLS is
// passed through, never terminated. A Router is immutable: a reload builds
// a new one.
type Router struct {
	table   *sni.Table
	pickers []relay.Picker
	single  relay.Picker // Single's: every client, no ClientHello read
}

// Single is the Router of a listener without routes: every client goes to
// p, and nothing is read from it first.
func Single(p Picker) *Router { return &Router{single: p} }

// NewRouter routes by patterns[i] to pickers[i]. A pattern is an exact
// name ("api.example.com"), a wildcard for any name below a domain
// ("*.api.example.com", at any depth, not the domain itself) or "*"
// (anything else, a client that sends no server name, or no TLS). Names
// match without regard to case; the most specific pattern wins: exact,
// then the longest wildcard, then "*". A client no pattern matches is
// closed and counted (Stats.NoRoute).
func NewRouter(patterns [][]string, pickers []Picker) *Router {
	if len(patterns) != len(pickers) {
		panic("proxy: NewRouter needs one picker per pattern list")
	}
	return &Router{table: sni.NewTable(patterns), pickers: slices.Clone(pickers)}
}

// Match returns the index of the route for a server name ("" for none),
// or -1.
func (r *Router) Match(serverName string) int { return r.table.Match(serverName) }

func (r *Router) route(serverName string) relay.Picker {
	if i := r.table.Match(serverName); i >= 0 {
		return r.pickers[i]
	}
	return nil
}
