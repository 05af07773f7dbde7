// Package embedetcd runs a real, single-member etcd server inside the rota
// process (registries.etcd.embedded in rota.yaml, `rota demo`, and tests).
//
// It is a thin owner around go.etcd.io/etcd/server/v3/embed: Start returns
// only once the server is ready to serve clients, Close stops it and waits
// for every goroutine it started. Clients (rota's own watcher, `rota
// register`, etcdctl) talk to it over its client URL like to any etcd; this
// package hands out no clients of its own.
package embedetcd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Defaults applied to zero fields of Config.
const (
	DefaultClientURL    = "http://127.0.0.1:2379"
	DefaultPeerURL      = "http://127.0.0.1:0" // ephemeral: one member, nobody dials it
	DefaultName         = "rota"
	DefaultReadyTimeout = 30 * time.Second
)

// Config describes one embedded etcd member. Only DataDir is required.
type Config struct {
	// DataDir holds the member's WAL and snapshots. It is created (0700)
	// when missing; starting again on the same directory keeps the data.
	DataDir string
	// ClientURL is where clients connect, http://host:port, or
	// https://host:port with TLS (default DefaultClientURL). Port 0 picks a
	// free port; Endpoints reports it.
	ClientURL string
	// TLS serves clients over TLS: CertFile and KeyFile are the server's;
	// ClientCAFile, when set, must have signed every client's certificate
	// (clients without one are refused in the handshake).
	TLS TLS
	// PeerURL is the raft peer listener (default DefaultPeerURL: loopback,
	// ephemeral port, so several embedded servers never collide). A
	// single-member cluster never dials it, so its port only matters when
	// you pin it on purpose.
	PeerURL string
	// Name is the member name (default DefaultName). Keep it stable across
	// restarts on the same DataDir.
	Name string
	// Logger receives etcd's own log, named "embedetcd" and limited to warn
	// and above. Nil discards it.
	Logger *zap.Logger
	// BcryptCost is the cost of hashing user passwords (0: etcd's
	// default, 10). Tests lower it: under the race detector one hash at
	// the default takes over a second.
	BcryptCost uint
	// ReadyTimeout bounds the wait for the server to become ready
	// (default DefaultReadyTimeout).
	ReadyTimeout time.Duration
}

// TLS names the PEM files of the server's TLS.
type TLS struct {
	CertFile, KeyFile, ClientCAFile string
}

// Server is a running embedded etcd member. Its owner must call Close.
type Server struct {
	etcd      *embed.Etcd
	endpoints []string
	// endStreams cancels every open gRPC stream (watches, lease
	// keepalives); Close calls it before stopping the gRPC server so that
	// the graceful stop does not wait etcd's full request timeout (5 s + 2
	// election timeouts) for streams that never end on their own.
	endStreams context.CancelFunc
	closeOnce  sync.Once
	// closing silences the errors etcd logs about its own listeners
	// closing under it while Close runs.
	closing *atomic.Bool
}

// Start starts an etcd member and waits until it serves clients, ctx is
// done, or cfg.ReadyTimeout passes; on failure it stops what it started and
// returns the cause.
func Start(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.DataDir == "" {
		return nil, errors.New("embedetcd: data dir is required")
	}
	closing := new(atomic.Bool)
	ecfg, err := etcdConfig(cfg, closing)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("embedetcd: create data dir: %w", err)
	}

	streamsCtx, endStreams := context.WithCancel(context.Background())
	ecfg.GRPCAdditionalServerOptions = append(ecfg.GRPCAdditionalServerOptions,
		grpc.ChainStreamInterceptor(endableStreams(streamsCtx)))

	e, err := embed.StartEtcd(ecfg)
	if err != nil {
		endStreams()
		return nil, fmt.Errorf("embedetcd: start etcd (data dir %s, client url %s): %w", cfg.DataDir, ecfg.ListenClientUrls[0].String(), err)
	}
	s := &Server{etcd: e, endStreams: endStreams, closing: closing}
	for _, l := range e.Clients {
		s.endpoints = append(s.endpoints, ecfg.ListenClientUrls[0].Scheme+"://"+dialable(l.Addr(), ecfg.ListenClientUrls[0].Hostname()))
	}

	timeout := cfg.ReadyTimeout
	if timeout <= 0 {
		timeout = DefaultReadyTimeout
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-e.Server.ReadyNotify():
		return s, nil
	case err, ok := <-e.Err():
		s.Close()
		if !ok || err == nil {
			err = errors.New("server stopped")
		}
		return nil, fmt.Errorf("embedetcd: etcd failed before ready (data dir %s): %w", cfg.DataDir, err)
	case <-e.Server.StopNotify():
		s.Close()
		return nil, fmt.Errorf("embedetcd: etcd stopped before ready (data dir %s)", cfg.DataDir)
	case <-timer.C:
		s.Close()
		return nil, fmt.Errorf("embedetcd: etcd not ready after %s (data dir %s)", timeout, cfg.DataDir)
	case <-ctx.Done():
		s.Close()
		return nil, fmt.Errorf("embedetcd: waiting for etcd to be ready: %w", context.Cause(ctx))
	}
}

