package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/internal/testenv"
)

// An embedded etcd off loopback is refused without TLS and client
// certificates. With them, `rota register` over TLS with a client
// certificate is routed, and a client without one is refused in the
// handshake: nobody else can write the registry that steers the traffic.
func TestEmbeddedEtcdOffLoopbackNeedsClientCertificates(t *testing.T) {
	dir := t.TempDir()
	etcdAddr, listen, admin := testenv.FreeAddr(t), testenv.FreeAddr(t), testenv.FreeAddr(t)
	_, etcdPort, _ := net.SplitHostPort(etcdAddr)
	// 0.0.0.0 is every interface: not loopback. (Only loopback is dialled.)
	cfg := func(scheme, embeddedTLS, etcdTLS string) string {
		clientURL := fmt.Sprintf("%s://0.0.0.0:%s", scheme, etcdPort)
		file := filepath.Join(dir, "rota.yaml")
		os.WriteFile(file, []byte(fmt.Sprintf(`admin: {listen: %s}
registries:
  etcd:
    embedded:
      data_dir: %s
      client_url: %s
%s%slisteners:
  - name: web
    listen: %s
    service: web
    discovery: etcd
    health: {interval: 100ms, rise: 1}
`, admin, filepath.Join(dir, "data"), clientURL, embeddedTLS, etcdTLS, listen)), 0o600)
		return file
	}

	code, _, stderr := runCLI("check", "--config", cfg("http", "", ""))
	if code != 1 || !strings.Contains(stderr, "rota.yaml:6:19: registries.etcd.embedded.client_url:") || !strings.Contains(stderr, "not a loopback address") {
		t.Fatalf("check of an open embedded etcd: exit %d\n%s", code, stderr)
	}

	serverCA, clientCA := testenv.NewCA(t, "etcd-server"), testenv.NewCA(t, "etcd-clients")
	srvCert, srvKey := serverCA.Issue("etcd", "127.0.0.1", "localhost")
	rotaCert, rotaKey := clientCA.Issue("rota")
	regCert, regKey := clientCA.Issue("registrant")
	file := cfg("https",
		fmt.Sprintf("      tls: {cert_file: %s, key_file: %s, client_ca_file: %s}\n", srvCert, srvKey, clientCA.File),
		fmt.Sprintf("    tls: {ca_file: %s, cert_file: %s, key_file: %s}\n", serverCA.File, rotaCert, rotaKey))
	if code, stdout, stderr := runCLI("check", "--config", file); code != 0 {
		t.Fatalf("check with TLS and client certificates: exit %d\n%s%s", code, stdout, stderr)
	}

	serve := startRota(t, "serve", "--config", file, "--log-format", "json")
	if _, ok := testenv.Poll(15*time.Second, func() bool {
		if _, exited := serve.wait(0); exited {
			return true
		}
		return strings.Contains(serve.stderr.String(), `"listening"`)
	}); !ok || !strings.Contains(serve.stderr.String(), `"listening"`) {
		// (Its ports were free when picked; another test's socket may
		// have taken one since: the log says.)
		t.Fatalf("rota serve never listened; it logged:\n%s", serve.stderr.String())
	}

	be := testenv.Greeter(t, "hi")
	endpoint := "https://" + etcdAddr
	startRota(t, "register", "--etcd", endpoint, "--etcd-ca", serverCA.File,
		"--etcd-cert", regCert, "--etcd-key", regKey, "--service", "web", "--addr", be)
	testenv.Eventually(t, "the registered instance routed", 15*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", listen, time.Second)
		if err != nil {
			return false
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Second))
		b, _ := io.ReadAll(c)
		return string(b) == "hi"
	})

	// A client that verifies the server but has no certificate of its own.
	tc := &tls.Config{RootCAs: serverCA.Pool}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, TLS: tc, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, "services/web/attacker", `{"Op":0,"Addr":"127.0.0.1:1"}`); err == nil {
		t.Fatal("a client without a certificate wrote the registry")
	}
	// And at the TLS layer: the server asks for a certificate and refuses
	// the handshake without one.
	conn, err := tls.Dial("tcp", etcdAddr, tc)
	if err == nil {
		conn.SetDeadline(time.Now().Add(2 * time.Second))
		_, err = conn.Read(make([]byte, 1)) // TLS 1.3: the refusal comes after the client's Finished
		conn.Close()
	}
	if err == nil || !strings.Contains(err.Error(), "certificate required") {
		t.Fatalf("handshake without a client certificate: %v; want the server's 'certificate required'", err)
	}
}
