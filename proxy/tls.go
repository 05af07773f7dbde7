package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/internal/certfile"
	"github.com/rota-proxy/rota/proxy/internal/relay"
)

// TLS termination is a route's (a listener's own tls is one route that
// takes every client): the prelude reads the ClientHello, the route's
// handshake starts from it (terminateRoute), and a client that fails it
// (no or a wrong certificate, no common version or cipher, not TLS at
// all) costs no target dial. The relay then reads and writes the client
// through TLS: the machine sees the plaintext, as it would a client's
// bytes. Listeners that terminate or originate are served by the
// portable driver.

// speaksTLS reports whether the proxy terminates TLS or originates it to
// some targets, as configured when Serve starts.
func (p *Proxy) speaksTLS() bool {
	set := p.settings.Load()
	return set != nil && set.router.Originates()
}

// TLSReason is why a handshake failed: the label of
// rota_tls_handshake_errors_total.
type TLSReason uint8

// The reasons, in the order TLSReasons lists them.
const (
	TLSNotTLS         TLSReason = iota // the client did not speak TLS
	TLSVersion                         // no version both support
	TLSNoCipher                        // no cipher suite or curve both support
	TLSNoCertificate                   // a client certificate was required and none given
	TLSBadCertificate                  // the client's certificate did not verify
	TLSTimeout                         // not done within sni_timeout
	TLSClosed                          // the client closed or reset during it
	TLSOther                           // anything else
	numTLSReasons
)

var tlsReasonNames = [numTLSReasons]string{"not_tls", "version", "no_cipher", "no_certificate", "bad_certificate", "timeout", "closed", "other"}

func (r TLSReason) String() string { return tlsReasonNames[r] }

// TLSReasons lists the reasons a handshake fails.
func TLSReasons() []TLSReason {
	out := make([]TLSReason, numTLSReasons)
	for i := range out {
		out[i] = TLSReason(i)
	}
	return out
}

// tlsReason classifies a failed server handshake's error.
func tlsReason(err error) TLSReason {
	var rh tls.RecordHeaderError
	var cv *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	msg := err.Error()
	switch {
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded):
		return TLSTimeout
	case errors.As(err, &rh):
		return TLSNotTLS
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		strings.Contains(msg, "connection reset"):
		return TLSClosed
	case strings.Contains(msg, "client didn't provide a certificate"):
		return TLSNoCertificate
	case errors.As(err, &cv) || errors.As(err, &ua) || strings.Contains(msg, "bad certificate") ||
		strings.Contains(msg, "failed to verify certificate"):
		return TLSBadCertificate
	case strings.Contains(msg, "protocol version") || strings.Contains(msg, "unsupported versions"):
		return TLSVersion
	case strings.Contains(msg, "no cipher suite") || strings.Contains(msg, "no ECDHE curve") || strings.Contains(msg, "no mutually supported"):
		return TLSNoCipher
	}
	return TLSOther
}

// tlsStats counts failed handshakes by reason.
type tlsStats [numTLSReasons]atomic.Uint64

// terminated is a TLS connection to a target once its handshake
// completed (origination). Close closes the socket at
// once, as an abort must (tls.Conn's Close would first try to send
// close_notify, for up to 5 s); the clean end of a direction is
// CloseWrite, which sends it.
type terminated struct {
	*tls.Conn
	raw net.Conn
}

func (t terminated) Close() error { return t.raw.Close() }

// tcpOf is the TCP socket under c, nil when there is none.
func tcpOf(c net.Conn) *net.TCPConn {
	switch t := c.(type) {
	case terminated:
		c = t.raw
	case *routedConn:
		c = t.Conn
	}
	tc, _ := c.(*net.TCPConn)
	return tc
}

// tlsInfo is what the access log says of a terminated handshake.
func tlsInfo(cs tls.ConnectionState) *accesslog.TLSInfo {
	ti := &accesslog.TLSInfo{Cipher: tls.CipherSuiteName(cs.CipherSuite), ALPN: cs.NegotiatedProtocol}
	ti.Version = strings.TrimPrefix(tls.VersionName(cs.Version), "TLS ")
	if len(cs.PeerCertificates) > 0 {
		ti.ClientCert = cs.PeerCertificates[0].Subject.String()
	}
	return ti
}

// originate completes a TLS handshake with the target c dialled for route
// (a failure is the dial's: retried on the next target), within ctx.
func originate(ctx context.Context, c net.Conn, cfg *tls.Config, addr string) (net.Conn, error) {
	tc := tls.Client(c, certfile.ForHost(cfg, addr))
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		if strings.Contains(err.Error(), "remote error: tls: bad certificate") {
			return nil, fmt.Errorf("tls handshake with %s: the target refused rota's certificate (under Consul Connect: denied by intention): %w", addr, err)
		}
		return nil, fmt.Errorf("tls handshake with %s: %w", addr, err)
	}
	return terminated{Conn: tc, raw: c}, nil
}

// routedConn is a client of a routed listener some of whose routes
// terminate TLS: plain until its route's handshake is done (a route that
// passes TLS through reads and writes the socket), then read and written
// through TLS. Deadlines and Close are the socket's, as terminated's.
type routedConn struct {
	net.Conn // the socket
	tls      atomic.Pointer[tls.Conn]
}

func (c *routedConn) Read(b []byte) (int, error) {
	if t := c.tls.Load(); t != nil {
		return t.Read(b)
	}
	return c.Conn.Read(b)
}

func (c *routedConn) Write(b []byte) (int, error) {
	if t := c.tls.Load(); t != nil {
		return t.Write(b)
	}
	return c.Conn.Write(b)
}

func (c *routedConn) CloseWrite() error {
	if t := c.tls.Load(); t != nil {
		return t.CloseWrite()
	}
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// prefixed reads prefix before the connection: the ClientHello the
// routing read, replayed to the handshake.
type prefixed struct {
	net.Conn
	prefix []byte
}

func (p *prefixed) Read(b []byte) (int, error) {
	if len(p.prefix) > 0 {
		n := copy(b, p.prefix)
		p.prefix = p.prefix[n:]
		return n, nil
	}
	return p.Conn.Read(b)
}

// terminateRoute completes the TLS handshake of a client whose route
// terminates it, from the ClientHello the routing read on, within
// sni_timeout; false when it failed (the connection ended, counted). A
// client that sent no complete ClientHello within sni_timeout has failed
// already: the routing waited that long for it.
func (g *gconn) terminateRoute(cfg *tls.Config) bool {
	rc, ok := g.client.(*routedConn)
	if !ok { // relayWithGoroutines wraps every client of such a router
		g.ending(accesslog.TLSHandshake, errors.New("a terminating route on a listener not set up for it"))
		return false
	}
	var held []byte
	var helloErr error
	g.locked(func() relay.Action { held, helloErr = g.m.TakeHeld(), g.m.HelloErr(); return relay.Continue })
	if errors.Is(helloErr, relay.ErrHelloLate) {
		// sni_timeout passed waiting for the ClientHello: the time the
		// handshake had is spent.
		g.p.Stats.TLSErrors[TLSTimeout].Add(1)
		g.ending(accesslog.TLSHandshake, helloErr)
		return false
	}
	tc := tls.Server(&prefixed{Conn: rc.Conn, prefix: held}, cfg)
	timeout := g.set.relay.SNITimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(g.ctx, timeout)
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		g.p.Stats.TLSErrors[tlsReason(err)].Add(1)
		g.ending(accesslog.TLSHandshake, err)
		return false
	}
	rc.tls.Store(tc)
	g.tls = tlsInfo(tc.ConnectionState())
	return true
}
