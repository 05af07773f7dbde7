package supervisor_test

import (
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/server"
	"github.com/rota-proxy/rota/supervisor"
)

// The admin API over TLS, with client certificates required: a client of
// the clients' CA (Prometheus, say) gets its answers with the token; one
// without a certificate, or speaking plain HTTP, gets nothing. The
// certificate file replaced on disk is served on the next handshake
// without a reload; replaced by something that does not load, the previous
// one stays and the log says why; a reload naming a missing file is
// refused.
func TestAdminOverTLS(t *testing.T) {
	be := testenv.StartBackend(t, "b")
	ca := testenv.NewCA(t, "admin-ca")
	clients := testenv.NewCA(t, "clients")
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "admin.pem"), filepath.Join(dir, "admin-key.pem")
	install := func(name string) {
		t.Helper()
		c, k := ca.Issue(name, "127.0.0.1")
		for src, dst := range map[string]string{c: certFile, k: keyFile} {
			b, _ := os.ReadFile(src)
			os.WriteFile(dst+".tmp", b, 0o600)
			if err := os.Rename(dst+".tmp", dst); err != nil {
				t.Fatal(err)
			}
		}
	}
	install("admin-1")
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte("s3cret\n"), 0o600)
	addr := testenv.FreeAddr(t)
	file := filepath.Join(dir, "rota.yaml")
	body := func(cert string) string {
		return fmt.Sprintf("admin: {listen: %q, token_file: %q, tls: {cert_file: %q, key_file: %q, client_ca_file: %q}}\n"+
			"listeners:\n  - {name: a, listen: \"127.0.0.1:0\", discovery: static, static: [%s]}\n",
			addr, token, cert, keyFile, clients.File, be.Addr)
	}
	os.WriteFile(file, []byte(body(certFile)), 0o600)
	cfg, err := config.Load(file)
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.InfoLevel)
	sigs := make(chan os.Signal, 2)
	ready := make(chan *server.Server, 1)
	done := make(chan error, 1)
	go func() {
		done <- supervisor.Run(supervisor.Options{Config: cfg, File: file, Signals: sigs, Logger: zap.New(core),
			Ready: func(s *server.Server) error { ready <- s; return nil }})
	}()
	<-ready
	defer func() {
		sigs <- syscall.SIGTERM
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	cc, ck := clients.Issue("prometheus")
	clientCert, err := tls.LoadX509KeyPair(cc, ck)
	if err != nil {
		t.Fatal(err)
	}
	// get asks for path on a new connection and says which certificate
	// the server presented.
	get := func(path string, cert *tls.Certificate) (status int, served string, err error) {
		tc := &tls.Config{RootCAs: ca.Pool}
		if cert != nil {
			tc.Certificates = []tls.Certificate{*cert}
		}
		tr := &http.Transport{TLSClientConfig: tc, DisableKeepAlives: true}
		defer tr.CloseIdleConnections()
		req, _ := http.NewRequest("GET", "https://"+addr+path, nil)
		req.Header.Set("Authorization", "Bearer s3cret")
		resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, resp.TLS.PeerCertificates[0].Subject.CommonName, nil
	}

	if code, cn, err := get("/api/v1/targets", &clientCert); err != nil || code != 200 || cn != "admin-1" {
		t.Fatalf("with a client certificate: %d from %q, %v", code, cn, err)
	}
	if _, _, err := get("/healthz", nil); err == nil {
		t.Fatal("answered a client without a certificate")
	}
	if resp, err := http.Get("http://" + addr + "/healthz"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == 200 {
			t.Fatal("answered plain HTTP")
		}
	}

	install("admin-2")
	testenv.Eventually(t, "the replaced certificate served", 5*time.Second, func() bool {
		_, cn, err := get("/healthz", &clientCert)
		return err == nil && cn == "admin-2"
	})

	os.WriteFile(certFile, []byte("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n"), 0o600)
	testenv.Eventually(t, "the broken file reported", 5*time.Second, func() bool {
		if _, _, err := get("/healthz", &clientCert); err != nil {
			t.Fatalf("a broken certificate file broke the admin API: %v", err)
		}
		return logs.FilterMessageSnippet("do not load").Len() == 1
	})
	if _, cn, err := get("/healthz", &clientCert); err != nil || cn != "admin-2" {
		t.Fatalf("after a broken file: %q, %v; want the previous certificate", cn, err)
	}

	install("admin-3")
	os.WriteFile(file, []byte(body(filepath.Join(dir, "missing.pem"))), 0o600)
	sigs <- syscall.SIGHUP
	testenv.Eventually(t, "the reload refused", 5*time.Second, func() bool {
		return logs.FilterMessageSnippet("reload").FilterFieldKey("error").Len() > 0
	})
	if msg := logs.FilterMessageSnippet("reload").FilterFieldKey("error").All()[0].ContextMap()["error"]; !strings.Contains(fmt.Sprint(msg), "missing.pem") {
		t.Fatalf("the refused reload's error %q does not name the file", msg)
	}
	testenv.Eventually(t, "admin-3 served", 5*time.Second, func() bool {
		_, cn, err := get("/healthz", &clientCert)
		return err == nil && cn == "admin-3"
	})
}