// dialable is a listener's address as a client on this machine dials it:
// an unspecified host (0.0.0.0, ::) becomes loopback of the family the
// URL's host names (a "0.0.0.0" socket may report itself as [::]).
func dialable(a net.Addr, urlHost string) string {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil || !ap.Addr().IsUnspecified() {
		return a.String()
	}
	lo := netip.AddrFrom4([4]byte{127, 0, 0, 1})
	if h, err := netip.ParseAddr(urlHost); err == nil && h.Is6() && !h.Is4In6() {
		lo = netip.IPv6Loopback()
	}
	return netip.AddrPortFrom(lo, ap.Port()).String()
}

// etcdConfig maps Config onto etcd's own configuration.
func etcdConfig(cfg Config, closing *atomic.Bool) (*embed.Config, error) {
	clientURL, err := parseHTTPURL("client", cfg.ClientURL, DefaultClientURL, cfg.TLS.CertFile != "")
	if err != nil {
		return nil, err
	}
	peerURL, err := parseHTTPURL("peer", cfg.PeerURL, DefaultPeerURL, false)
	if err != nil {
		return nil, err
	}

	ec := embed.NewConfig()
	ec.Name = cfg.Name
	if ec.Name == "" {
		ec.Name = DefaultName
	}
	ec.Dir = cfg.DataDir
	ec.ListenClientUrls = []url.URL{*clientURL}
	ec.AdvertiseClientUrls = []url.URL{*clientURL}
	ec.ListenPeerUrls = []url.URL{*peerURL}
	ec.AdvertisePeerUrls = []url.URL{*peerURL}
	ec.InitialCluster = ec.InitialClusterFromName(ec.Name)
	if cfg.BcryptCost != 0 {
		ec.BcryptCost = cfg.BcryptCost
	}
	if t := cfg.TLS; t.CertFile != "" {
		ec.ClientTLSInfo = transport.TLSInfo{
			CertFile: t.CertFile, KeyFile: t.KeyFile,
			TrustedCAFile: t.ClientCAFile, ClientCertAuth: t.ClientCAFile != "",
		}
	}

	// A registry only needs recent history: watchers resync from a Get
	// after a compaction, so keep one hour and let the backend stay small.
	ec.AutoCompactionMode = embed.CompactorModePeriodic
	ec.AutoCompactionRetention = "1h"

	lg := cfg.Logger
	if lg == nil {
		lg = zap.NewNop()
	}
	ec.LogLevel = "warn"
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(
		lg.Named("embedetcd").WithOptions(zap.IncreaseLevel(zapcore.WarnLevel), zap.WrapCore(func(c zapcore.Core) zapcore.Core { return quiet{c, closing} })))
	return ec, nil
}

// parseHTTPURL parses an http://host:port URL, or https:// with tls.
func parseHTTPURL(what, raw, def string, tls bool) (*url.URL, error) {
	if raw == "" {
		raw = def
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("embedetcd: %s url %q: %w", what, raw, err)
	}
	scheme := "http"
	if tls {
		scheme = "https"
	}
	if u.Scheme != scheme || u.Host == "" || u.Port() == "" || u.Path != "" && u.Path != "/" {
		return nil, fmt.Errorf("embedetcd: %s url %q: want %s://host:port", what, raw, scheme)
	}
	u.Path = ""
	return u, nil
}

// quiet drops etcd messages that are no news for an embedded server and
// would otherwise greet every `rota demo`: the start-up warnings about
// serving gRPC and HTTP on one port (the intended layout) and about simple
// auth tokens (auth is off unless the operator enables it), and, while
// Close runs, the errors etcd logs as its own listeners close under it.
type quiet struct {
	zapcore.Core
	closing *atomic.Bool
}

func (q quiet) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	switch e.Message {
	case "Running http and grpc server on single port. This is not recommended for production.",
		"simple token is not cryptographically signed":
		return ce
	case "setting up serving from embedded etcd failed.",
		"stopping insecure grpc server due to error",
		"stopped insecure grpc server due to error":
		if q.closing.Load() {
			return ce
		}
	}
	return q.Core.Check(e, ce)
}

func (q quiet) With(f []zapcore.Field) zapcore.Core { return quiet{q.Core.With(f), q.closing} }

// endableStreams makes every stream's context end when ctx does; a stream
// ended that way reports codes.Unavailable, as a client would see from an
// etcd process going away.
func endableStreams(ctx context.Context) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		sctx, cancel := context.WithCancel(ss.Context())
		defer cancel()
		stop := context.AfterFunc(ctx, cancel)
		defer stop()
		err := handler(srv, ctxStream{ServerStream: ss, ctx: sctx})
		if ctx.Err() != nil {
			return status.Error(codes.Unavailable, "embedded etcd server is shutting down")
		}
		return err
	}
}

type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s ctxStream) Context() context.Context { return s.ctx }

// Endpoints returns the client URLs the server listens on, with the real
// port when ClientURL asked for port 0.
func (s *Server) Endpoints() []string {
	return append([]string(nil), s.endpoints...)
}

// Err reports a fatal error of the running server; it is closed once the
// server has stopped.
func (s *Server) Err() <-chan error { return s.etcd.Err() }

// Close ends client streams, stops the server and waits for it. It is safe
// to call more than once.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		s.closing.Store(true)
		s.endStreams()
		s.etcd.Close()
	})
}
