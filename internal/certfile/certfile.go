// Package certfile serves TLS certificates from PEM files that may be
// replaced while rota runs (cert-manager, certbot, a Kubernetes Secret's
// atomic symlink swap): a renewed certificate applies to the next handshake
// without a reload, and a file replaced by something that does not load
// keeps the certificate in force and says why.
//
// A Reloader checks its files at most once a CheckEvery, on a handshake
// (a stat of each file; they are read again only when one changed), so it
// has no goroutine and no watch to set up or stop.
//
// Ownership: a Reloader's loaded state is immutable once published through
// an atomic pointer; handshakes read it without a lock. One handshake at a
// time re-reads the files (a TryLock: the others go on with what is in
// force), and Set, called on a config reload, takes the same lock.
package certfile

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Files names a certificate, its key, and optionally the CA certificates
// that verify clients' certificates.
type Files struct {
	CertFile, KeyFile string
	// ClientCAFile, if set, is a PEM bundle of the CAs whose client
	// certificates are accepted.
	ClientCAFile string
}

// CheckEvery bounds how often the files are looked at.
const CheckEvery = time.Second

// Reloader holds a certificate (and client CAs) loaded from Files.
type Reloader struct {
	cur     atomic.Pointer[loaded]
	mu      sync.Mutex // one reader of the files at a time
	lastErr atomic.Pointer[string]
	// OnError, if set, is told when a changed file does not load (the old
	// certificate stays), once per change; OnReload when a changed file
	// did. Set them before the first handshake.
	OnError  func(error)
	OnReload func(Files)
	now      func() time.Time
}

// loaded is what the files held when they were last read.
type loaded struct {
	files   Files
	cert    *tls.Certificate
	clients *x509.CertPool // nil without ClientCAFile
	stamps  []stamp        // the files' state when read
	checked time.Time
}

type stamp struct {
	size  int64
	mtime time.Time
	ok    bool
}

// New loads f; an error (a missing file, a key that does not match) is the
// configuration's to report.
func New(f Files) (*Reloader, error) {
	r := &Reloader{now: time.Now}
	l, err := r.load(f)
	if err != nil {
		return nil, err
	}
	r.cur.Store(l)
	return r, nil
}

// Set loads f (a config reload: the same files read again, or others); on
// error the certificate in force stays.
func (r *Reloader) Set(f Files) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	l, err := r.load(f)
	if err != nil {
		return err
	}
	r.cur.Store(l)
	r.lastErr.Store(nil)
	return nil
}

// LastError is why the files' last change did not load, "" when it did
// (or nothing changed).
func (r *Reloader) LastError() string {
	if p := r.lastErr.Load(); p != nil {
		return *p
	}
	return ""
}

// Certificate is the certificate in force, after a look at the files when
// the last look was CheckEvery ago; nil for client CAs alone.
func (r *Reloader) Certificate() *tls.Certificate { return r.current().cert }

// ClientCAs is the client CA pool in force (nil without ClientCAFile),
// after a look at the files when due.
func (r *Reloader) ClientCAs() *x509.CertPool { return r.current().clients }

// ServerConfig is a TLS server configuration whose certificate (and
// client CAs, with ClientCAFile) follow the files; base, if not nil, gives
// the rest (versions, ALPN). Without ClientCAFile no client certificate is
// asked for; with it one is required and verified.
func (r *Reloader) ServerConfig(base *tls.Config) *tls.Config {
	if base == nil {
		base = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	cfg := base.Clone()
	cfg.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		l := r.current()
		c := base.Clone()
		c.Certificates = []tls.Certificate{*l.cert}
		if l.clients != nil {
			c.ClientCAs, c.ClientAuth = l.clients, tls.RequireAndVerifyClientCert
		}
		return c, nil
	}
	return cfg
}

