package server_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/server"

	"github.com/rota-proxy/rota/internal/testenv"
)

// tlsBackend is a real TLS server with a self-signed certificate of its
// own for its names: it answers every handshake with its name. What rota
// forwards must reach it unchanged for the handshake to succeed at all.
type tlsBackend struct {
	name string
	addr string
	cert *x509.Certificate
	pool *x509.CertPool
	pem  []byte
	ln   net.Listener
	wg   sync.WaitGroup
	hits atomic.Int64
}

func startTLSBackend(t *testing.T, name string, dnsNames ...string) *tlsBackend {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name + " backend"},
		DNSNames:     dnsNames,
		NotBefore:    time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	b := &tlsBackend{name: name, cert: cert, pool: x509.NewCertPool(),
		pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
	b.pool.AddCert(cert)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
	})
	if err != nil {
		t.Fatal(err)
	}
	b.ln, b.addr = ln, ln.Addr().String()
	b.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.wg.Go(func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				if err := c.(*tls.Conn).Handshake(); err != nil {
					return
				}
				b.hits.Add(1)
				io.WriteString(c, b.name)
				c.(*tls.Conn).CloseWrite()
				io.Copy(io.Discard, c)
			})
		}
	})
	t.Cleanup(func() { ln.Close(); b.wg.Wait() })
	return b
}

// tlsGet connects through addr asking for serverName and returns the
// answer and the certificate the server presented. roots verify it (nil:
// not verified).
func tlsGet(addr, serverName string, roots *x509.CertPool, wrap func(net.Conn) net.Conn) (string, *x509.Certificate, error) {
	raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", nil, err
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	var conn net.Conn = raw
	if wrap != nil {
		conn = wrap(raw)
	}
	c := tls.Client(conn, &tls.Config{ServerName: serverName, RootCAs: roots, InsecureSkipVerify: roots == nil})
	if err := c.Handshake(); err != nil {
		return "", nil, err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return "", nil, err
	}
	return string(b), c.ConnectionState().PeerCertificates[0], nil
}

// byteByByte writes every byte of the client's stream on its own, so that
// the ClientHello reaches rota in many segments.
type byteByByte struct{ net.Conn }

func (c byteByByte) Write(b []byte) (int, error) {
	for i := range b {
		if _, err := c.Conn.Write(b[i : i+1]); err != nil {
			return i, err
		}
		time.Sleep(100 * time.Microsecond) // shapes segments; synchronises nothing
	}
	return len(b), nil
}

// recorder is a plain TCP backend that keeps every byte each connection
// sent it, answering "plain" once the client half-closes.
type recorder struct {
	addr string
	mu   sync.Mutex
	got  [][]byte
	wg   sync.WaitGroup
}

func startRecorder(t *testing.T) *recorder {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &recorder{addr: ln.Addr().String()}
	r.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			r.wg.Go(func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				b, _ := io.ReadAll(c)
				r.mu.Lock()
				r.got = append(r.got, b)
				r.mu.Unlock()
				io.WriteString(c, "plain")
			})
		}
	})
	t.Cleanup(func() { ln.Close(); r.wg.Wait() })
	return r
}

// received is what the connections that sent anything sent (health
// probes send nothing).
func (r *recorder) received() [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out [][]byte
	for _, b := range r.got {
		if len(b) > 0 {
			out = append(out, b)
		}
	}
	return out
}

func routedListener(name string, routes ...config.Route) config.Listener {
	l := fastListener(name)
	l.Discovery, l.Static = "", nil
	l.SNITimeout = 300 * time.Millisecond
	for i := range routes {
		if routes[i].Health.Interval == 0 {
			routes[i].Pool.Health = l.Health
		}
		if routes[i].Balance == "" {
			routes[i].Balance = config.BalanceRoundRobin
		}
	}
	l.Routes = routes
	return l
}

func staticRoute(name string, sni []string, addrs ...string) config.Route {
	return config.Route{Name: name, SNI: sni, Pool: config.Pool{Discovery: "static", Static: config.Statics(addrs...)}}
}

// rawExchange sends b, half-closes, and returns what comes back.
func rawExchange(addr string, b []byte) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(b); err != nil {
		return "", err
	}
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	return string(got), err
}

