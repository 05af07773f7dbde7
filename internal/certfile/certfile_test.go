package certfile

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rota-proxy/rota/internal/testenv"
)

// files copies a certificate and key that ca issues for name to dir's
// cert.pem and key.pem (replaced atomically, as cert-manager and certbot
// replace theirs).
func install(t *testing.T, ca *testenv.CA, dir, name string) Files {
	t.Helper()
	cert, key := ca.Issue(name, "127.0.0.1")
	f := Files{CertFile: filepath.Join(dir, "cert.pem"), KeyFile: filepath.Join(dir, "key.pem")}
	for src, dst := range map[string]string{cert: f.CertFile, key: f.KeyFile} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst+".tmp", b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(dst+".tmp", dst); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func commonName(t *testing.T, c *tls.Certificate) string {
	t.Helper()
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	return leaf.Subject.CommonName
}

// A replaced certificate is served after the next look at the files (no
// reload); one that does not load keeps the old, says why once, and is
// taken when fixed.
func TestFollowsItsFiles(t *testing.T) {
	ca := testenv.NewCA(t, "ca")
	dir := t.TempDir()
	f := install(t, ca, dir, "first")
	r, err := New(f)
	if err != nil {
		t.Fatal(err)
	}
	clock := time.Now()
	r.now = func() time.Time { return clock }
	var errs []error
	var reloads int
	r.OnError = func(err error) { errs = append(errs, err) }
	r.OnReload = func(Files) { reloads++ }

	install(t, ca, dir, "second")
	if got := commonName(t, r.Certificate()); got != "first" {
		t.Fatalf("files looked at again before CheckEvery: %s", got)
	}
	clock = clock.Add(CheckEvery)
	if got := commonName(t, r.Certificate()); got != "second" || reloads != 1 {
		t.Fatalf("after CheckEvery: %s (%d reloads), want the replaced certificate", got, reloads)
	}

	if err := os.WriteFile(f.CertFile, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		clock = clock.Add(CheckEvery)
		if got := commonName(t, r.Certificate()); got != "second" {
			t.Fatalf("a broken file replaced the certificate in force: %s", got)
		}
	}
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), f.CertFile) || r.LastError() == "" {
		t.Fatalf("errors %v, last %q: want one naming the file", errs, r.LastError())
	}
	install(t, ca, dir, "third")
	clock = clock.Add(CheckEvery)
	if got := commonName(t, r.Certificate()); got != "third" || r.LastError() != "" {
		t.Fatalf("after the fix: %s, last error %q", got, r.LastError())
	}
}

// New and Set refuse files that do not load; Set keeps what is in force.
func TestRefusesBadFiles(t *testing.T) {
	ca := testenv.NewCA(t, "ca")
	f := install(t, ca, t.TempDir(), "good")
	if _, err := New(Files{CertFile: f.CertFile, KeyFile: "/nonexistent/key.pem"}); err == nil {
		t.Fatal("a missing key loaded")
	}
	other := install(t, ca, t.TempDir(), "other")
	if _, err := New(Files{CertFile: f.CertFile, KeyFile: other.KeyFile}); err == nil {
		t.Fatal("a key that does not match the certificate loaded")
	}
	r, err := New(f)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Set(Files{CertFile: f.CertFile, KeyFile: f.KeyFile, ClientCAFile: f.CertFile + ".missing"}); err == nil {
		t.Fatal("Set took a missing client CA file")
	}
	if got := commonName(t, r.Certificate()); got != "good" {
		t.Fatalf("after a refused Set: %s", got)
	}
}

// Over real TLS: the server configuration presents the current
// certificate and, with ClientCAFile, requires a client certificate that
// CA signed.
func TestServerConfig(t *testing.T) {
	ca := testenv.NewCA(t, "ca")
	clients := testenv.NewCA(t, "clients")
	f := install(t, ca, t.TempDir(), "server")
	f.ClientCAFile = clients.File
	r, err := New(f)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", r.ServerConfig(nil))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	defer func() { ln.Close(); <-done }()
	handshake := func(cert *tls.Certificate) error {
		cfg := &tls.Config{RootCAs: ca.Pool, ServerName: "127.0.0.1"}
		if cert != nil {
			cfg.Certificates = []tls.Certificate{*cert}
		}
		c, err := tls.Dial("tcp", ln.Addr().String(), cfg)
		if err != nil {
			return err
		}
		defer c.Close()
		// TLS 1.3: the server's verdict on the client's certificate
		// arrives after the client's handshake completes.
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil
		}
		if err != nil && strings.Contains(err.Error(), "EOF") {
			return nil // accepted, then closed by the server
		}
		return err
	}
	if err := handshake(nil); err == nil || !strings.Contains(err.Error(), "certificate required") {
		t.Fatalf("without a client certificate: %v", err)
	}
	cc, ck := clients.Issue("prometheus")
	good, err := tls.LoadX509KeyPair(cc, ck)
	if err != nil {
		t.Fatal(err)
	}
	if err := handshake(&good); err != nil {
		t.Fatalf("with the clients' CA's certificate: %v", err)
	}
	sc, sk := ca.Issue("stranger")
	bad, _ := tls.LoadX509KeyPair(sc, sk)
	if err := handshake(&bad); err == nil {
		t.Fatal("a client certificate of another CA was accepted")
	}
}
