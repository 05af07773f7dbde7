package server_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/server"
)

// certs is a CA and certificates it issued, copied where the test can
// replace them as a renewal would.
type certs struct {
	t   *testing.T
	ca  *testenv.CA
	dir string
}

// install issues a certificate for host into name.pem and name-key.pem,
// replacing them atomically.
func (c *certs) install(name, host string) config.CertFiles {
	c.t.Helper()
	cert, key := c.ca.Issue(host, host)
	f := config.CertFiles{CertFile: filepath.Join(c.dir, name+".pem"), KeyFile: filepath.Join(c.dir, name+"-key.pem")}
	for src, dst := range map[string]string{cert: f.CertFile, key: f.KeyFile} {
		b, err := os.ReadFile(src)
		if err != nil {
			c.t.Fatal(err)
		}
		os.WriteFile(dst+".tmp", b, 0o600)
		if err := os.Rename(dst+".tmp", dst); err != nil {
			c.t.Fatal(err)
		}
	}
	return f
}

// sumBackend reads everything a client sends until its half-close, then
// answers the SHA-256 of it and closes: only a proxy that carries the
// client's end of stream through gets an answer.
func sumBackend(t *testing.T) string {
	return testenv.Serve(t, func(c net.Conn) {
		defer c.Close()
		h := sha256.New()
		if _, err := io.Copy(h, c); err != nil {
			return
		}
		io.WriteString(c, hex.EncodeToString(h.Sum(nil)))
	})
}

func tlsListener(name, target string, t config.TLSServer) config.Listener {
	l := fastListener(name, target)
	l.TLS = &t
	l.SNITimeout = 2 * time.Second
	return l
}

// Termination: the certificate by server name (the first without one),
// TLS 1.2 and 1.3, 64 MB checksummed through a half-close, a certificate
// replaced on disk served at the next handshake without a reload, and a
// client that does not speak TLS counted without a dial.
func TestTLSTermination(t *testing.T) {
	cs := &certs{t: t, ca: testenv.NewCA(t, "ca"), dir: t.TempDir()}
	a := cs.install("a", "a.example.com")
	b := cs.install("b", "b.example.com")
	target := sumBackend(t)
	cfg := config.Default()
	cfg.Admin.Listen = ""
	cfg.Listeners = []config.Listener{tlsListener("tls", target, config.TLSServer{Certs: []config.CertFiles{a, b}})}
	srv := startServer(t, cfg)
	addr := proxyAddr(t, srv, "tls")
	testenv.Eventually(t, "target up", 10*time.Second, func() bool { return liveCount(srv, "tls") == 1 })

	dial := func(sni string, version uint16) (*tls.Conn, error) {
		return tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr,
			&tls.Config{ServerName: sni, RootCAs: cs.ca.Pool, MinVersion: version, MaxVersion: version, InsecureSkipVerify: sni == ""})
	}
	served := func(c *tls.Conn) string { return c.ConnectionState().PeerCertificates[0].Subject.CommonName }
	for _, tc := range []struct {
		sni     string
		version uint16
		want    string
	}{
		{"b.example.com", tls.VersionTLS13, "b.example.com"},
		{"a.example.com", tls.VersionTLS12, "a.example.com"},
		{"b.example.com", tls.VersionTLS12, "b.example.com"},
		{"", tls.VersionTLS13, "a.example.com"},
	} {
		c, err := dial(tc.sni, tc.version)
		if err != nil {
			t.Fatalf("SNI %q, version %x: %v", tc.sni, tc.version, err)
		}
		if got := served(c); got != tc.want || c.ConnectionState().Version != tc.version {
			t.Fatalf("SNI %q: served %s over %x, want %s", tc.sni, got, c.ConnectionState().Version, tc.want)
		}
		// Half-close: the answer comes only after the client's end
		// reached the target.
		io.WriteString(c, "hello")
		c.CloseWrite()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		sum := sha256.Sum256([]byte("hello"))
		if err != nil || string(got) != hex.EncodeToString(sum[:]) {
			t.Fatalf("through the half-close: %q, %v", got, err)
		}
		c.Close()
	}

	// 64 MB, checksummed.
	c, err := dial("a.example.com", tls.VersionTLS13)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	chunk := make([]byte, 1<<20)
	for range 64 {
		rand.Read(chunk)
		h.Write(chunk)
		if _, err := c.Write(chunk); err != nil {
			t.Fatalf("bulk: %v", err)
		}
	}
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := io.ReadAll(c)
	if want := hex.EncodeToString(h.Sum(nil)); err != nil || string(got) != want {
		t.Fatalf("64 MB through termination: the target's sum %q (%v), want %s", got, err, want)
	}
	c.Close()

	// A renewed certificate, replaced on disk: served without a reload.
	cs.install("b", "b.example.com")
	renewed, _ := os.ReadFile(b.CertFile)
	block, _ := pem.Decode(renewed)
	testenv.Eventually(t, "the renewed certificate served", 5*time.Second, func() bool {
		c, err := dial("b.example.com", tls.VersionTLS13)
		if err != nil {
			return false
		}
		defer c.Close()
		return bytes.Equal(block.Bytes, c.ConnectionState().PeerCertificates[0].Raw)
	})

	// Not TLS: closed, counted, no target dialled. The clients before it
	// are ended first: each dials the target after its handshake, which
	// the client can finish and close before the proxy dials.
	testenv.Eventually(t, "the clients before ended", 5*time.Second, func() bool {
		return status(t, srv, "tls").Count("active_conns", "") == 0
	})
	dialsBefore := targetTotal(t, srv, "tls", target)
	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(raw, "GET / HTTP/1.0\r\n\r\n")
	raw.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.ReadAll(raw)
	raw.Close()
	testenv.Eventually(t, "not_tls counted", 5*time.Second, func() bool {
		return status(t, srv, "tls").Count("tls_handshake_errors", "not_tls") == 1
	})
	if n := targetTotal(t, srv, "tls", target); n != dialsBefore {
		t.Fatalf("a client that failed its handshake cost %d target connections", n-dialsBefore)
	}
}

