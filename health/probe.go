package health

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// maxAnswer bounds what a probe reads of an answer (an http body searched
// for expect_body, what a send_expect step has received).
const maxAnswer = 64 << 10

// probe runs one check of target addr under spec s. The checker's TCP
// checks of IP addresses run on its event loop instead (probe_linux.go).
// It takes ownership of kept, the connection the target's last http or
// https probe left open (nil for none), and returns the one to keep for
// the next probe (nil for none), whatever the error.
func (c *Checker) probe(ctx context.Context, s *spec, addr string, kept *keptConn) (*keptConn, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	var err error
	switch {
	case s.cfg.Check == CheckNone:
	case c.probeFn != nil:
		err = c.probeFn(ctx, addr)
	case s.err != nil:
		err = fmt.Errorf("%s check: %w", s.cfg.Check, s.err)
	case s.cfg.Check == CheckHTTP || s.cfg.Check == CheckHTTPS:
		return probeHTTP(ctx, s, addr, kept)
	case s.cfg.Check == CheckTLS:
		err = probeTLS(ctx, s, addr)
	case s.cfg.Check == CheckSendExpect:
		err = probeSendExpect(ctx, s, addr)
	case s.cfg.Check == CheckGRPC:
		return probeGRPC(ctx, s, addr, kept)
	default:
		err = probeTCP(ctx, s.addr(addr))
	}
	if kept != nil {
		kept.close()
	}
	return nil, err
}

// probeTCP connects and closes with a reset, as HAProxy's checks do: the
// handshake is the answer, and a reset spares both ends the FIN exchange
// and the prober a TIME_WAIT socket per probe (10,000 targets every 2 s
// are 5,000 connections a second). No keep-alive is set on a socket that
// lives a round trip.
func probeTCP(ctx context.Context, addr string) error {
	d := net.Dialer{KeepAlive: -1}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("tcp check: %w", unwrapOp(err))
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	return conn.Close()
}

// probeHTTP asks GET path of the target (http or https) and judges the
// status and, with expect_body, the body's first maxAnswer bytes. It
// writes the request and reads the answer with the standard library's
// HTTP/1.1 parser but no client transport: at 10,000 targets every 2 s,
// net/http's client (a connection's reader and writer goroutines, its
// pool) cost a whole core; this, a fraction.
//
// A target that passed keeps its connection for its next probe (HTTP/1.1
// keep-alive, as Envoy's checks do by default), which spares a connect, a
// TLS handshake and a close a probe. It takes ownership of kept and
// returns the connection to keep (nil: none). A kept connection the
// server has closed meanwhile costs a new one, at once; any failure, and
// a dial the proxy reports failed, close it, so a target that is down is
// always asked on a new connection.
func probeHTTP(ctx context.Context, s *spec, addr string, kept *keptConn) (*keptConn, error) {
	if kept != nil {
		kc, err, stale := exchangeHTTP(ctx, s, addr, kept, true)
		if !stale {
			return kc, err
		}
	}
	kc, err := dialHTTP(ctx, s, addr)
	if err != nil {
		return nil, err
	}
	kc, err, _ = exchangeHTTP(ctx, s, addr, kc, false)
	return kc, err
}

// keptConn is an http, https, grpc or send_expect check's connection
// between two probes of one target.
type keptConn struct {
	conn net.Conn // the TLS connection for https
	raw  net.Conn
	grpc *grpc.ClientConn // grpc checks': no conn, no raw
	loop *probeSocket     // a send_expect check's on the prober's loop: nothing else
}

// close closes with a reset: no TIME_WAIT per connection, as for tcp checks.
func (k *keptConn) close() {
	if k.loop != nil {
		k.loop.closeKept()
		return
	}
	if k.grpc != nil {
		k.grpc.Close()
		return
	}
	if tc, ok := k.raw.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	k.conn.Close()
}

// dialHTTP connects to the target's check port, with TLS for https.
func dialHTTP(ctx context.Context, s *spec, addr string) (*keptConn, error) {
	kind := s.cfg.Check
	d := net.Dialer{KeepAlive: -1}
	raw, err := d.DialContext(ctx, "tcp", s.addr(addr))
	if err != nil {
		return nil, fmt.Errorf("%s check: %w", kind, unwrapOp(err))
	}
	kc := &keptConn{conn: raw, raw: raw}
	if kind != CheckHTTPS {
		return kc, nil
	}
	cfg := s.tls
	if cfg.ServerName == "" {
		// Verify against the target's address, as an https URL of it
		// would; sessions stay cached by it.
		cfg = cfg.Clone()
		cfg.ServerName, _, _ = net.SplitHostPort(s.addr(addr))
		cfg.ClientSessionCache = s.tls.ClientSessionCache
	}
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		kc.close()
		return nil, fmt.Errorf("%s check: %w", kind, unwrapOp(err))
	}
	kc.conn = tc
	return kc, nil
}

