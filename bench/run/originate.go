package main

// TLS origination: plaintext clients, the proxy speaking TLS to the
// backends (a Go TLS server that answers "ok" once its handshake is done,
// and a TLS sink for bulk); rota `target_tls:`, HAProxy `server ... ssl`,
// nginx `proxy_ssl on`. Each proxy resumes its TLS sessions with the
// backend as it does by default (rota's session cache, HAProxy's and
// nginx's session reuse); direct is a client doing the TLS itself, a full
// handshake each time. One thread each.

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// plainOnce makes one plain connection through addr and reads "ok".
func plainOnce(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 2)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "ok" {
		return fmt.Errorf("answer %q: %v", b, err)
	}
	return nil
}

// runTLSSink is a TLS server (in the -tls-backend-mode child) that reads
// until the client's end of stream, then answers "ok".
func runTLSSink(cert tls.Certificate) (int, error) {
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		return 0, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(io.Discard, c)
				io.WriteString(c, "ok")
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// startOrigProxy starts kind sending plaintext clients to backend over
// TLS, one thread; with sink, readiness is a write through to the sink.
func startOrigProxy(kind, backend string, sink bool, o *options) (*proc, error) {
	p := newProc(kind, "orig", freePort(), o)
	var b strings.Builder
	var err error
	switch kind {
	case "rota", "baseline":
		fmt.Fprintf(&b, "admin: {listen: \"\"}\nlisteners:\n  - listen: %q\n    discovery: static\n    static: [%s]\n    health: {interval: 2s}\n", p.addr, backend)
		b.WriteString("    target_tls: {insecure_skip_verify: true}\n")
		err = startRota(p, o.binFor(kind), b.String(), 1)
	case "haproxy":
		b.WriteString("global\n  nbthread 1\n  maxconn 7000\n  tune.maxaccept 64\n")
		b.WriteString("defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n")
		fmt.Fprintf(&b, "frontend fe\n  bind %s\n  default_backend be\n", p.addr)
		fmt.Fprintf(&b, "backend be\n  server a %s ssl verify none check inter 2s\n", backend)
		err = startHAProxy(p, b.String())
	case "nginx":
		b.WriteString(nginxHead(p, 1))
		fmt.Fprintf(&b, "  upstream be { server %s; }\n", backend)
		fmt.Fprintf(&b, "  server { listen %s reuseport; proxy_pass be; proxy_ssl on; proxy_ssl_session_reuse on; proxy_connect_timeout 2s; proxy_timeout 1h; proxy_half_close on; }\n}\n", p.addr)
		err = startNginx(p, b.String())
	default:
		return nil, fmt.Errorf("no TLS origination for %q", kind)
	}
	if err != nil {
		return nil, err
	}
	once := func() error { return plainOnce(p.addr) }
	if sink {
		once = func() error { return plainSinkOnce(p.addr) }
	}
	if err := waitServing(p, kind, "nothing through it to the TLS backend", once); err != nil {
		return nil, err
	}
	return p, nil
}

// plainSinkOnce writes a byte through addr to the sink and reads its "ok".
func plainSinkOnce(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	c.Write([]byte{0})
	c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "ok" {
		return fmt.Errorf("sink: %q, %v", b, err)
	}
	return nil
}

// benchOrig measures TLS origination through each proxy, interleaved.
func benchOrig(o *options, res results) error {
	bs, err := tlsBackends() // sniNames' servers, then the TLS sink
	if err != nil {
		return err
	}
	defer bs.stop()
	if len(bs.addrs) < 3 {
		return fmt.Errorf("TLS backends: %v, want the sink too", bs.addrs)
	}
	for rep := range o.reps {
		order := rotated(o.proxies, rep)
		for _, px := range order {
			logf("TLS origination, rep %d: %s", rep+1, px)
			if px == "direct" {
				// The client speaks TLS itself: a full handshake each.
				if r, err := tlsClient(bs.addrs[0], o.dur, 32, "full"); err == nil {
					res.add(key("orig_rps", px), r.RPS)
					res.add(key("orig_p99", px), r.P99)
				}
				continue
			}
			p, err := startOrigProxy(px, bs.addrs[0], false, o)
			if err != nil {
				logf("  %v", err)
				continue
			}
			cpu0 := p.cpu()
			if r, err := tlsClient(p.addr, o.dur, 32, "plain"); err == nil {
				res.add(key("orig_rps", px), r.RPS)
				res.add(key("orig_p99", px), r.P99)
				if r.N > 0 {
					res.add(key("orig_cpu", px), (p.cpu()-cpu0)*1e6/r.N)
				}
			} else {
				logf("  %v", err)
			}
			p.stop()
			bp, err := startOrigProxy(px, bs.addrs[2], true, o)
			if err != nil {
				logf("  bulk: %v", err)
				continue
			}
			if gbps, err := plainBulk(bp.addr, o.dur); err == nil {
				res.add(key("origbulk", px), gbps)
			} else {
				logf("  bulk: %v", err)
			}
			bp.stop()
		}
	}
	return nil
}

// runPlainBulk is the child mode -plain-bulk-mode ADDR SECONDS: one plain
// connection writing 256 KiB chunks for SECONDS, then its end of stream;
// once the sink answers, it prints the rate in Gbit/s.
func runPlainBulk(addr string, secs int) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	return writeFor(c, secs, c.(*net.TCPConn).CloseWrite)
}

// plainBulk runs the plain bulk client (one thread) and returns Gbit/s.
func plainBulk(addr string, d time.Duration) (float64, error) {
	return bulkChild("-plain-bulk-mode", addr, d)
}

// bulkChild runs a bulk client child mode (one thread) and returns the
// Gbit/s it prints.
func bulkChild(mode, addr string, d time.Duration) (float64, error) {
	self, err := os.Executable()
	if err != nil {
		return 0, err
	}
	cmd := exec.Command(self, mode, addr, strconv.Itoa(int(d.Seconds())))
	cmd.Env = append(os.Environ(), "GOMAXPROCS=1")
	out, err := cmd.Output()
	if err != nil {
		return 0, fmt.Errorf("bulk client %s: %w", mode, err)
	}
	return strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
}
