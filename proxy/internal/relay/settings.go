package relay

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Settings are a listener's connection settings, as configured: the one
// declaration of each (package proxy names it proxy.Settings, and rota's
// configuration embeds it, whose keys are the yaml tags). Values are taken
// as given: a zero duration is no deadline, zero counts no limit; the
// defaults are the configuration's. A Settings is replaced, never modified,
// while connections use it.
type Settings struct {
	// DialTimeout bounds each attempt to connect to a target; 0: none.
	DialTimeout time.Duration `yaml:"dial_timeout"`
	// Retries is how many further targets are tried after a failed
	// attempt.
	Retries int `yaml:"retries"`
	// MaxConns bounds the client connections open at once; 0: unlimited.
	MaxConns int `yaml:"max_conns"`
	// IdleTimeout closes a connection when neither side sent anything
	// this long; 0: never.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
	// ReplayOnReset keeps a client's bytes until its target's first byte,
	// and replays them (once a connection) to the next target when the
	// target resets before that (at-least-once delivery: for idempotent
	// protocols only). Off, a reset after the first client byte reached
	// the target is passed to the client; failed connects are retried
	// either way.
	ReplayOnReset bool `yaml:"replay_on_reset"`
	// ProxyProtocol sends every target a PROXY protocol header of that
	// version before any client byte, naming the client.
	ProxyProtocol ProxyVersion `yaml:"proxy_protocol"`
	// AcceptProxyProtocol, if not empty, makes every client connection
	// start with a PROXY protocol header (v1 or v2) from one of these
	// sources (load balancers in front); others are closed and counted in
	// Stats.HeaderErrors, as are missing or malformed headers.
	AcceptProxyProtocol []netip.Prefix `yaml:"accept_proxy_protocol"`
	// ProxyHeaderTimeout bounds the wait for that header; 0: none.
	ProxyHeaderTimeout time.Duration `yaml:"proxy_header_timeout"`
	// RemovedConnGrace is how long the open connections of a target that
	// left discovery, went down or was drained may go on before they are
	// wound down; Never leaves them alone.
	RemovedConnGrace Grace `yaml:"removed_conn_grace"`
	// MaxConnAge winds down client connections older than this, +-10 %
	// (so that a client's pool does not reconnect all at once); 0: never.
	MaxConnAge time.Duration `yaml:"max_conn_age"`
	// Allow and Deny say which clients may connect, by address (the one
	// an accepted PROXY header names): Deny first, then, if Allow is not
	// empty, only what it lists. Refused clients are closed before
	// anything is read from them and counted (Stats.Denied).
	Allow []netip.Prefix `yaml:"allow"`
	Deny  []netip.Prefix `yaml:"deny"`
	// MaxConnsPerClient bounds the connections open at once from one
	// client address; 0: unlimited.
	MaxConnsPerClient int `yaml:"max_conns_per_client"`
	// MaxConnRate bounds the new connections the listener accepts a
	// second, MaxConnRatePerClient those of one client address: token
	// buckets that hold one second's worth (a burst of that many at
	// once). Over either, a client is closed at once and counted. The
	// zero Rate is unlimited.
	MaxConnRate          Rate `yaml:"max_conn_rate"`
	MaxConnRatePerClient Rate `yaml:"max_conn_rate_per_client"`
	// SNITimeout bounds the wait for a routed listener's ClientHello; 0:
	// none.
	SNITimeout time.Duration `yaml:"sni_timeout"`
	// AccessLog records the listener's connections in the access log
	// (when one is configured).
	AccessLog bool `yaml:"access_log"`
}

// ProxyVersion is a PROXY protocol version: 0 (none), 1 or 2. In a
// configuration: "", "v1" or "v2".
type ProxyVersion uint8

func (v ProxyVersion) String() string {
	if v == 0 {
		return ""
	}
	return fmt.Sprintf("v%d", v)
}

// MarshalText writes "", "v1" or "v2".
func (v ProxyVersion) MarshalText() ([]byte, error) { return []byte(v.String()), nil }

// UnmarshalText reads "", "v1" or "v2".
func (v *ProxyVersion) UnmarshalText(b []byte) error {
	switch string(b) {
	case "":
		*v = 0
	case "v1":
		*v = 1
	case "v2":
		*v = 2
	default:
		return errors.New("expected v1, v2 or empty")
	}
	return nil
}

// Grace is a duration, or Never.
type Grace time.Duration

// Never is the Grace that never runs out.
const Never Grace = -1

func (g Grace) String() string {
	if g == Never {
		return "never"
	}
	return time.Duration(g).String()
}

// Rate is a rate of new connections: "500/s", "30/m" in a configuration.
// The zero Rate is unlimited.
type Rate struct{ PerSecond float64 }

// Burst is how many a bucket of r holds: one second's worth, at least 1.
func (r Rate) Burst() int { return max(1, int(math.Ceil(r.PerSecond))) }

func (r Rate) String() string {
	if r.PerSecond == 0 {
		return ""
	}
	return strconv.FormatFloat(r.PerSecond, 'f', -1, 64) + "/s"
}

// MarshalText writes "N/s" ("" for unlimited).
func (r Rate) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// UnmarshalText reads "N/s", "N/m" or "N/h" ("" or "0/s": unlimited).
func (r *Rate) UnmarshalText(b []byte) error {
	s := strings.TrimSpace(string(b))
	if s == "" {
		*r = Rate{}
		return nil
	}
	n, unit, ok := strings.Cut(s, "/")
	per := map[string]float64{"s": 1, "m": 60, "h": 3600}[unit]
	v, err := strconv.ParseFloat(n, 64)
	if !ok || per == 0 || err != nil || v < 0 || math.IsInf(v, 0) || math.IsNaN(v) {
		return errors.New(`expected a rate like 500/s or 30/m`)
	}
	*r = Rate{PerSecond: v / per}
	return nil
}

// MarshalText writes "never" or a duration.
func (g Grace) MarshalText() ([]byte, error) { return []byte(g.String()), nil }

// UnmarshalText reads "never" or a duration.
func (g *Grace) UnmarshalText(b []byte) error {
	if string(b) == "never" {
		*g = Never
		return nil
	}
	d, err := time.ParseDuration(string(b))
	if err != nil {
		return errors.New(`expected "never" or a duration like 30s`)
	}
	*g = Grace(d)
	return nil
}
