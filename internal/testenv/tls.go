package testenv

import (
	"crypto/tls"
	"net"
	"time"
)

// ClientHello returns the first flight crypto/tls sends as a client asking
// for serverName (its ClientHello records), as a real TLS client would
// send it to a proxy that routes by SNI.
func ClientHello(t Waiter, serverName string) []byte {
	t.Helper()
	a, b := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		tls.Client(b, &tls.Config{ServerName: serverName}).Handshake()
		b.Close()
	}()
	defer func() { a.Close(); <-done }()
	buf := make([]byte, 16<<10)
	a.SetDeadline(time.Now().Add(5 * time.Second))
	n, err := a.Read(buf)
	if err != nil {
		t.Fatalf("capturing a ClientHello: %v", err)
	}
	return buf[:n]
}