// targetTotal is a target's total connections in /api/v1/targets.
func targetTotal(t *testing.T, srv *server.Server, listener, addr string) uint64 {
	t.Helper()
	tg, _ := findTarget(t, srv, listener, addr)
	return tg.TotalConns
}

// Client certificates required: none, or one of another CA, is refused
// in the handshake, counted by reason, and costs no target dial; one of
// the clients' CA gets through. openssl s_client, a TLS stack other than
// Go's, gets through with one too.
func TestTLSClientCertificates(t *testing.T) {
	cs := &certs{t: t, ca: testenv.NewCA(t, "ca"), dir: t.TempDir()}
	server := cs.install("srv", "127.0.0.1")
	clients := testenv.NewCA(t, "clients")
	be := testenv.StartBackend(t, "b")
	cfg := config.Default()
	cfg.Admin.Listen = ""
	log := newAccessLog(t, cfg)
	cfg.Listeners = []config.Listener{tlsListener("mtls", be.Addr, config.TLSServer{Certs: []config.CertFiles{server}, ClientCAFile: clients.File, ALPN: []string{"x-rota"}})}
	srv := startServer(t, cfg)
	addr := proxyAddr(t, srv, "mtls")
	testenv.Eventually(t, "target up", 10*time.Second, func() bool { return liveCount(srv, "mtls") == 1 })

	request := func(cert *tls.Certificate) (string, error) {
		tc := &tls.Config{RootCAs: cs.ca.Pool, ServerName: "127.0.0.1", NextProtos: []string{"x-rota"}}
		if cert != nil {
			// Sent whatever CAs the server names (Go's client would
			// otherwise send none it finds no match for).
			tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
		}
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, tc)
		if err != nil {
			return "", err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
			return "", err
		}
		b, err := io.ReadAll(c)
		return string(b), err
	}
	if got, err := request(nil); err == nil {
		t.Fatalf("no client certificate: answered %q", got)
	}
	stranger, _ := tls.LoadX509KeyPair(cs.ca.Issue("stranger"))
	if got, err := request(&stranger); err == nil {
		t.Fatalf("a certificate of another CA: answered %q", got)
	}
	if _, ok := testenv.Poll(5*time.Second, func() bool {
		st := status(t, srv, "mtls")
		return st.Count("tls_handshake_errors", "no_certificate") == 1 && st.Count("tls_handshake_errors", "bad_certificate") == 1
	}); !ok {
		st := status(t, srv, "mtls")
		var got []string
		for _, r := range []string{"not_tls", "version", "no_cipher", "no_certificate", "bad_certificate", "timeout", "closed", "other"} {
			got = append(got, fmt.Sprintf("%s=%d", r, st.Count("tls_handshake_errors", r)))
		}
		t.Fatalf("refusals counted: %v; want no_certificate=1 bad_certificate=1", got)
	}
	if n := targetTotal(t, srv, "mtls", be.Addr); n != 0 {
		t.Fatalf("refused handshakes cost %d target connections", n)
	}
	good, _ := tls.LoadX509KeyPair(clients.Issue("partner"))
	if got, err := request(&good); err != nil || got != "b" {
		t.Fatalf("with the clients' CA's certificate: %q, %v", got, err)
	}
	// The access log says what each handshake came to.
	var recs []logRecord
	testenv.Eventually(t, "three records", 5*time.Second, func() bool { recs = log.all(); return len(recs) == 3 })
	for i, want := range []string{"tls_handshake", "tls_handshake", "target_closed"} {
		if recs[i].Termination != want {
			t.Fatalf("record %d: termination %s, want %s", i, recs[i].Termination, want)
		}
	}
	if r := recs[2]; r.TLSVersion != "1.3" || r.TLSCipher == "" || r.ALPN != "x-rota" || r.ClientCert != "CN=partner" || r.Target != be.Addr {
		t.Fatalf("the served connection's record: %+v", r)
	}

	cc, ck := clients.Issue("openssl-partner")
	cmd := exec.Command("openssl", "s_client", "-connect", addr, "-servername", "127.0.0.1", "-CAfile", cs.ca.File,
		"-cert", cc, "-key", ck, "-verify_return_error", "-quiet", "-ign_eof")
	cmd.Stdin = strings.NewReader("GET / HTTP/1.0\r\n\r\n")
	out, err := cmd.Output()
	if err != nil || strings.TrimSpace(string(out)) != "b" {
		t.Fatalf("openssl s_client: %q, %v", out, err)
	}
}

