package server_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
)

// nativeBackend is a Connect-native instance of service name: it serves
// TLS with the agent's leaf certificate for name, requires the client's
// Connect certificate and asks the agent whether an intention allows it
// (as Consul's own Connect-native servers do), then answers like
// testenv.Backend: its label once it read the request.
// seen, if not nil, is set to the serial of each client certificate it
// accepts.
func nativeBackend(t *testing.T, c *api.Client, name, label string, seen *atomic.Pointer[string]) string {
	t.Helper()
	cfg := &tls.Config{
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			leaf, _, err := c.Agent().ConnectCALeaf(name, nil)
			if err != nil {
				return nil, err
			}
			cert, err := tls.X509KeyPair([]byte(leaf.CertPEM), []byte(leaf.PrivateKeyPEM))
			if err != nil {
				return nil, err
			}
			roots, _, err := c.Agent().ConnectCARoots(nil)
			if err != nil {
				return nil, err
			}
			pool := x509.NewCertPool()
			for _, r := range roots.Roots {
				pool.AppendCertsFromPEM([]byte(r.RootCertPEM))
			}
			return &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool,
				VerifyConnection: func(cs tls.ConnectionState) error {
					l := cs.PeerCertificates[0]
					if len(l.URIs) == 0 {
						return errors.New("no SPIFFE ID")
					}
					a, err := c.Agent().ConnectAuthorize(&api.AgentAuthorizeParams{Target: name, ClientCertURI: l.URIs[0].String(),
						ClientCertSerial: colonHex(l.SerialNumber.Bytes())})
					if err != nil {
						return err
					}
					if !a.Authorized {
						return errors.New("denied: " + a.Reason)
					}
					if seen != nil {
						serial := colonHex(l.SerialNumber.Bytes())
						seen.Store(&serial)
					}
					return nil
				}}, nil
		},
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer conn.Close()
				conn.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := conn.Read(make([]byte, 64)); err != nil {
					return // a TCP health check, or a refused handshake
				}
				io.WriteString(conn, label)
			})
		}
	})
	return ln.Addr().String()
}

// ask is testenv.Request without the half-close: Consul's built-in
// sidecar proxy ends both directions at the first end of stream, so a
// client that half-closes after its request may lose the answer there.
func ask(addr string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "hello\n"); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	if err == nil && len(b) == 0 {
		err = errors.New("empty answer")
	}
	return string(b), err
}

func colonHex(b []byte) string {
	parts := make([]string, len(b))
	for i, x := range b {
		parts[i] = fmt.Sprintf("%02x", x)
	}
	return strings.Join(parts, ":")
}

