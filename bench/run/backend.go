package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"google.golang.org/grpc"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// runBackends is the child-process mode: n HTTP servers on ephemeral
// ports of host (loopback unless told) answering a small fixed body with
// keep-alive. It prints the ports, one per line, then "ready", and serves
// until SIGTERM. kind "https" serves the same over TLS (a self-signed
// certificate: checks of them set insecure_skip_verify), "grpc" serves
// grpc.health.v1 (SERVING) instead, for bench/probe-cpu's check kinds.
func runBackends(n int, host, kind string) error {
	raiseNoFile()
	body := []byte("hello from the bench backend\n")
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body)
	})
	var tcfg *tls.Config
	if kind == "https" {
		cert, err := selfSigned(host)
		if err != nil {
			return err
		}
		tcfg = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	gs := grpc.NewServer()
	healthpb.RegisterHealthServer(gs, grpchealth.NewServer()) // SERVING
	for range n {
		ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			return err
		}
		fmt.Println(ln.Addr().(*net.TCPAddr).Port)
		switch kind {
		case "https":
			go http.Serve(tls.NewListener(ln, tcfg), h)
		case "grpc":
			go gs.Serve(ln)
		default:
			go http.Serve(ln, h)
		}
	}
	fmt.Println("ready")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	return nil
}

// raiseNoFile lifts the open-file limit to its hard maximum: the idle and
// concurrency scenarios hold thousands of sockets.
func raiseNoFile() {
	var l syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l) == nil && l.Cur < l.Max {
		l.Cur = l.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
	}
}

// selfSigned is a certificate for host (an IP) signed by its own key.
func selfSigned(host string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: host},
		IPAddresses: []net.IP{net.ParseIP(host)}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