func TestSNIRoutesTLSPassthrough(t *testing.T) {
	api := startTLSBackend(t, "api", "api.example.com")
	wild := startTLSBackend(t, "wild", "*.example.com", "x.example.com", "a.b.example.com")
	other := startTLSBackend(t, "other", "other.org", "localhost")
	cfg := config.Default()
	cfg.Admin.Listen = ""
	edge := routedListener("edge",
		staticRoute("api", []string{"api.example.com"}, api.addr),
		staticRoute("wild", []string{"*.example.com"}, wild.addr),
		staticRoute("default", []string{"*"}, other.addr),
	)
	edge.SNITimeout = 5 * time.Second // a hello sent a byte at a time takes a while
	cfg.Listeners = []config.Listener{edge}
	srv := startServer(t, cfg)
	addr := proxyAddr(t, srv, "edge")
	testenv.Eventually(t, "every route live", 5*time.Second, func() bool {
		st := srv.Status()[0]
		for _, r := range st.Routes {
			if len(r.Targets) != 1 || r.Targets[0].Health.State.String() != "up" {
				return false
			}
		}
		return true
	})

	for _, tc := range []struct {
		sni  string
		want *tlsBackend
		wrap func(net.Conn) net.Conn
	}{
		{"api.example.com", api, nil},
		{"API.Example.COM", api, nil},
		{"x.example.com", wild, nil},
		{"a.b.example.com", wild, nil},
		{"other.org", other, nil},
		{"api.example.com", api, func(c net.Conn) net.Conn { return byteByByte{c} }},
	} {
		// The client verifies the backend's own certificate: rota read the
		// name and passed the handshake through untouched.
		got, cert, err := tlsGet(addr, tc.sni, tc.want.pool, tc.wrap)
		if err != nil || got != tc.want.name || !cert.Equal(tc.want.cert) {
			t.Fatalf("SNI %q (byte by byte: %v): got %q, %v; want %q with its own certificate", tc.sni, tc.wrap != nil, got, err, tc.want.name)
		}
	}
	// No SNI at all (an IP address is never sent as SNI): the "*" route.
	if got, cert, err := tlsGet(addr, "", nil, nil); err != nil || got != "other" || !cert.Equal(other.cert) {
		t.Fatalf("no SNI: %q, %v", got, err)
	}

	// openssl's client, as an operator would test it.
	if _, err := exec.LookPath("openssl"); err == nil {
		ca := filepath.Join(t.TempDir(), "api.pem")
		os.WriteFile(ca, api.pem, 0o600)
		cmd := exec.Command("openssl", "s_client", "-connect", addr, "-servername", "api.example.com",
			"-CAfile", ca, "-verify_return_error", "-verify_hostname", "api.example.com", "-ign_eof")
		cmd.Stdin = strings.NewReader("")
		out, err := cmd.CombinedOutput()
		if err != nil || !bytes.Contains(out, []byte("api backend")) || !bytes.Contains(out, []byte("Verify return code: 0 (ok)")) {
			t.Fatalf("openssl s_client -servername api.example.com: %v\n%s", err, out)
		}
	} else {
		t.Log("openssl not installed: the s_client case is skipped")
	}
	if n := api.hits.Load(); n < 3 {
		t.Fatalf("api backend saw %d handshakes", n)
	}
}

