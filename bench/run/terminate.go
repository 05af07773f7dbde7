package main

// TLS termination: each proxy holds the certificate (ECDSA P-256) and
// speaks TLS 1.3 to the client, plaintext to a backend that answers "ok"
// at once; rota `tls:`, HAProxy `bind ... ssl crt`, nginx `stream` with
// `listen ... ssl`; direct is a Go TLS server answering the same. One
// thread each. Full handshakes (no resumption), then resumed ones (each
// client keeps its session ticket).

import (
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
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// runOKBackends is the child mode -ok-backend-mode: two plain TCP
// servers, one that writes "ok" to each connection and closes it, and a
// sink that reads until the client's end of stream, then writes "ok". It
// prints their ports, then "ready".
func runOKBackends() error {
	for _, sink := range []bool{false, true} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
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
					if sink {
						io.Copy(io.Discard, c)
					}
					io.WriteString(c, "ok")
					c.Close()
				}()
			}
		}()
	}
	fmt.Println("ready")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	return nil
}

// termCert writes a self-signed ECDSA P-256 certificate for sniNames[0]
// into dir: cert.pem, key.pem, and both in one file (HAProxy's crt).
func termCert(dir string) (cert, keyFile, both string, err error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", "", err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: sniNames[0]}, DNSNames: []string{sniNames[0]},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		return "", "", "", err
	}
	kd, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return "", "", "", err
	}
	cp := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	kp := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd})
	cert, keyFile, both = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "both.pem")
	for f, b := range map[string][]byte{cert: cp, keyFile: kp, both: append(append([]byte{}, cp...), kp...)} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			return "", "", "", err
		}
	}
	return cert, keyFile, both, nil
}

// startTermProxy starts kind terminating TLS with the certificate and
// sending the plaintext to backend, one thread; direct is tlsDirect.
// With sink, backend is the sink, and readiness is a write through to it.
func startTermProxy(kind, backend, tlsDirect, cert, keyFile, both string, sink bool, o *options) (*proc, error) {
	if kind == "direct" {
		return &proc{name: kind, addr: tlsDirect, pidFn: func() []int { return nil }}, nil
	}
	p := newProc(kind, "term", freePort(), o)
	var b strings.Builder
	var err error
	switch kind {
	case "rota", "baseline":
		fmt.Fprintf(&b, "admin: {listen: \"\"}\nlisteners:\n  - listen: %q\n    discovery: static\n    static: [%s]\n    health: {interval: 2s}\n", p.addr, backend)
		fmt.Fprintf(&b, "    tls: {certs: [{cert_file: %q, key_file: %q}]}\n", cert, keyFile)
		err = startRota(p, o.binFor(kind), b.String(), 1)
	case "haproxy":
		b.WriteString("global\n  nbthread 1\n  maxconn 7000\n  tune.maxaccept 64\n  ssl-default-bind-options ssl-min-ver TLSv1.2\n")
		b.WriteString("defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n")
		fmt.Fprintf(&b, "frontend fe\n  bind %s ssl crt %s\n  default_backend be\n", p.addr, both)
		fmt.Fprintf(&b, "backend be\n  server a %s check inter 2s\n", backend)
		err = startHAProxy(p, b.String())
	case "nginx":
		b.WriteString(nginxHead(p, 1))
		fmt.Fprintf(&b, "  upstream be { server %s; }\n", backend)
		fmt.Fprintf(&b, "  server { listen %s ssl reuseport; ssl_certificate %s; ssl_certificate_key %s; ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:S:10m; proxy_pass be; proxy_connect_timeout 2s; proxy_timeout 1h; proxy_half_close on; }\n}\n", p.addr, cert, keyFile)
		err = startNginx(p, b.String())
	default:
		return nil, fmt.Errorf("no TLS termination for %q", kind)
	}
	if err != nil {
		return nil, err
	}
	once := func() error { return tlsOnce(p.addr, nil) }
	if sink {
		once = func() error { return sinkOnce(p.addr) }
	}
	if err := waitServing(p, kind, "no TLS handshake with it", once); err != nil {
		return nil, err
	}
	return p, nil
}