// mtlsBackend is a TLS server that requires a client certificate its
// clients CA signed and answers each request with "secure <name>", where
// name is the client certificate's common name, then ends its side and
// reads until the client ends its.
func mtlsBackend(t *testing.T, ca *testenv.CA, clients *testenv.CA) string {
	t.Helper()
	cert, key := ca.Issue("backend", "127.0.0.1")
	kp, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	return testenv.Serve(t, func(c net.Conn) {
		defer c.Close()
		tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{kp}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: clients.Pool})
		tc.SetDeadline(time.Now().Add(5 * time.Second))
		if err := tc.Handshake(); err != nil {
			return
		}
		buf := make([]byte, 64)
		if _, err := tc.Read(buf); err != nil {
			return // a health check: handshake and close
		}
		io.WriteString(tc, "secure "+tc.ConnectionState().PeerCertificates[0].Subject.CommonName)
		// Read to the client's close_notify (rota passes a half-close on
		// as one) before closing: closing with it unread would reset the
		// connection, and the answer with it (a CI run failed on that).
		tc.CloseWrite()
		io.Copy(io.Discard, tc)
	})
}

// Origination: rota speaks mTLS to a target that requires a client
// certificate (its health checked over the same TLS); a wrong server name
// is a failed connect that says why; and TLS both ways on one listener.
func TestTLSOrigination(t *testing.T) {
	ca, clients := testenv.NewCA(t, "ca"), testenv.NewCA(t, "clients")
	target := mtlsBackend(t, ca, clients)
	rotaCert, rotaKey := clients.Issue("rota")
	cfg := config.Default()
	cfg.Admin.Listen = ""
	out := fastListener("out", target)
	out.TargetTLS = &config.TLSClient{CAFile: ca.File, CertFile: rotaCert, KeyFile: rotaKey}
	wrong := fastListener("wrong", target)
	wrong.TargetTLS = &config.TLSClient{CAFile: ca.File, CertFile: rotaCert, KeyFile: rotaKey, ServerName: "db.example.com"}
	wrong.Health.Check = "none" // so that the dial itself is what fails
	wrong.Retries = 0
	stranger := testenv.NewCA(t, "stranger")
	wrongCA := fastListener("wrong-ca", target)
	wrongCA.TargetTLS = &config.TLSClient{CAFile: stranger.File, CertFile: rotaCert, KeyFile: rotaKey}
	wrongCA.Health.Check = "none"
	wrongCA.Retries = 0
	cs := &certs{t: t, ca: ca, dir: t.TempDir()}
	both := tlsListener("both", target, config.TLSServer{Certs: []config.CertFiles{cs.install("front", "127.0.0.1")}})
	both.TargetTLS = out.TargetTLS
	cfg.Listeners = []config.Listener{out, wrong, wrongCA, both}
	srv := startServer(t, cfg)
	testenv.Eventually(t, "the target up, checked over mTLS", 10*time.Second, func() bool { return liveCount(srv, "out") == 1 })

	if got, err := testenv.Request(proxyAddr(t, srv, "out")); err != nil || got != "secure rota" {
		t.Fatalf("through origination: %q, %v", got, err)
	}
	if got, err := testenv.Request(proxyAddr(t, srv, "wrong")); err == nil && got != "" {
		t.Fatalf("a target whose certificate does not name db.example.com answered %q", got)
	}
	testenv.Eventually(t, "the failed connect explained", 5*time.Second, func() bool {
		return strings.Contains(targetStatus(t, srv, "wrong", target), "db.example.com")
	})
	t.Logf("wrong server name: %s", targetStatus(t, srv, "wrong", target))
	if got, err := testenv.Request(proxyAddr(t, srv, "wrong-ca")); err == nil && got != "" {
		t.Fatalf("a target whose certificate another CA signed answered %q", got)
	}
	testenv.Eventually(t, "the unknown authority explained", 5*time.Second, func() bool {
		return strings.Contains(targetStatus(t, srv, "wrong-ca", target), "unknown authority")
	})

	c, err := tls.Dial("tcp", proxyAddr(t, srv, "both"), &tls.Config{RootCAs: ca.Pool, ServerName: "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "GET / HTTP/1.0\r\n\r\n")
	if got, err := io.ReadAll(c); err != nil || string(got) != "secure rota" {
		t.Fatalf("TLS in and out: %q, %v", got, err)
	}
}

// tls: on an SNI route: its clients' TLS is terminated (the ClientHello
// the routing read is the handshake's) and its targets get plaintext; the
// listener's other route passes TLS through unchanged, to a TLS backend.
func TestTLSTerminationOnARoute(t *testing.T) {
	cs := &certs{t: t, ca: testenv.NewCA(t, "ca"), dir: t.TempDir()}
	term := cs.install("api", "api.example.com")
	plain := testenv.StartBackend(t, "plain")
	passCert, passKey := cs.ca.Issue("www.example.com", "www.example.com")
	kp, _ := tls.LoadX509KeyPair(passCert, passKey)
	passthrough := testenv.Serve(t, func(c net.Conn) {
		defer c.Close()
		tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{kp}})
		tc.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := tc.Read(make([]byte, 64)); err != nil {
			return
		}
		io.WriteString(tc, "backend's own TLS")
	})
	cfg := config.Default()
	cfg.Admin.Listen = ""
	log := newAccessLog(t, cfg)
	l := fastListener("edge")
	l.Discovery, l.Static = "", nil
	l.SNITimeout = 2 * time.Second
	api := config.Route{Name: "api", SNI: []string{"api.example.com"}, Pool: config.DefaultPool(), TLS: &config.TLSServer{Certs: []config.CertFiles{term}}}
	api.Discovery, api.Static = "static", config.Statics(plain.Addr)
	rest := config.Route{Name: "rest", SNI: []string{"*"}, Pool: config.DefaultPool()}
	rest.Discovery, rest.Static = "static", config.Statics(passthrough)
	l.Routes = []config.Route{api, rest}
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	addr := proxyAddr(t, srv, "edge")
	testenv.Eventually(t, "both routes up", 10*time.Second, func() bool { return liveCount(srv, "edge") == 2 })

	ask := func(name string) (string, string, error) {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{ServerName: name, RootCAs: cs.ca.Pool})
		if err != nil {
			return "", "", err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "GET / HTTP/1.0\r\n\r\n")
		b, err := io.ReadAll(c)
		return string(b), c.ConnectionState().PeerCertificates[0].Subject.CommonName, err
	}
	if got, cn, err := ask("api.example.com"); err != nil || got != "plain" || cn != "api.example.com" {
		t.Fatalf("terminated route: %q from a certificate for %q, %v", got, cn, err)
	}
	if got, cn, err := ask("www.example.com"); err != nil || got != "backend's own TLS" || cn != "www.example.com" {
		t.Fatalf("passthrough route: %q from a certificate for %q, %v", got, cn, err)
	}
	var recs []logRecord
	testenv.Eventually(t, "two records", 5*time.Second, func() bool { recs = log.all(); return len(recs) == 2 })
	if r := recs[0]; r.Route != "api" || r.SNI != "api.example.com" || r.TLSVersion != "1.3" || r.Target != plain.Addr {
		t.Fatalf("the terminated route's record: %+v", r)
	}
	if r := recs[1]; r.Route != "rest" || r.TLSVersion != "" {
		t.Fatalf("the passthrough route's record: %+v", r)
	}
}