func TestSNIRouteEdgeCases(t *testing.T) {
	api := startTLSBackend(t, "api", "api.example.com")
	plain := startRecorder(t)
	cfg := config.Default()
	cfg.Admin.Listen = ""
	strict := routedListener("strict", staticRoute("api", []string{"api.example.com"}, api.addr))
	fallback := routedListener("fallback",
		staticRoute("api", []string{"api.example.com"}, api.addr),
		staticRoute("rest", []string{"*"}, plain.addr))
	cfg.Listeners = []config.Listener{strict, fallback}
	srv := startServer(t, cfg)
	strictAddr, fbAddr := proxyAddr(t, srv, "strict"), proxyAddr(t, srv, "fallback")
	testenv.Eventually(t, "targets live", 5*time.Second, func() bool { return liveCount(srv, "strict") == 1 && liveCount(srv, "fallback") == 2 })

	// No route for the name: closed, nothing dialled, counted.
	if _, _, err := tlsGet(strictAddr, "unknown.example.com", nil, nil); err == nil {
		t.Fatal("a name no route matches was served")
	}
	if got, _, err := tlsGet(strictAddr, "api.example.com", api.pool, nil); err != nil || got != "api" {
		t.Fatalf("strict listener, api: %q %v", got, err)
	}
	st := status(t, srv, "strict")
	if st.Count("no_route_conns", "") != 1 || st.Routes[0].Targets[0].Total.Load() != 1 {
		t.Fatalf("no_route = %d, api total = %d; want 1 and 1", st.Count("no_route_conns", ""), st.Routes[0].Targets[0].Total.Load())
	}

	// Non-TLS bytes on a routed port go to "*", unchanged.
	http := []byte("GET / HTTP/1.0\r\nHost: x\r\n\r\n")
	if got, err := rawExchange(fbAddr, http); err != nil || got != "plain" {
		t.Fatalf("non-TLS client: %q %v", got, err)
	}
	// An oversized ClientHello (its length says 20 KiB) is no hello rota
	// can read: routed as no SNI, every byte forwarded.
	big := append([]byte{22, 3, 1, 0x40, 0x00, 1, 0, 0x50, 0x00}, bytes.Repeat([]byte{7}, 16<<10)...)
	if got, err := rawExchange(fbAddr, big); err != nil || got != "plain" {
		t.Fatalf("oversized hello: %q %v", got, err)
	}
	// A truncated ClientHello: the client sends half and waits; after
	// sni_timeout it is routed as no SNI, the half forwarded.
	hello := testenv.ClientHello(t, "api.example.com")
	half := hello[:len(hello)/2]
	c, err := net.Dial("tcp", fbAddr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	start := time.Now()
	c.Write(half)
	testenv.Eventually(t, "the half hello routed after sni_timeout", 5*time.Second, func() bool { return status(t, srv, "fallback").Routes[1].Targets[0].Active.Load() == 1 })
	if waited := time.Since(start); waited < 300*time.Millisecond {
		t.Fatalf("routed after %v, before sni_timeout (300ms)", waited)
	}
	c.(*net.TCPConn).CloseWrite()
	if got, err := io.ReadAll(c); err != nil || string(got) != "plain" {
		t.Fatalf("truncated hello: %q %v", got, err)
	}
	c.Close()
	// A client that closes halfway through its hello is closed: nothing
	// is dialled for it.
	before := status(t, srv, "fallback").Routes[1].Targets[0].Total.Load()
	if got, err := rawExchange(fbAddr, half); err != nil || got != "" {
		t.Fatalf("hello cut by the client's FIN: %q %v, want a plain close", got, err)
	}
	testenv.Eventually(t, "recorder saw every exchange", 5*time.Second, func() bool { return len(plain.received()) == 3 })
	want := [][]byte{http, big, half}
	got := plain.received()
	for i := range want {
		found := false
		for _, g := range got {
			found = found || bytes.Equal(g, want[i])
		}
		if !found {
			t.Errorf("the target did not receive exchange %d unchanged (%d bytes)", i, len(want[i]))
		}
	}
	if after := status(t, srv, "fallback").Routes[1].Targets[0].Total.Load(); after != before {
		t.Fatalf("a client that left mid-hello was dialled: total %d -> %d", before, after)
	}
}

func status(t *testing.T, srv *server.Server, name string) server.ListenerStatus {
	t.Helper()
	for _, l := range srv.Status() {
		if l.Name == name {
			return l
		}
	}
	t.Fatalf("no listener %q", name)
	return server.ListenerStatus{}
}

func TestReloadRoutesUnderLoad(t *testing.T) {
	api := startTLSBackend(t, "api", "api.example.com")
	web := startTLSBackend(t, "web", "web.example.com")
	db := startTLSBackend(t, "db", "db.example.com")
	dir := t.TempDir()
	cfg := config.Default()
	cfg.Admin.Listen = ""
	cfg.File = filepath.Join(dir, "rota.yaml")
	l := routedListener("edge",
		staticRoute("api", []string{"api.example.com"}, api.addr),
		staticRoute("web", []string{"web.example.com"}, web.addr))
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	addr := proxyAddr(t, srv, "edge")
	testenv.Eventually(t, "targets live", 5*time.Second, func() bool { return liveCount(srv, "edge") == 2 })

	// TLS clients of the web route throughout.
	var ok, failed atomic.Int64
	var firstErr atomic.Pointer[string]
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 5000 {
				select {
				case <-stop:
					return
				default:
				}
				got, _, err := tlsGet(addr, "web.example.com", web.pool, nil)
				if err != nil || got != "web" {
					failed.Add(1)
					e := fmt.Sprint(got, err)
					firstErr.CompareAndSwap(nil, &e)
					continue
				}
				ok.Add(1)
			}
		})
	}
	var once sync.Once
	halt := func() { once.Do(func() { close(stop) }); wg.Wait() }
	defer halt()
	testenv.Eventually(t, "load running", 5*time.Second, func() bool { return ok.Load() > 20 })

	// Add db, remove api, keep web; twice over, and back.
	for i := range 4 {
		next := *cfg
		nl := l
		if i%2 == 0 {
			nl.Routes = []config.Route{l.Routes[1], staticRoute("db", []string{"db.example.com"}, db.addr)}
			nl.Routes[1].Pool.Health, nl.Routes[1].Balance = l.Health, config.BalanceRoundRobin
		}
		next.Listeners = []config.Listener{nl}
		mark := ok.Load()
		if err := srv.Reload(context.Background(), &next); err != nil {
			t.Fatal(err)
		}
		if i%2 == 0 {
			testenv.Eventually(t, "db routed", 5*time.Second, func() bool {
				got, _, err := tlsGet(addr, "db.example.com", db.pool, nil)
				return err == nil && got == "db"
			})
			if _, _, err := tlsGet(addr, "api.example.com", api.pool, nil); err == nil {
				t.Fatal("api still routed after its route was removed")
			}
		} else {
			testenv.Eventually(t, "api routed again", 5*time.Second, func() bool {
				got, _, err := tlsGet(addr, "api.example.com", api.pool, nil)
				return err == nil && got == "api"
			})
		}
		testenv.Eventually(t, "web served after the reload", 5*time.Second, func() bool { return ok.Load() > mark+20 })
	}
	halt()
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d of %d connections to the untouched route failed; first: %s", n, n+ok.Load(), *firstErr.Load())
	}
}