// current is the state in force, refreshed from the files when due.
func (r *Reloader) current() *loaded {
	l := r.cur.Load()
	now := r.now()
	if now.Sub(l.checked) < CheckEvery || !r.mu.TryLock() {
		return l
	}
	defer r.mu.Unlock()
	l = r.cur.Load() // Set may have run meanwhile
	if now.Sub(l.checked) < CheckEvery {
		return l
	}
	stamps := stampsOf(l.files)
	if equalStamps(stamps, l.stamps) {
		next := *l
		next.checked = now
		r.cur.Store(&next)
		return &next
	}
	fresh, err := r.load(l.files)
	if err != nil {
		// Keep serving what was in force; look again once the files
		// change again, without repeating the complaint meanwhile.
		next := *l
		next.checked, next.stamps = now, stamps
		r.cur.Store(&next)
		msg := err.Error()
		r.lastErr.Store(&msg)
		if r.OnError != nil {
			r.OnError(err)
		}
		return &next
	}
	r.cur.Store(fresh)
	r.lastErr.Store(nil)
	if r.OnReload != nil {
		r.OnReload(fresh.files)
	}
	return fresh
}

// load reads f.
func (r *Reloader) load(f Files) (*loaded, error) {
	caOnly := f.CertFile == "" && f.KeyFile == "" && f.ClientCAFile != ""
	if !caOnly && (f.CertFile == "" || f.KeyFile == "") {
		return nil, errors.New("a certificate needs cert_file and key_file")
	}
	stamps := stampsOf(f) // before reading: a change while reading is seen next time
	l := &loaded{files: f, stamps: stamps, checked: r.now()}
	if !caOnly {
		cert, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("load %s and %s: %w", f.CertFile, f.KeyFile, err)
		}
		l.cert = &cert
	}
	if f.ClientCAFile != "" {
		b, err := os.ReadFile(f.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("client_ca_file: %w", err)
		}
		l.clients = x509.NewCertPool()
		if !l.clients.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("client_ca_file %s: no PEM certificate in it", f.ClientCAFile)
		}
	}
	return l, nil
}

func stampsOf(f Files) []stamp {
	var out []stamp
	for _, p := range []string{f.CertFile, f.KeyFile, f.ClientCAFile} {
		if p == "" {
			continue
		}
		fi, err := os.Stat(p) // follows symlinks: a Secret's ..data swap is a change
		if err != nil {
			out = append(out, stamp{})
			continue
		}
		out = append(out, stamp{size: fi.Size(), mtime: fi.ModTime(), ok: true})
	}
	return out
}

func equalStamps(a, b []stamp) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// ClientAuth is how a TLS server treats clients' certificates.
type ClientAuth int

const (
	// ClientAuthNone asks for none.
	ClientAuthNone ClientAuth = iota
	// ClientAuthRequest asks for one and verifies it when given (against
	// the client CAs; without them any is taken).
	ClientAuthRequest
	// ClientAuthRequire refuses a client without one the client CAs
	// signed.
	ClientAuthRequire
)

// ServerFiles describe a TLS server: its certificates (the one for a
// handshake chosen by the client's server name), the CAs of its clients'
// certificates and what it asks of clients, its least version and its
// ALPN protocols.
type ServerFiles struct {
	Certs        []Files // CertFile and KeyFile of each
	ClientCAFile string
	ClientAuth   ClientAuth
	MinVersion   uint16 // tls.VersionTLS12 when 0
	ALPN         []string
}

// Server is a TLS server configuration that follows its files.
type Server struct {
	state atomic.Pointer[serverState]
	// OnError and OnReload are each Reloader's (see Reloader), set by New.
	onError  func(error)
	onReload func(Files)
}

type serverState struct {
	sf    ServerFiles
	certs []*Reloader
	cas   *Reloader // nil without ClientCAFile
	base  *tls.Config
}

// NewServer loads sf; onError and onReload (either may be nil) hear of
// the files' changes as a Reloader's do.
func NewServer(sf ServerFiles, onError func(error), onReload func(Files)) (*Server, error) {
	s := &Server{onError: onError, onReload: onReload}
	st, err := s.load(sf)
	if err != nil {
		return nil, err
	}
	s.state.Store(st)
	return s, nil
}

// Set loads sf (a config reload); on error what is in force stays.
func (s *Server) Set(sf ServerFiles) error {
	st, err := s.load(sf)
	if err != nil {
		return err
	}
	s.state.Store(st)
	return nil
}

