package main

// TLS passthrough routed by SNI: rota with routes beside HAProxy's
// `mode tcp` + `tcp-request inspect-delay` + `req.ssl_sni`, one thread
// each. The client makes a full TLS handshake per connection through the
// proxy (no session resumption) and reads the backend's answer; so most
// of the CPU is the handshakes' (client and backend), and what the
// proxies differ in is reading the ClientHello, choosing, and relaying.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// sniNames are the server names the routes match; the client asks for the
// first.
var sniNames = [...]string{"api.example.com", "www.example.com"}

// runTLSBackends is the child mode -tls-backend-mode: one TLS server per
// name, each with a self-signed certificate of its own, answering "ok"
// after the handshake. It prints the ports, then "ready".
func runTLSBackends() error {
	var last tls.Certificate
	for _, name := range sniNames {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			return err
		}
		last = tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
		ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{last}})
		if err != nil {
			return err
		}
		fmt.Println(ln.Addr().(*net.TCPAddr).Port)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					c.SetDeadline(time.Now().Add(10 * time.Second))
					if c.(*tls.Conn).Handshake() == nil {
						io.WriteString(c, "ok")
					}
				}()
			}
		}()
	}
	// Last, a TLS sink (origination's bulk).
	port, err := runTLSSink(last)
	if err != nil {
		return err
	}
	fmt.Println(port)
	fmt.Println("ready")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	return nil
}

type tlsResult struct {
	RPS, P50, P99, N, Errors float64
}

// runTLSClient is the child mode -tls-client-mode ADDR SECONDS CONNS: CONNS
// loops of new TLS connections for SECONDS; it prints a tlsResult as JSON.
// With mode "resume" (termination) each loop resumes its TLS session.
func runTLSClient(addr string, secs, conns int, mode string) error {
	var n, errs atomic.Int64
	var mu sync.Mutex
	var lat []time.Duration
	stop := time.Now().Add(time.Duration(secs) * time.Second)
	var wg sync.WaitGroup
	for range conns {
		wg.Go(func() {
			var mine []time.Duration
			var cfg *tls.Config // passthrough: tlsOnce's
			if mode == "full" || mode == "resume" {
				cfg = termClientConfig(mode == "resume")
			}
			once := func() error { return tlsOnce(addr, cfg) }
			if mode == "plain" {
				once = func() error { return plainOnce(addr) }
			}
			for time.Now().Before(stop) {
				t0 := time.Now()
				if err := once(); err != nil {
					errs.Add(1)
					continue
				}
				mine = append(mine, time.Since(t0))
				n.Add(1)
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		})
	}
	wg.Wait()
	slices.Sort(lat)
	r := tlsResult{RPS: float64(n.Load()) / float64(secs), N: float64(n.Load()), Errors: float64(errs.Load())}
	if len(lat) > 0 {
		r.P50 = float64(lat[len(lat)/2].Microseconds()) / 1000
		r.P99 = float64(lat[len(lat)*99/100].Microseconds()) / 1000
	}
	return json.NewEncoder(os.Stdout).Encode(r)
}

// tlsOnce makes one TLS connection through addr with cfg (nil: a full
// handshake to sniNames[0]) and reads the answer.
func tlsOnce(addr string, cfg *tls.Config) error {
	raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(5 * time.Second))
	if cfg == nil {
		cfg = &tls.Config{ServerName: sniNames[0], InsecureSkipVerify: true}
	}
	c := tls.Client(raw, cfg)
	if err := c.Handshake(); err != nil {
		return err
	}
	b := make([]byte, 2)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "ok" {
		return fmt.Errorf("answer %q: %v", b, err)
	}
	return nil
}

// tlsBackends starts the TLS backends' child process.
func tlsBackends() (*backendSet, error) { return startBackendChild("-tls-backend-mode") }

// tlsClient runs the load client (one thread, like wrk -t1); mode is ""
// (passthrough), "full" or "resume" (termination).
func tlsClient(addr string, d time.Duration, conns int, mode string) (tlsResult, error) {
	self, err := os.Executable()
	if err != nil {
		return tlsResult{}, err
	}
	cmd := exec.Command(self, "-tls-client-mode", addr, strconv.Itoa(int(d.Seconds())), strconv.Itoa(conns), mode)
	cmd.Env = append(os.Environ(), "GOMAXPROCS=1")
	out, err := cmd.Output()
	if err != nil {
		return tlsResult{}, fmt.Errorf("TLS client: %w", err)
	}
	var r tlsResult
	if err := json.Unmarshal(out, &r); err != nil {
		return r, fmt.Errorf("TLS client: %w: %s", err, out)
	}
	if r.Errors > 0 {
		logf("  TLS client: %v failed connections", r.Errors)
	}
	return r, nil
}