// benchTerm measures TLS termination: handshakes a second, p99 and the
// proxy's CPU per handshake, full and resumed, through each proxy,
// interleaved over the repetitions.
func benchTerm(o *options, res results) error {
	plain, err := startBackendChild("-ok-backend-mode")
	if err != nil {
		return err
	}
	defer plain.stop()
	direct, err := tlsBackends()
	if err != nil {
		return err
	}
	defer direct.stop()
	dir := filepath.Join(o.tmp, "term-cert")
	os.MkdirAll(dir, 0o755)
	cert, keyFile, both, err := termCert(dir)
	if err != nil {
		return err
	}
	for rep := range o.reps {
		order := rotated(o.proxies, rep)
		for _, px := range order {
			logf("TLS termination, rep %d: %s", rep+1, px)
			p, err := startTermProxy(px, plain.addrs[0], direct.addrs[0], cert, keyFile, both, false, o)
			if err != nil {
				logf("  %v", err)
				continue
			}
			if px != "direct" {
				// Bulk: one connection into the sink through another
				// instance of the proxy.
				bp, err := startTermProxy(px, plain.addrs[1], direct.addrs[0], cert, keyFile, both, true, o)
				if err == nil {
					if gbps, err := tlsBulk(bp.addr, o.dur); err == nil {
						res.add(key("termbulk", px), gbps)
					} else {
						logf("  bulk: %v", err)
					}
					bp.stop()
				} else {
					logf("  bulk: %v", err)
				}
			}
			for _, mode := range []string{"full", "resume"} {
				pre := "term"
				if mode == "resume" {
					pre = "termr"
				}
				cpu0 := p.cpu()
				r, err := tlsClient(p.addr, o.dur, 32, mode)
				if err != nil {
					logf("  %v", err)
					continue
				}
				res.add(key(pre+"_rps", px), r.RPS)
				res.add(key(pre+"_p99", px), r.P99)
				if px != "direct" && r.N > 0 {
					res.add(key(pre+"_cpu", px), (p.cpu()-cpu0)*1e6/r.N)
				}
			}
			p.stop()
		}
	}
	return nil
}

// termClientConfig is the load client's TLS configuration: TLS 1.3, and
// with resume a session cache of its own (one per client loop).
func termClientConfig(resume bool) *tls.Config {
	c := &tls.Config{ServerName: sniNames[0], InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
	if resume {
		c.ClientSessionCache = tls.NewLRUClientSessionCache(1)
	}
	return c
}

// runTLSBulk is the child mode -tls-bulk-mode ADDR SECONDS: one TLS 1.3
// connection writing 256 KiB chunks for SECONDS, then its end of stream;
// once the sink answers, it prints the rate in Gbit/s.
func runTLSBulk(addr string, secs int) error {
	raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer raw.Close()
	c := tls.Client(raw, termClientConfig(false))
	if err := c.Handshake(); err != nil {
		return err
	}
	return writeFor(c, secs, c.CloseWrite)
}

// writeFor writes 256 KiB chunks to c for secs seconds, ends its stream
// with closeWrite, waits for the sink's "ok" and prints the rate in
// Gbit/s.
func writeFor(c net.Conn, secs int, closeWrite func() error) error {
	buf := make([]byte, 256<<10)
	rand.Read(buf)
	start := time.Now()
	stop := start.Add(time.Duration(secs) * time.Second)
	var n int64
	for time.Now().Before(stop) {
		w, err := c.Write(buf)
		n += int64(w)
		if err != nil {
			return err
		}
	}
	closeWrite()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "ok" {
		return fmt.Errorf("the sink's answer %q: %v", b, err)
	}
	fmt.Printf("%.3f\n", float64(n)*8/time.Since(start).Seconds()/1e9)
	return nil
}

// tlsBulk runs the TLS bulk client (one thread) and returns its Gbit/s.
func tlsBulk(addr string, d time.Duration) (float64, error) {
	return bulkChild("-tls-bulk-mode", addr, d)
}

// sinkOnce writes a byte through addr to the sink and waits for its "ok".
func sinkOnce(addr string) error {
	raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(5 * time.Second))
	c := tls.Client(raw, termClientConfig(false))
	if _, err := c.Write([]byte{0}); err != nil {
		return err
	}
	c.CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "ok" {
		return fmt.Errorf("sink: %q, %v", b, err)
	}
	return nil
}