// dialFrom connects to addr from a loopback source address of the
// test's choosing (127.0.0.0/8 is all this machine's).
func dialFrom(src, addr string) (net.Conn, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	return d.Dial("tcp", addr)
}

func TestAllowDenyAndPerClientLimits(t *testing.T) {
	b := startBackend(t, "b")
	cfg := config.Default()
	cfg.Admin.Listen = ""
	l := fastListener("guarded", b.Addr)
	l.Listen = "127.0.0.1:0"
	l.Allow = prefixes(t, "127.0.0.0/24")
	l.Deny = prefixes(t, "127.0.0.5", "::ffff:127.0.0.3") // written IPv4-mapped, as dual-stack logs show it
	l.MaxConnsPerClient = 2
	pp := fastListener("behind-lb", b.Addr)
	pp.AcceptProxyProtocol = prefixes(t, "127.0.0.1")
	pp.Deny = prefixes(t, "10.0.0.0/8")
	cfg.Listeners = []config.Listener{l, pp}
	srv := startServer(t, cfg)
	addr, ppAddr := proxyAddr(t, srv, "guarded"), proxyAddr(t, srv, "behind-lb")
	testenv.Eventually(t, "backend live", 5*time.Second, func() bool { return liveCount(srv, "guarded") == 1 && liveCount(srv, "behind-lb") == 1 })

	ask := func(c net.Conn) (string, error) {
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "hello\n")
		c.(*net.TCPConn).CloseWrite()
		got, err := io.ReadAll(c)
		return string(got), err
	}
	served := func(src string) bool {
		c, err := dialFrom(src, addr)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := ask(c)
		return got != ""
	}
	if !served("127.0.0.2") {
		t.Fatal("127.0.0.2 (allowed) was refused")
	}
	if served("127.0.0.3") {
		t.Fatal("127.0.0.3 (denied) was served")
	}
	if served("127.0.1.2") {
		t.Fatal("127.0.1.2 (not in allow) was served")
	}

	// Two open connections from 127.0.0.2 are its limit; a third is closed
	// at once while 127.0.0.4 is still served. The first one's slot is
	// free only once the proxy has seen it end, which its client's close
	// does not wait for: wait for that, or the second held one is refused
	// in its place and the lingering first counted as held.
	testenv.Eventually(t, "the connections before ended", 5*time.Second, func() bool { return status(t, srv, "guarded").Count("active_conns", "") == 0 })
	var held []net.Conn
	for range 2 {
		c, err := dialFrom("127.0.0.2", addr)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	testenv.Eventually(t, "two connections held", 5*time.Second, func() bool { return status(t, srv, "guarded").Count("active_conns", "") == 2 })
	if n := status(t, srv, "guarded").Count("denied_conns", "per_client"); n != 0 {
		t.Fatalf("%d of the two connections held were refused (max_conns_per_client: 2)", n)
	}
	if served("127.0.0.2") {
		t.Fatal("a third connection from 127.0.0.2 was served (max_conns_per_client: 2)")
	}
	if !served("127.0.0.4") {
		t.Fatal("another client was refused while 127.0.0.2 was at its limit")
	}
	for _, c := range held {
		c.Close()
	}
	testenv.Eventually(t, "limit released", 5*time.Second, func() bool { return served("127.0.0.2") })

	st := status(t, srv, "guarded")
	if st.Count("denied_conns", "deny") != 1 || st.Count("denied_conns", "not_allowed") != 1 || st.Count("denied_conns", "per_client") < 1 {
		t.Fatalf("denied = %v; want deny 1, not_allowed 1, per_client >= 1", st.Counters)
	}
	if b.Hits.Load() == 0 {
		t.Fatal("the backend saw nobody")
	}

	// Behind a load balancer: the client is the address its PROXY header
	// names, not the balancer's socket.
	viaLB := func(client string) string {
		c, err := net.Dial("tcp", ppAddr)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(c, "PROXY TCP4 %s 127.0.0.1 40000 80\r\n", client)
		got, _ := ask(c)
		return got
	}
	if got := viaLB("192.168.7.7"); got == "" {
		t.Fatal("a client the header names as 192.168.7.7 was refused")
	}
	if got := viaLB("10.1.2.3"); got != "" {
		t.Fatalf("a client the header names as 10.1.2.3 (denied) was served: %q", got)
	}
	if n := status(t, srv, "behind-lb").Count("denied_conns", "deny"); n != 1 {
		t.Fatalf("behind-lb denied = %d, want 1", n)
	}
}