// startSNIProxy starts kind routing sniNames[i] to backends[i], one
// thread. direct is the first backend itself; rota+plain and
// haproxy+plain pass everything to the first backend without reading the
// ClientHello (what routing costs is the difference).
func startSNIProxy(kind string, backends []string, o *options) (*proc, error) {
	if kind == "direct" {
		return &proc{name: kind, addr: backends[0], pidFn: func() []int { return nil }}, nil
	}
	p := newProc(kind, "sni", freePort(), o)
	var b strings.Builder
	var err error
	switch kind {
	case "rota+plain":
		fmt.Fprintf(&b, "admin: {listen: \"\"}\nlisteners:\n  - listen: %q\n    health: {interval: 2s}\n    discovery: static\n    static: [%s]\n", p.addr, backends[0])
		err = startRota(p, o.binFor("rota"), b.String(), 1)
	case "haproxy+plain":
		b.WriteString("global\n  nbthread 1\n  maxconn 7000\n  tune.maxaccept 64\n")
		b.WriteString("defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n  option splice-auto\n")
		fmt.Fprintf(&b, "frontend fe\n  bind %s\n  default_backend api\nbackend api\n  server a %s check inter 2s\n", p.addr, backends[0])
		err = startHAProxy(p, b.String())
	case "rota", "baseline":
		fmt.Fprintf(&b, "admin: {listen: \"\"}\nlisteners:\n  - listen: %q\n    health: {interval: 2s}\n    routes:\n", p.addr)
		fmt.Fprintf(&b, "      - {sni: [%s], discovery: static, static: [%s]}\n", sniNames[0], backends[0])
		fmt.Fprintf(&b, "      - {sni: [\"*\"], discovery: static, static: [%s]}\n", backends[1])
		err = startRota(p, o.binFor(kind), b.String(), 1)
	case "haproxy":
		b.WriteString("global\n  nbthread 1\n  maxconn 7000\n  tune.maxaccept 64\n")
		b.WriteString("defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n  option splice-auto\n")
		fmt.Fprintf(&b, "frontend fe\n  bind %s\n  tcp-request inspect-delay 5s\n  tcp-request content accept if { req_ssl_hello_type 1 }\n", p.addr)
		fmt.Fprintf(&b, "  use_backend api if { req.ssl_sni -i %s }\n  default_backend rest\n", sniNames[0])
		fmt.Fprintf(&b, "backend api\n  server a %s check inter 2s\nbackend rest\n  server b %s check inter 2s\n", backends[0], backends[1])
		err = startHAProxy(p, b.String())
	case "nginx":
		b.WriteString(nginxHead(p, 1))
		fmt.Fprintf(&b, "  map $ssl_preread_server_name $up { %s api; default rest; }\n", sniNames[0])
		fmt.Fprintf(&b, "  upstream api { server %s; }\n  upstream rest { server %s; }\n", backends[0], backends[1])
		fmt.Fprintf(&b, "  server { listen %s reuseport; ssl_preread on; proxy_pass $up; proxy_connect_timeout 2s; proxy_timeout 1h; }\n}\n", p.addr)
		err = startNginx(p, b.String())
	default:
		return nil, fmt.Errorf("no SNI routing for %q", kind)
	}
	if err != nil {
		return nil, err
	}
	// Ready once a handshake through it reaches the api backend.
	if err := waitServing(p, kind, "no TLS handshake through it", func() error { return tlsOnce(p.addr, nil) }); err != nil {
		return nil, err
	}
	return p, nil
}

// waitServing waits up to 30 s for once to succeed through p, the proxy
// kind just started; it stops p and says why when p exits or the time
// runs out (what: how).
func waitServing(p *proc, kind, what string, once func() error) error {
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		select {
		case err := <-p.waitCh:
			p.waitCh <- err
			log, _ := os.ReadFile(filepath.Join(p.dir, "proxy.log"))
			return fmt.Errorf("%s exited: %v\n%s", kind, err, log)
		default:
		}
		if once() == nil {
			return nil
		}
	}
	p.stop()
	return fmt.Errorf("%s: %s", kind, what)
}

// benchTLS measures new TLS connections per second and p99 through each
// proxy that routes by SNI, interleaved over the repetitions.
func benchTLS(o *options, res results) error {
	bs, err := tlsBackends()
	if err != nil {
		return err
	}
	defer bs.stop()
	kinds := o.proxies
	for rep := range o.reps {
		order := rotated(kinds, rep)
		for _, px := range order {
			logf("TLS passthrough by SNI, rep %d: %s", rep+1, px)
			p, err := startSNIProxy(px, bs.addrs, o)
			if err != nil {
				logf("  %v", err)
				continue
			}
			cpu0 := p.cpu()
			if r, err := tlsClient(p.addr, o.dur, 32, ""); err == nil {
				res.add(key("tls_rps", px), r.RPS)
				res.add(key("tls_p99", px), r.P99)
				if px != "direct" && r.N > 0 {
					res.add(key("tls_cpu", px), (p.cpu()-cpu0)*1e6/r.N)
				}
			} else {
				logf("  %v", err)
			}
			p.stop()
		}
	}
	return nil
}
