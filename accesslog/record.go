// Package accesslog records what happened to each client connection: one
// Record at its end (and, asked to, one when its target connection is
// made), written as a JSON or text line by one writer goroutine, off the
// relay loops: they only copy a Record into a bounded buffer, and when the
// writer falls behind, records are dropped and counted, never the proxy
// slowed.
package accesslog

import (
	"net/netip"
	"time"
)

// Termination says how a connection ended: the access log's termination
// field and the label of rota_connections_ended_total. The relay state
// machine decides it; a connection has exactly one.
type Termination uint8

// The terminations, in the order Terminations lists them.
const (
	NotEnded         Termination = iota // a connect record
	ClientClosed                        // the client closed first, cleanly
	TargetClosed                        // the target closed first, cleanly
	ClientReset                         // the client reset, or failed
	TargetReset                         // the target reset after its first byte
	IdleTimeout                         // nothing moved for idle_timeout
	DialFailed                          // every target tried failed
	NoLiveTarget                        // no target to try
	DeniedDeny                          // in deny
	DeniedNotAllowed                    // not in allow
	DeniedPerClient                     // over max_conns_per_client
	DeniedRate                          // over a connection rate
	MaxConns                            // over max_conns
	QueueTimeout                        // waited in the queue too long
	NoRoute                             // no route for its server name
	ProxyHeaderError                    // a missing, bad, late or untrusted PROXY header
	TLSHandshake                        // the TLS handshake failed
	Drained                             // its target was drained (removed_conn_grace)
	Removed                             // its target left discovery
	Down                                // its target went down
	MaxAge                              // older than max_conn_age
	Shutdown                            // rota shut down, or a reload removed its listener
	Panic                               // relaying it panicked
	// NumTerminations sizes an array indexed by Termination.
	NumTerminations
)

var terminationNames = [NumTerminations]string{"", "client_closed", "target_closed", "client_reset",
	"target_reset", "idle_timeout", "dial_failed", "no_live_target", "denied_deny", "denied_not_allowed",
	"denied_per_client", "denied_rate", "max_conns", "queue_timeout", "no_route", "proxy_header_error",
	"tls_handshake", "drained", "removed", "down", "max_age", "shutdown", "panic"}

func (t Termination) String() string { return terminationNames[t] }

// Terminations lists the ways a connection ends.
func Terminations() []Termination {
	out := make([]Termination, 0, NumTerminations-1)
	for t := ClientClosed; t < NumTerminations; t++ {
		out = append(out, t)
	}
	return out
}

// MaxTries is how many failed attempts a Record names; more are counted.
const MaxTries = 4

// Try is one target tried before the one that carried the bytes, and why
// it failed (refused, timeout, unreachable, reset, closed, error).
type Try struct {
	Target string
	Why    string
}

// Record is one client connection. It holds no pointer to memory the
// connection still uses and is copied by value: making one allocates
// nothing.
type Record struct {
	Time, Start     time.Time // the end (or the connect, in a connect record); the accept
	Listener, Route string
	Client          netip.AddrPort // the PROXY header's client, when one was accepted
	Peer            netip.AddrPort // the socket's peer, when a PROXY header named another
	SNI             string
	Target          string // the target that carried the bytes; "" when none did
	Tries           [MaxTries]Try
	NTries          int // failed attempts, possibly more than MaxTries
	Replayed        bool
	Connect         time.Duration // accept to connected; 0 when never connected
	Duration        time.Duration
	BytesIn         uint64 // client to target
	BytesOut        uint64 // target to client
	Termination     Termination
	// TLS is what the handshake negotiated when rota terminated the
	// client's TLS; zero otherwise.
	TLS TLSInfo
}

// TLSInfo is a terminated TLS connection's: its version ("1.3"), cipher
// suite, ALPN protocol and client certificate's subject ("" for none).
type TLSInfo struct {
	Version, Cipher, ALPN, ClientCert string
}

// TriesShown is the failed attempts the record names.
func (r *Record) TriesShown() []Try { return r.Tries[:min(r.NTries, MaxTries)] }