func (s *Server) load(sf ServerFiles) (*serverState, error) {
	if len(sf.Certs) == 0 {
		return nil, errors.New("no certificate")
	}
	st := &serverState{sf: sf}
	for _, f := range sf.Certs {
		r, err := New(Files{CertFile: f.CertFile, KeyFile: f.KeyFile})
		if err != nil {
			return nil, err
		}
		r.OnError, r.OnReload = s.onError, s.onReload
		st.certs = append(st.certs, r)
	}
	if sf.ClientCAFile != "" {
		r, err := New(Files{ClientCAFile: sf.ClientCAFile})
		if err != nil {
			return nil, err
		}
		r.OnError, r.OnReload = s.onError, s.onReload
		st.cas = r
	}
	if sf.ClientAuth == ClientAuthRequire && st.cas == nil {
		return nil, errors.New("client_auth require needs client_ca_file")
	}
	minVersion := sf.MinVersion
	if minVersion == 0 {
		minVersion = tls.VersionTLS12
	}
	st.base = &tls.Config{MinVersion: minVersion, NextProtos: sf.ALPN}
	return st, nil
}

// Config is the server configuration: each handshake takes the
// certificates and client CAs in force then.
func (s *Server) Config() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			st := s.state.Load()
			c := st.base.Clone()
			c.Certificates = []tls.Certificate{*st.pick(hello)}
			switch {
			case st.sf.ClientAuth == ClientAuthRequire:
				c.ClientAuth, c.ClientCAs = tls.RequireAndVerifyClientCert, st.cas.ClientCAs()
			case st.sf.ClientAuth == ClientAuthRequest && st.cas != nil:
				c.ClientAuth, c.ClientCAs = tls.VerifyClientCertIfGiven, st.cas.ClientCAs()
			case st.sf.ClientAuth == ClientAuthRequest:
				c.ClientAuth = tls.RequestClientCert
			}
			return c, nil
		},
	}
}

// pick is the first certificate that suits the client's hello (its
// server name and algorithms), else the first.
func (st *serverState) pick(hello *tls.ClientHelloInfo) *tls.Certificate {
	var first *tls.Certificate
	for _, r := range st.certs {
		c := r.Certificate()
		if first == nil {
			first = c
		}
		if hello.SupportsCertificate(c) == nil {
			return c
		}
	}
	return first
}

// ClientFiles describe a TLS client: the server name it verifies (""
// for the dialled host), the CAs it trusts ("" for the system's), its
// own certificate (mTLS, followed on disk), and its ALPN protocols.
type ClientFiles struct {
	ServerName         string
	CAFile             string
	Cert               Files // CertFile and KeyFile; zero for none
	InsecureSkipVerify bool
	ALPN               []string
}

// ClientConfig loads cf into a TLS client configuration whose client
// certificate follows its files. Its ServerName is cf's; a dial with none
// sets the host dialled (see ForHost). Sessions are resumed across dials.
func ClientConfig(cf ClientFiles) (*tls.Config, error) {
	c := &tls.Config{
		ServerName:         cf.ServerName,
		InsecureSkipVerify: cf.InsecureSkipVerify, //nolint:gosec // the user's explicit choice
		MinVersion:         tls.VersionTLS12,
		NextProtos:         cf.ALPN,
		ClientSessionCache: tls.NewLRUClientSessionCache(1024),
	}
	if cf.CAFile != "" {
		b, err := os.ReadFile(cf.CAFile)
		if err != nil {
			return nil, fmt.Errorf("ca_file: %w", err)
		}
		c.RootCAs = x509.NewCertPool()
		if !c.RootCAs.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("ca_file %s: no PEM certificate in it", cf.CAFile)
		}
	}
	if cf.Cert.CertFile != "" {
		r, err := New(Files{CertFile: cf.Cert.CertFile, KeyFile: cf.Cert.KeyFile})
		if err != nil {
			return nil, err
		}
		c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return r.Certificate(), nil
		}
	}
	return c, nil
}

// ForHost is c for a dial to addr (host:port): c itself when it names a
// server, else a copy naming addr's host, as a browser would.
func ForHost(c *tls.Config, addr string) *tls.Config {
	if c.ServerName != "" || c.InsecureSkipVerify {
		return c
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	cc := c.Clone()
	cc.ServerName = host
	return cc
}