// A listener that terminates TLS behind a balancer sending PROXY headers:
// the handshake starts after the header (it is the routed handshake, from
// the ClientHello the prelude read), and the access log has the
// balancer's client with the TLS version. A client that says nothing after
// the header is closed after sni_timeout, not twice that; one without the
// header is refused as a bad header, not as a failed handshake.
func TestTLSTerminationAfterProxyHeader(t *testing.T) {
	cs := &certs{t: t, ca: testenv.NewCA(t, "ca"), dir: t.TempDir()}
	target := testenv.StartBackend(t, "b1")
	l := tlsListener("edge", target.Addr, config.TLSServer{Certs: []config.CertFiles{cs.install("a", "a.example.com")}})
	l.AcceptProxyProtocol = prefixes(t, "127.0.0.0/8")
	l.ProxyHeaderTimeout = 2 * time.Second
	l.SNITimeout = time.Second
	cfg := config.Default()
	cfg.Admin.Listen = ""
	log := newAccessLog(t, cfg)
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	addr := proxyAddr(t, srv, "edge")
	testenv.Eventually(t, "target up", 10*time.Second, func() bool { return liveCount(srv, "edge") == 1 })

	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	client := &net.TCPAddr{IP: net.ParseIP("198.51.100.9"), Port: 4242}
	hdr, _ := proxyproto.HeaderProxyFromAddrs(2, client, raw.RemoteAddr()).Format()
	if _, err := raw.Write(hdr); err != nil {
		t.Fatal(err)
	}
	c := tls.Client(raw, &tls.Config{ServerName: "a.example.com", RootCAs: cs.ca.Pool})
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if err := c.Handshake(); err != nil {
		t.Fatalf("handshake after the PROXY header: %v", err)
	}
	io.WriteString(c, "hello\n")
	if b, err := io.ReadAll(c); err != nil || string(b) != "b1" {
		t.Fatalf("through TLS after the header: %q, %v", b, err)
	}
	c.Close() // the record is written when the connection ends
	var recs []logRecord
	testenv.Eventually(t, "its record", 5*time.Second, func() bool { recs = log.all(); return len(recs) == 1 })
	if r := recs[0]; r.Client != "198.51.100.9:4242" || r.TLSVersion != "1.3" || r.Target != target.Addr || r.SNI != "a.example.com" {
		t.Fatalf("record %+v: want the header's client, TLS 1.3, the target and the server name", r)
	}

	// A client that sends the header and then nothing is closed once
	// sni_timeout has passed, once: waiting for its ClientHello spent the
	// handshake's time. Counted as a handshake timeout, no dial.
	silent, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	began := time.Now() // before the header: rota's wait begins after it
	silent.Write(hdr)
	silent.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := silent.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("the silent client: read %d bytes, %v; want closed", n, err)
	}
	if took := time.Since(began); took < l.SNITimeout || took > l.SNITimeout*19/10 {
		t.Fatalf("the silent client closed after %v, want sni_timeout (%v), not twice it", took, l.SNITimeout)
	}
	testenv.Eventually(t, "the timeout counted", 5*time.Second, func() bool {
		return status(t, srv, "edge").Count("tls_handshake_errors", "timeout") == 1
	})
	testenv.Eventually(t, "its record", 5*time.Second, func() bool { recs = log.all(); return len(recs) == 2 })
	if r := recs[1]; r.Termination != "tls_handshake" || r.Target != "" {
		t.Fatalf("the silent client's record: %+v", r)
	}

	// No header: a TLS client straight in is a bad header.
	if _, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{ServerName: "a.example.com", RootCAs: cs.ca.Pool}); err == nil {
		t.Fatal("a client without the PROXY header was served")
	}
	testenv.Eventually(t, "its record", 5*time.Second, func() bool { recs = log.all(); return len(recs) == 3 })
	if r := recs[2]; r.Termination != "proxy_header_error" || r.Target != "" {
		t.Fatalf("the header-less client's record: %+v", r)
	}
}