// Consul Connect on a real agent (consul agent -dev): a service with one
// instance behind the consul binary's own sidecar proxy (consul connect
// proxy -sidecar-for) and one Connect-native; rota, as "rota", routes to
// both with mTLS. An intention denying rota refuses it (a failed connect
// that says why), allowing it again restores; a CA root rotation is
// followed, rota's leaf re-issued, without a restart or a failed client.
func TestConsulConnect(t *testing.T) {
	agent := testenv.StartConsul(t)
	c := agent.Client(t)

	app := testenv.StartBackend(t, "sidecar")
	host, port, _ := net.SplitHostPort(app.Addr)
	appPort, _ := strconv.Atoi(port)
	sidecar := testenv.FreeAddr(t)
	_, sp, _ := net.SplitHostPort(sidecar)
	sidecarPort, _ := strconv.Atoi(sp)
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "web-1", Name: "web", Address: host, Port: appPort,
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{Port: sidecarPort,
			Checks: api.AgentServiceChecks{{Name: "sidecar listening", TCP: sidecar, Interval: "1s"}}}}}); err != nil {
		t.Fatal(err)
	}
	var proxyOut bytes.Buffer
	proxy := exec.Command(testenv.ConsulBinary(t), "connect", "proxy", "-sidecar-for", "web-1", "-http-addr", agent.Addr())
	proxy.Stdout, proxy.Stderr = &proxyOut, &proxyOut
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Process.Kill(); proxy.Wait() })

	var clientSerial atomic.Pointer[string]
	native := nativeBackend(t, c, "web", "native", &clientSerial)
	nh, np, _ := net.SplitHostPort(native)
	nativePort, _ := strconv.Atoi(np)
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "web-2", Name: "web", Address: nh, Port: nativePort,
		Connect: &api.AgentServiceConnect{Native: true}}); err != nil {
		t.Fatal(err)
	}

	cfg := config.Default()
	cfg.Admin.Listen = ""
	cfg.Registries.Consul = &config.Consul{Address: agent.Addr()}
	l := fastListener("web")
	l.Discovery, l.Static, l.Service, l.Connect = "consul", nil, "web", true
	l.Retries = 3
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	addr := proxyAddr(t, srv, "web")
	testenv.Eventually(t, "the sidecar and the native instance up", 30*time.Second, func() bool { return liveCount(srv, "web") == 2 })
	if tg, ok := findTarget(t, srv, "web", sidecar); !ok {
		t.Fatalf("the sidecar %s is not a target (%+v)", sidecar, tg)
	}
	seen := map[string]int{}
	testenv.Eventually(t, "both answer through Connect", 20*time.Second, func() bool {
		if got, err := ask(addr); err == nil {
			seen[got]++
		}
		return seen["sidecar"] > 0 && seen["native"] > 0
	})

	// An intention denies rota: refused at both, and the reason said.
	if _, err := c.Connect().IntentionUpsert(&api.Intention{SourceName: "rota", DestinationName: "web", Action: api.IntentionActionDeny}, nil); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "denied", 20*time.Second, func() bool {
		got, err := ask(addr)
		return err != nil || got == ""
	})
	for i := range 10 { // at both instances: every try of every client fails
		if got, err := ask(addr); err == nil {
			t.Fatalf("request %d after the deny answered %q", i, got)
		}
	}
	testenv.Eventually(t, "the denial explained", 10*time.Second, func() bool {
		return strings.Contains(targetStatus(t, srv, "web", native), "denied by intention") ||
			strings.Contains(targetStatus(t, srv, "web", sidecar), "denied by intention")
	})
	t.Logf("denied: %s", targetStatus(t, srv, "web", native))
	if _, err := c.Connect().IntentionDeleteExact("rota", "web", nil); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "allowed again", 30*time.Second, func() bool {
		got, err := ask(addr)
		return err == nil && (got == "sidecar" || got == "native")
	})

	// A CA root rotation, under load: followed without a failed client.
	leafSerial := func() string {
		leaf, _, err := c.Agent().ConnectCALeaf("rota", nil)
		if err != nil {
			t.Fatal(err)
		}
		return leaf.SerialNumber
	}
	before := leafSerial()
	testenv.Eventually(t, "both serve again", 30*time.Second, func() bool { return liveCount(srv, "web") == 2 })
	load := testenv.StartLoad(2, 1_000_000, func(int) (string, error) { return ask(addr) })
	defer load.Stop()
	if _, err := c.Connect().CASetConfig(&api.CAConfig{Provider: "consul", Config: map[string]any{"PrivateKeyType": "ec", "PrivateKeyBits": 384}}, nil); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "rota's leaf re-issued under the new root", 60*time.Second, func() bool { return leafSerial() != before })
	after := leafSerial()
	testenv.Eventually(t, "rota dialling with its new leaf", 30*time.Second, func() bool {
		p := clientSerial.Load()
		return p != nil && strings.EqualFold(*p, after)
	})
	okAt := load.OK.Load()
	testenv.Eventually(t, "100 more requests on the new leaf", 30*time.Second, func() bool { return load.OK.Load() >= okAt+100 })
	load.Stop()
	if load.Failed.Load() > 0 {
		t.Logf("native: %s; sidecar: %s\nsidecar proxy's log: %s", targetStatus(t, srv, "web", native), targetStatus(t, srv, "web", sidecar), testenv.Truncate(proxyOut.String(), 3000))
	}
	load.AssertNoFailures(t)
	t.Logf("%d requests through the CA rotation, none failed", load.OK.Load())
}
