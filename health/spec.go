package health

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
)

// Step is one step of a send_expect check: Send writes bytes, Expect waits
// (within the probe's timeout) until what has arrived contains bytes. A
// string takes \r \n \t \\ \" and \xNN escapes, or is "hex:" and hex digits.
type Step struct {
	Send   string `yaml:"send"`
	Expect string `yaml:"expect"`
}

// TLS is how https, tls and grpc checks speak TLS to a target.
type TLS struct {
	ServerName         string `yaml:"server_name"` // default: the http Host, else the target's address
	CAFile             string `yaml:"ca_file"`     // default: the system's roots
	CertFile           string `yaml:"cert_file"`   // a client certificate, with key_file
	KeyFile            string `yaml:"key_file"`
	InsecureSkipVerify bool   `yaml:"insecure_skip_verify"`
}

// Set reports whether any TLS option is given.
func (t TLS) Set() bool { return t != TLS{} }

// TLSError is a TLS option that does not load: Key is its yaml key.
type TLSError struct {
	Key string
	Err error
}

func (e *TLSError) Error() string { return e.Key + ": " + e.Err.Error() }
func (e *TLSError) Unwrap() error { return e.Err }

// ClientConfig loads the files and returns the TLS client configuration;
// an error is a *TLSError.
func (t TLS) ClientConfig() (*tls.Config, error) {
	c := &tls.Config{
		ServerName:         t.ServerName,
		InsecureSkipVerify: t.InsecureSkipVerify, //nolint:gosec // the user's explicit choice, for self-signed test targets
		MinVersion:         tls.VersionTLS12,
		// Probes reconnect every interval: resuming sessions spares a full
		// handshake per probe where the target allows it.
		ClientSessionCache: tls.NewLRUClientSessionCache(4096),
	}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, &TLSError{"ca_file", err}
		}
		c.RootCAs = x509.NewCertPool()
		if !c.RootCAs.AppendCertsFromPEM(pem) {
			return nil, &TLSError{"ca_file", fmt.Errorf("%s: no PEM certificate in it", t.CAFile)}
		}
	}
	if t.CertFile != "" || t.KeyFile != "" {
		if t.CertFile == "" || t.KeyFile == "" {
			return nil, &TLSError{"cert_file", errors.New("cert_file and key_file go together")}
		}
		cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, &TLSError{"cert_file", err}
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// DefaultExpectStatus is the http and https checks' expect_status when
// none is given: any 2xx or 3xx.
var DefaultExpectStatus = []string{"200-399"}

// statusRange is an expect_status entry: lo..hi inclusive.
type statusRange struct{ lo, hi int }

// ParseStatus parses an expect_status entry: a code ("200") or a range
// ("200-299"), each 100-599.
func ParseStatus(s string) (lo, hi int, err error) {
	a, b, isRange := strings.Cut(strings.TrimSpace(s), "-")
	lo, err = strconv.Atoi(strings.TrimSpace(a))
	if err != nil || lo < 100 || lo > 599 {
		return 0, 0, fmt.Errorf("%q is not a status code (100-599) or a range like \"200-299\"", s)
	}
	hi = lo
	if isRange {
		hi, err = strconv.Atoi(strings.TrimSpace(b))
		if err != nil || hi < lo || hi > 599 {
			return 0, 0, fmt.Errorf("%q is not a range of status codes like \"200-299\"", s)
		}
	}
	return lo, hi, nil
}

// ParseBytes turns a send_expect string into the bytes it stands for:
// "hex:0a0b..." or text with \r \n \t \\ \" \0 and \xNN escapes.
func ParseBytes(s string) ([]byte, error) {
	if h, ok := strings.CutPrefix(s, "hex:"); ok {
		b, err := hex.DecodeString(strings.ReplaceAll(h, " ", ""))
		if err != nil {
			return nil, fmt.Errorf("%q: not hex digits: %w", s, err)
		}
		return b, nil
	}
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		if s[i] != '\\' {
			out = append(out, s[i])
			continue
		}
		if i+1 == len(s) {
			return nil, fmt.Errorf("%q ends in a lone \\", s)
		}
		i++
		switch s[i] {
		case 'r':
			out = append(out, '\r')
		case 'n':
			out = append(out, '\n')
		case 't':
			out = append(out, '\t')
		case '0':
			out = append(out, 0)
		case '\\', '"':
			out = append(out, s[i])
		case 'x':
			if i+2 >= len(s) {
				return nil, fmt.Errorf("%q: \\x needs two hex digits", s)
			}
			b, err := hex.DecodeString(s[i+1 : i+3])
			if err != nil {
				return nil, fmt.Errorf("%q: \\x%s is not two hex digits", s, s[i+1:i+3])
			}
			out = append(out, b[0])
			i += 2
		default:
			return nil, fmt.Errorf("%q: unknown escape \\%c (\\r \\n \\t \\0 \\\\ \\\" \\xNN)", s, s[i])
		}
	}
	return out, nil
}

// step is a Step parsed: exactly one of send and expect is set.
type step struct{ send, expect []byte }

// spec is a Config parsed once, at load: what each probe needs, typed. It
// is immutable: a reload makes a new one, and a probe keeps the spec it
// started with.
type spec struct {
	cfg    Config
	status []statusRange
	steps  []step
	tls    *tls.Config // https, tls, grpc (when TLS is set)
	// err is why cfg could not be parsed (a file that went away after the
	// configuration was checked): every probe fails with it.
	err error
}

// compile parses cfg; a failure is kept in the spec, so that every probe
// says why (the configuration's validation reports it first, with its
// position).
func compile(cfg Config) *spec {
	s := &spec{cfg: cfg}
	s.err = s.parse()
	return s
}

func (s *spec) parse() error {
	cfg := s.cfg
	statuses := cfg.ExpectStatus
	if len(statuses) == 0 {
		statuses = DefaultExpectStatus
	}
	for _, st := range statuses {
		lo, hi, err := ParseStatus(st)
		if err != nil {
			return fmt.Errorf("expect_status: %w", err)
		}
		s.status = append(s.status, statusRange{lo, hi})
	}
	for i, st := range cfg.Steps {
		var p step
		var err error
		switch {
		case st.Send != "" && st.Expect == "":
			p.send, err = ParseBytes(st.Send)
		case st.Expect != "" && st.Send == "":
			p.expect, err = ParseBytes(st.Expect)
		default:
			err = errors.New("one of send and expect")
		}
		if err != nil {
			return fmt.Errorf("steps[%d]: %w", i, err)
		}
		s.steps = append(s.steps, p)
	}
	if cfg.Check == CheckHTTPS || cfg.Check == CheckTLS || cfg.Check == CheckGRPC && cfg.TLS.Set() {
		t := cfg.TLS
		if t.ServerName == "" && cfg.Host != "" {
			t.ServerName, _, _ = strings.Cut(cfg.Host, ":")
		}
		c, err := t.ClientConfig()
		if err != nil {
			return fmt.Errorf("tls: %w", err)
		}
		s.tls = c
	}
	return nil
}

// wantStatus reports whether code is one the check expects.
func (s *spec) wantStatus(code int) bool {
	for _, r := range s.status {
		if code >= r.lo && code <= r.hi {
			return true
		}
	}
	return false
}

// addr is where a probe of target addr connects: its host on the check's
// port, when one is set.
func (s *spec) addr(target string) string {
	if s.cfg.Port == 0 {
		return target
	}
	host, _, err := net.SplitHostPort(target)
	if err != nil {
		return target // the dial says why
	}
	return net.JoinHostPort(host, strconv.Itoa(s.cfg.Port))
}