// exchangeHTTP sends the request on kc and judges the answer (httpAnswer,
// as the prober's loop does, fed from kc's reads); it returns kc when the
// connection can serve the next probe, else closes it. stale says a reused
// connection failed before any answer came (the server closed it while
// idle): the caller asks again on a new one.
func exchangeHTTP(ctx context.Context, s *spec, addr string, kc *keptConn, reused bool) (_ *keptConn, err error, stale bool) {
	keep := false
	defer func() {
		if !keep {
			kc.close()
		}
	}()
	if dl, ok := ctx.Deadline(); ok {
		kc.raw.SetDeadline(dl)
	}
	if _, err := io.WriteString(kc.conn, s.request(s.addr(addr))); err != nil {
		return nil, s.httpErr(unwrapOp(err)), reused && !errors.Is(err, os.ErrDeadlineExceeded)
	}
	var (
		got []byte
		ar  answerReader
		buf [4096]byte
	)
	for {
		n, err := kc.conn.Read(buf[:])
		got = append(got, buf[:n]...)
		eof := errors.Is(err, io.EOF)
		if err != nil && (!eof || len(got) == 0) {
			return nil, s.httpErr(unwrapOp(err)), reused && len(got) == 0 && !errors.Is(err, os.ErrDeadlineExceeded)
		}
		if done, whole, err := s.httpAnswer(got, eof, &ar); done {
			if keep = err == nil && whole; !keep {
				return nil, err, false
			}
			return kc, nil, false
		}
	}
}

// maxHeader bounds an http check's answer's header.
const maxHeader = 64 << 10

func statusText(st []string) []string {
	if len(st) == 0 {
		return DefaultExpectStatus
	}
	return st
}

// probeTLS completes a TLS handshake (the certificate verified as
// configured) and closes.
func probeTLS(ctx context.Context, s *spec, addr string) error {
	d := tls.Dialer{NetDialer: &net.Dialer{KeepAlive: -1}, Config: s.tls}
	conn, err := d.DialContext(ctx, "tcp", s.addr(addr))
	if err != nil {
		return fmt.Errorf("tls check: %w", unwrapOp(err))
	}
	return conn.Close()
}

// probeSendExpect connects and runs the steps: a send writes its bytes, an
// expect reads until what arrived since the last match contains its bytes
// (within the probe's timeout).
func probeSendExpect(ctx context.Context, s *spec, addr string) error {
	d := net.Dialer{KeepAlive: -1}
	conn, err := d.DialContext(ctx, "tcp", s.addr(addr))
	if err != nil {
		return fmt.Errorf("send_expect check: %w", unwrapOp(err))
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	var got []byte
	buf := make([]byte, 4096)
	for _, st := range s.steps {
		if st.send != nil {
			if _, err := conn.Write(st.send); err != nil {
				return fmt.Errorf("send_expect check: send %q: %w", excerpt(st.send), unwrapOp(err))
			}
			continue
		}
		for {
			if i := bytes.Index(got, st.expect); i >= 0 {
				got = got[i+len(st.expect):] // what follows is the next expect's
				break
			}
			if len(got) >= maxAnswer {
				return answeredf("send_expect check: expected %q, got %d bytes without it (%q)", excerpt(st.expect), len(got), excerpt(got))
			}
			n, err := conn.Read(buf)
			got = append(got, buf[:n]...)
			if err != nil && n == 0 {
				if len(got) == 0 {
					return fmt.Errorf("send_expect check: expected %q: %w", excerpt(st.expect), unwrapOp(err))
				}
				return answeredf("send_expect check: expected %q, got %q (%v)", excerpt(st.expect), excerpt(got), unwrapOp(err))
			}
		}
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetLinger(0) // no TIME_WAIT per probe, as for tcp checks
	}
	return nil
}

// probeGRPC asks the target's grpc.health.v1.Health/Check for the
// configured service ("" = the server as a whole). A target that passed
// keeps its client connection (one HTTP/2 connection) for its next probe,
// as http checks keep theirs; it takes ownership of kept and returns the
// connection to keep (nil: none).
func probeGRPC(ctx context.Context, s *spec, addr string, kept *keptConn) (*keptConn, error) {
	if kept == nil {
		creds := insecure.NewCredentials()
		if s.tls != nil {
			creds = credentials.NewTLS(s.tls)
		}
		// passthrough: the address is dialled as given, no name resolution.
		conn, err := grpc.NewClient("passthrough:///"+s.addr(addr), grpc.WithTransportCredentials(creds),
			grpc.WithUserAgent("rota-health-check"))
		if err != nil {
			return nil, fmt.Errorf("grpc check: %w", err)
		}
		kept = &keptConn{grpc: conn}
	}
	resp, err := healthpb.NewHealthClient(kept.grpc).Check(ctx, &healthpb.HealthCheckRequest{Service: s.cfg.GRPCService})
	if err != nil {
		kept.close()
		return nil, fmt.Errorf("grpc check: %w", err)
	}
	if st := resp.GetStatus(); st != healthpb.HealthCheckResponse_SERVING {
		kept.close()
		svc := s.cfg.GRPCService
		if svc == "" {
			svc = `"" (the server)`
		}
		return nil, answeredf("grpc check: service %s is %s", svc, st)
	}
	return kept, nil
}

// answeredError is a probe's failure that the target answered: an http
// status or body, a send_expect reply or a gRPC status other than the one
// expected. The target is alive and its verdict may change any moment (a
// replica promoted, a Redis replica made master), so a down target that
// answers is probed at the interval, not on backoff, which is for targets
// that do not answer.
type answeredError struct{ error }

func (e answeredError) Unwrap() error { return e.error }

// answeredf formats an answeredError.
func answeredf(format string, args ...any) error {
	return answeredError{fmt.Errorf(format, args...)}
}

// answered tells whether err is a verdict the target gave.
func answered(err error) bool {
	var a answeredError
	return errors.As(err, &a)
}

// excerpt is b cut to 80 bytes for an error message.
func excerpt(b []byte) string {
	if len(b) > 80 {
		return string(b[:80]) + "..."
	}
	return string(b)
}
