// Package sni finds the server name a TLS client asks for in the first
// bytes it sends, without terminating TLS: rota routes on it and then
// forwards every byte, unchanged, to the target.
//
// The ClientHello may be split over several TCP segments and several TLS
// records; Parse is called with everything received so far and says when
// it has enough. Fields are read with golang.org/x/crypto/cryptobyte, the
// parser crypto/tls itself uses; only the framing (records, the handshake
// header) and the walk to the server_name extension are written here.
package sni

import (
	"errors"
	"strings"

	"golang.org/x/crypto/cryptobyte"
)

// MaxHello bounds what is read looking for a ClientHello (records
// included). Real ones are well under it, post-quantum key shares too.
const MaxHello = 16 << 10

// Errors Parse returns: the bytes are not the start of a TLS ClientHello,
// or it is larger than MaxHello. Either way the client has no server name
// rota can read.
var (
	ErrNotTLS   = errors.New("not a TLS ClientHello")
	ErrTooLarge = errors.New("TLS ClientHello larger than 16 KiB")
)

const (
	recordHeaderLen  = 5
	recordHandshake  = 22
	maxRecordLen     = 1 << 14 // a plaintext record's limit (RFC 8446 5.1)
	typeClientHello  = 1
	extServerName    = 0
	nameTypeHostName = 0
)

// Parse looks at the bytes a client sent first. It reports done with the
// server name (lower case, no trailing dot; "" when the ClientHello has
// none) once b holds a whole ClientHello, done false while more bytes are
// needed, and an error when b cannot start one. It does not retain b.
// Called again as bytes arrive, use a Reader: it goes on where it stopped.
func Parse(b []byte) (name string, done bool, err error) {
	var r Reader
	return r.Parse(b)
}

// Reader reads a ClientHello as its bytes arrive. Each call to Parse is
// given every byte so far (what the last call had, and more); the Reader
// frames only the records it has not seen, without copying, and assembles
// the message once, when it is whole. So the work is linear in the bytes
// however the client cuts them into records and segments (a ClientHello
// sent as thousands of one-byte records costs what one record does, give or
// take the headers). The zero Reader is ready; a Reader is for one client.
type Reader struct {
	framed int     // bytes of b framed: whole records
	have   int     // handshake bytes in those records
	need   int     // 4 + the handshake body's length; 0 until known
	head   [4]byte // the handshake header, which may span records
}

// Parse is the package's Parse, resumed: b must start with the bytes the
// last call was given.
func (r *Reader) Parse(b []byte) (name string, done bool, err error) {
	for r.need == 0 || r.have < r.need {
		rest := b[r.framed:]
		if len(rest) < recordHeaderLen {
			if len(rest) > 0 && rest[0] != recordHandshake {
				return "", false, ErrNotTLS
			}
			if len(rest) > 1 && rest[1] != 3 {
				return "", false, ErrNotTLS
			}
			return "", false, tooLarge(b)
		}
		if rest[0] != recordHandshake || rest[1] != 3 {
			return "", false, ErrNotTLS
		}
		n := int(rest[3])<<8 | int(rest[4])
		if n == 0 || n > maxRecordLen {
			return "", false, ErrNotTLS
		}
		if len(rest) < recordHeaderLen+n {
			return "", false, tooLarge(b)
		}
		frag := rest[recordHeaderLen : recordHeaderLen+n]
		r.framed += recordHeaderLen + n
		if r.have == 0 && frag[0] != typeClientHello {
			return "", false, ErrNotTLS
		}
		for i := 0; i < n && r.have+i < len(r.head); i++ {
			r.head[r.have+i] = frag[i]
		}
		r.have += n
		if r.need == 0 && r.have >= len(r.head) {
			r.need = 4 + (int(r.head[1])<<16 | int(r.head[2])<<8 | int(r.head[3]))
			if r.need > MaxHello {
				return "", false, ErrTooLarge
			}
		}
	}
	msg := assemble(b[:r.framed], r.have)
	name, err = serverName(msg[4:r.need])
	return name, err == nil, err
}

// assemble joins the fragments of the records in b, which are whole and
// hold have bytes: the common case, one record, needs no copy.
func assemble(b []byte, have int) []byte {
	n := int(b[3])<<8 | int(b[4])
	if n == have {
		return b[recordHeaderLen : recordHeaderLen+n]
	}
	msg := make([]byte, 0, have)
	for len(b) > 0 {
		n := int(b[3])<<8 | int(b[4])
		msg = append(msg, b[recordHeaderLen:recordHeaderLen+n]...)
		b = b[recordHeaderLen+n:]
	}
	return msg
}