// The status (admin page, /api/v1/targets, metrics) is read while reloads
// change the routes' names and sources: every read sees one configuration
// or the next, never a half-written route (-race checks it).
func TestStatusReadsDuringReloads(t *testing.T) {
	b := startBackend(t, "b")
	cfg := config.Default()
	cfg.Listeners = []config.Listener{routedListener("edge",
		staticRoute("api", []string{"api.example.com"}, b.Addr),
		staticRoute("rest", []string{"*"}, b.Addr))}
	srv := startServer(t, cfg)
	stop := make(chan struct{})
	reads := make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				reads <- n
				return
			default:
			}
			for _, l := range srv.Status() {
				for _, r := range l.Routes {
					if len(r.SNI) == 0 || r.Service == "x" {
						t.Errorf("route %s read half-written: sni %v", r.Name, r.SNI)
					}
				}
			}
			n++
		}
	}()
	for i := range 40 {
		next := *cfg
		l := cfg.Listeners[0]
		l.Routes = []config.Route{staticRoute("api", []string{fmt.Sprintf("api%d.example.com", i)}, b.Addr),
			staticRoute("rest", []string{"*"}, b.Addr)}
		if i%2 == 1 {
			l.Routes[0].Pool.Static = config.Statics(b.Addr, "127.0.0.1:1")
		}
		l = routedListener("edge", l.Routes...)
		next.Listeners = []config.Listener{l}
		if err := srv.Reload(context.Background(), &next); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	if n := <-reads; n == 0 {
		t.Fatal("no status read ran during the reloads")
	}
}
