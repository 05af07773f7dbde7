package accesslog

import (
	"net/netip"
	"strconv"
	"time"
	"unicode/utf8"
)

// AppendJSON appends r as one JSON object and a newline, the fields in the
// order of the contract: time start listener route client peer sni target
// tries replayed connect_ms duration_ms bytes_in bytes_out termination,
// and tls_version tls_cipher alpn client_cert when rota terminated TLS.
func AppendJSON(b []byte, r *Record) []byte {
	b = append(b, `{"time":`...)
	b = appendTimeQuoted(b, r.Time)
	b = append(b, `,"start":`...)
	b = appendTimeQuoted(b, r.Start)
	b = append(b, `,"listener":`...)
	b = appendString(b, r.Listener)
	b = append(b, `,"route":`...)
	b = appendString(b, r.Route)
	b = append(b, `,"client":`...)
	b = appendAddrQuoted(b, r.Client)
	b = append(b, `,"peer":`...)
	b = appendAddrQuoted(b, r.Peer)
	b = append(b, `,"sni":`...)
	b = appendString(b, r.SNI)
	b = append(b, `,"target":`...)
	b = appendString(b, r.Target)
	b = append(b, `,"tries":[`...)
	for i, t := range r.TriesShown() {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"target":`...)
		b = appendString(b, t.Target)
		b = append(b, `,"why":`...)
		b = appendString(b, t.Why)
		b = append(b, '}')
	}
	b = append(b, `],"replayed":`...)
	b = strconv.AppendBool(b, r.Replayed)
	b = append(b, `,"connect_ms":`...)
	b = appendMillis(b, r.Connect)
	b = append(b, `,"duration_ms":`...)
	b = appendMillis(b, r.Duration)
	b = append(b, `,"bytes_in":`...)
	b = strconv.AppendUint(b, r.BytesIn, 10)
	b = append(b, `,"bytes_out":`...)
	b = strconv.AppendUint(b, r.BytesOut, 10)
	b = append(b, `,"termination":`...)
	b = appendString(b, r.Termination.String())
	if r.TLS.Version != "" {
		b = append(b, `,"tls_version":`...)
		b = appendString(b, r.TLS.Version)
		b = append(b, `,"tls_cipher":`...)
		b = appendString(b, r.TLS.Cipher)
		b = append(b, `,"alpn":`...)
		b = appendString(b, r.TLS.ALPN)
		b = append(b, `,"client_cert":`...)
		b = appendString(b, r.TLS.ClientCert)
	}
	return append(b, "}\n"...)
}

// AppendText appends r as one line of space-separated fields in the same
// order as AppendJSON ("-" for an empty one; tries as
// target/why,target/why), as HAProxy's tcplog does.
func AppendText(b []byte, r *Record) []byte {
	b = r.Time.UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, ' ')
	b = r.Start.UTC().AppendFormat(b, time.RFC3339Nano)
	for _, f := range [...]string{r.Listener, r.Route} {
		b = appendField(b, f)
	}
	b = appendAddrField(b, r.Client.IsValid(), r.Client.String)
	b = appendAddrField(b, r.Peer.IsValid(), r.Peer.String)
	b = appendField(b, r.SNI)
	b = appendField(b, r.Target)
	b = append(b, ' ')
	if r.NTries == 0 {
		b = append(b, '-')
	}
	for i, t := range r.TriesShown() {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(append(append(b, t.Target...), '/'), t.Why...)
	}
	b = append(b, ' ')
	b = strconv.AppendBool(b, r.Replayed)
	b = append(b, ' ')
	b = appendMillis(b, r.Connect)
	b = append(b, ' ')
	b = appendMillis(b, r.Duration)
	b = append(b, ' ')
	b = strconv.AppendUint(b, r.BytesIn, 10)
	b = append(b, ' ')
	b = strconv.AppendUint(b, r.BytesOut, 10)
	b = appendField(b, r.Termination.String())
	if r.TLS.Version != "" {
		for _, f := range [...]string{r.TLS.Version, r.TLS.Cipher, r.TLS.ALPN} {
			b = appendField(b, f)
		}
		// A subject may hold spaces (O=Example Corp): the line's
		// fields are space-separated.
		b = append(b, ' ')
		if r.TLS.ClientCert == "" {
			b = append(b, '-')
		}
		for _, c := range []byte(r.TLS.ClientCert) {
			if c == ' ' {
				c = '_'
			}
			b = append(b, c)
		}
	}
	return append(b, '\n')
}

func appendField(b []byte, s string) []byte {
	b = append(b, ' ')
	if s == "" {
		return append(b, '-')
	}
	return append(b, s...)
}

func appendAddrField(b []byte, valid bool, s func() string) []byte {
	if !valid {
		return append(b, " -"...)
	}
	return append(append(b, ' '), s()...)
}

func appendTimeQuoted(b []byte, t time.Time) []byte {
	b = append(b, '"')
	b = t.UTC().AppendFormat(b, time.RFC3339Nano)
	return append(b, '"')
}

func appendAddrQuoted(b []byte, a netip.AddrPort) []byte {
	b = append(b, '"')
	if a.IsValid() {
		b = a.AppendTo(b)
	}
	return append(b, '"')
}

// appendMillis writes d in milliseconds with three decimals.
func appendMillis(b []byte, d time.Duration) []byte {
	return strconv.AppendFloat(b, float64(d.Microseconds())/1000, 'f', 3, 64)
}

// appendString appends s as a JSON string: quotes, backslashes and control
// characters escaped, the rest (names and addresses: ASCII, mostly) as is.
// Invalid UTF-8 is replaced, as encoding/json does.
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			default:
				b = append(b, `\u00`...)
				b = append(b, hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

const hex = "0123456789abcdef"