// tooLarge is the answer while more bytes are needed: none, unless b is
// already at the bound.
func tooLarge(b []byte) error {
	if len(b) >= MaxHello {
		return ErrTooLarge
	}
	return nil
}

// serverName reads a ClientHello body (RFC 8446 4.1.2) up to its
// server_name extension (RFC 6066 3).
func serverName(body []byte) (string, error) {
	s := cryptobyte.String(body)
	var random, sessionID, suites, compression cryptobyte.String
	var version uint16
	if !s.ReadUint16(&version) || !s.ReadBytes((*[]byte)(&random), 32) ||
		!s.ReadUint8LengthPrefixed(&sessionID) ||
		!s.ReadUint16LengthPrefixed(&suites) ||
		!s.ReadUint8LengthPrefixed(&compression) {
		return "", ErrNotTLS
	}
	if s.Empty() {
		return "", nil // no extensions (an SSLv3-era hello): no name
	}
	var exts cryptobyte.String
	if !s.ReadUint16LengthPrefixed(&exts) || !s.Empty() {
		return "", ErrNotTLS
	}
	for !exts.Empty() {
		var typ uint16
		var data cryptobyte.String
		if !exts.ReadUint16(&typ) || !exts.ReadUint16LengthPrefixed(&data) {
			return "", ErrNotTLS
		}
		if typ != extServerName {
			continue
		}
		var names cryptobyte.String
		if !data.ReadUint16LengthPrefixed(&names) || !data.Empty() {
			return "", ErrNotTLS
		}
		for !names.Empty() {
			var nameType uint8
			var host cryptobyte.String
			if !names.ReadUint8(&nameType) || !names.ReadUint16LengthPrefixed(&host) {
				return "", ErrNotTLS
			}
			if nameType != nameTypeHostName {
				continue
			}
			return normalize(string(host))
		}
		return "", nil
	}
	return "", nil
}

// normalize lower-cases a host name and drops a trailing dot; a name that
// is empty or not printable ASCII is malformed.
func normalize(h string) (string, error) {
	h = strings.TrimSuffix(h, ".")
	if h == "" {
		return "", ErrNotTLS
	}
	for i := 0; i < len(h); i++ {
		if c := h[i]; c <= ' ' || c >= 0x7f {
			return "", ErrNotTLS
		}
	}
	return strings.ToLower(h), nil
}

// Table maps server names to routes: exact names, "*.suffix" wildcards
// (any name ending in ".suffix", at any depth) and "*" (anything, a client
// without a server name, or one that does not speak TLS). The most
// specific match wins: exact, then the longest wildcard, then "*". A Table
// is immutable once built; Match is safe for concurrent use and allocates
// nothing.
type Table struct {
	exact map[string]int
	wild  []wildcard // longest suffix first
	star  int        // -1: none
}

type wildcard struct {
	suffix string // ".api.example.com"
	route  int
}

// NewTable builds a table from each route's patterns, routes[i] being
// route i's. Patterns are matched without regard to case. Duplicates are
// the config's to reject; here the first stands.
func NewTable(routes [][]string) *Table {
	t := &Table{exact: map[string]int{}, star: -1}
	for i, pats := range routes {
		for _, p := range pats {
			p = strings.ToLower(strings.TrimSuffix(p, "."))
			switch {
			case p == "*":
				if t.star < 0 {
					t.star = i
				}
			case strings.HasPrefix(p, "*."):
				t.wild = append(t.wild, wildcard{suffix: p[1:], route: i})
			default:
				if _, dup := t.exact[p]; !dup {
					t.exact[p] = i
				}
			}
		}
	}
	// Longest suffix first; stable, so that of equal ones the first stands.
	for i := 1; i < len(t.wild); i++ {
		for j := i; j > 0 && len(t.wild[j].suffix) > len(t.wild[j-1].suffix); j-- {
			t.wild[j], t.wild[j-1] = t.wild[j-1], t.wild[j]
		}
	}
	return t
}

// Match returns the route for a server name as Parse returns it ("" for
// none), or -1 when no route matches.
func (t *Table) Match(name string) int {
	if name != "" {
		if i, ok := t.exact[name]; ok {
			return i
		}
		for _, w := range t.wild {
			if len(name) > len(w.suffix) && strings.HasSuffix(name, w.suffix) {
				return w.route
			}
		}
	}
	return t.star
}
