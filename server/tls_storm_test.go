package server_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/server"
)

// Under a storm of TLS clients (full handshakes), of clients that send a
// handshake's first bytes and go, and with clients that connect and say
// nothing, a terminating listener (tls on the listener, and on a route)
// ends within drain_timeout plus a second, every time: removed by a
// reload, and at shutdown after a reload that gave it a new certificate,
// which the next client is served. The silent clients' handshakes would
// hold it for sni_timeout (longer) if shutdown did not cut them.
func TestTLSTerminationUnderStorm(t *testing.T) {
	cs := &certs{t: t, ca: testenv.NewCA(t, "ca"), dir: t.TempDir()}
	const host = "a.example.com"
	target := testenv.StartBackend(t, "hi").Addr
	const drain = 500 * time.Millisecond
	busyListener := func(routed bool, cert config.CertFiles) config.Listener {
		l := tlsListener("busy", target, config.TLSServer{Certs: []config.CertFiles{cert}})
		l.SNITimeout = 5 * time.Second
		l.DrainTimeout = drain
		if routed {
			l.TLS = nil
			l.Discovery, l.Static = "", nil
			r := config.Route{Name: "a", SNI: []string{host}, Pool: config.DefaultPool(), TLS: &config.TLSServer{Certs: []config.CertFiles{cert}}}
			r.Discovery, r.Static = "static", config.Statics(target)
			l.Routes = []config.Route{r}
		}
		return l
	}
	for trial := range 8 {
		routed, removed := trial%2 == 1, trial%4 < 2
		cert := cs.install("first", host)
		keep := fastListener("keep", target)
		cfg := config.Default()
		cfg.Admin.Listen = ""
		cfg.Listeners = []config.Listener{keep, busyListener(routed, cert)}
		srv, err := server.Start(context.Background(), cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		addr := proxyAddr(t, srv, "busy")
		testenv.Eventually(t, "the target up", 10*time.Second, func() bool { return liveCount(srv, "busy") == 1 })
		clientCfg := &tls.Config{ServerName: host, RootCAs: cs.ca.Pool}
		storm := testenv.StartTLSStorm(addr, 6, clientCfg)
		broken := testenv.StartStorm(addr, 2, []byte{0x16, 0x03, 0x01})
		var silent []net.Conn
		for range 16 {
			if c, err := net.Dial("tcp", addr); err == nil {
				silent = append(silent, c)
			}
		}
		testenv.Eventually(t, "the storms under way", 20*time.Second, func() bool {
			return storm.Served() > 50 && broken.Attempts() > 50
		})

		began := time.Now()
		next := config.Default()
		next.Admin.Listen = ""
		next.Listeners = []config.Listener{keep}
		var renewed config.CertFiles
		if !removed {
			// New files, as a renewal under a new name would bring.
			renewed = cs.install("second", host)
			next.Listeners = append(next.Listeners, busyListener(routed, renewed))
		}
		if err := srv.Reload(context.Background(), next); err != nil {
			t.Fatal(err)
		}
		if !removed {
			c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, clientCfg)
			if err != nil {
				t.Fatalf("trial %d: after the reload: %v", trial, err)
			}
			got := c.ConnectionState().PeerCertificates[0].Raw
			c.SetDeadline(time.Now().Add(5 * time.Second))
			io.WriteString(c, "hello\n")
			b, _ := io.ReadAll(c)
			c.Close()
			if !bytes.Equal(got, certDER(t, renewed.CertFile)) || string(b) != "hi" {
				t.Fatalf("trial %d: after the reload: answered %q, with the renewed certificate: %v", trial, b, bytes.Equal(got, certDER(t, renewed.CertFile)))
			}
			began = time.Now()
		}
		err = shutdownBy(srv, proxyAddr(t, srv, "keep"), began.Add(drain+time.Second))
		switch took := time.Since(began); {
		case errors.Is(err, errNotEnded) || took > drain+time.Second:
			t.Errorf("trial %d (routed %v, removed %v): ended %v after the reload or shutdown, want within %v + 1s under a TLS storm", trial, routed, removed, took, drain)
		case err != nil && removed:
			t.Errorf("trial %d: %v", trial, err)
		case err != nil:
			// The kept listener's silent clients were cut at its drain timeout.
			t.Logf("trial %d: %v", trial, err)
		}
		storm.Stop()
		broken.Stop()
		for _, c := range silent {
			c.Close()
		}
		if t.Failed() {
			return
		}
	}
}

// certDER is the first certificate in a PEM file.
func certDER(t *testing.T, file string) []byte {
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM", file)
	}
	return blk.Bytes
}
