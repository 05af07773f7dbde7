// Package etcd discovers a service's instances in etcd and registers
// instances there.
//
// The registry layout is etcd's own naming/endpoints format, so that gRPC's
// etcd resolver and rota share one registry: one key per instance,
// <prefix><service>/<id>, attached to a lease, whose value is
// {"Op":0,"Addr":"host:port","Metadata":null}. The id is anything
// (endpoints.Manager users pick their own; Register uses the address); the
// value's Addr is the instance, and Metadata.weight its weight. The default
// prefix "services/" is where gRPC's resolver looks for etcd:///services/<service>.
//
// Ownership: the caller creates one *clientv3.Client (NewClient), shares it
// between any number of Watchers (one per listener) and Register calls, and
// closes it after they have returned. Watchers and Register start their own
// goroutines and stop them before returning; they never close the client.
package etcd

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
)

// DefaultPrefix is the key prefix under which services live: gRPC's etcd
// resolver, dialling etcd:///services/web, reads services/web/<id> (it
// strips the leading slash).
const DefaultPrefix = "services/"

// Defaults applied by NewClient.
const (
	DefaultDialTimeout = 5 * time.Second
	// keepalive pings detect a dead connection (a partition rather than a
	// closed socket); etcd rejects pings more frequent than every 5 s.
	dialKeepAliveTime    = 10 * time.Second
	dialKeepAliveTimeout = 5 * time.Second
	// reconnectMaxDelay caps gRPC's reconnect backoff (120 s by default),
	// so that an etcd back from an outage is seen within seconds.
	reconnectMaxDelay = 5 * time.Second
)

// TLSConfig names the PEM files for TLS to etcd. CAFile alone verifies the
// server; CertFile and KeyFile together add a client certificate.
type TLSConfig struct {
	CAFile, CertFile, KeyFile string
}

func (t TLSConfig) enabled() bool { return t.CAFile != "" || t.CertFile != "" || t.KeyFile != "" }

// Config is how rota reaches etcd (registries.etcd in rota.yaml). The zero
// value is not usable: Endpoints is required.
type Config struct {
	// Endpoints are host:port or URLs of etcd members.
	Endpoints []string
	// Prefix is the key prefix of all services (default DefaultPrefix). It
	// is not used by NewClient; pass it to NewWatcher and Register.
	Prefix string
	// Username and PasswordFile enable etcd authentication. The password
	// is read from the file, surrounding white space trimmed.
	Username, PasswordFile string
	TLS                    TLSConfig
	// DialTimeout bounds authentication and the first lease keepalive
	// (default DefaultDialTimeout). Connecting itself is non-blocking.
	DialTimeout time.Duration
	// Logger receives the etcd client's own warnings; nil discards them.
	Logger *zap.Logger
}

// NewClient builds an etcd client from cfg. It does not wait for etcd to
// be reachable. The caller owns the client and closes it.
func NewClient(cfg Config) (*clientv3.Client, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("etcd: no endpoints")
	}
	cc := clientv3.Config{
		Endpoints:            cfg.Endpoints,
		DialTimeout:          cfg.DialTimeout,
		DialKeepAliveTime:    dialKeepAliveTime,
		DialKeepAliveTimeout: dialKeepAliveTimeout,
		Username:             cfg.Username,
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: grpcbackoff.Config{
				BaseDelay:  250 * time.Millisecond,
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   reconnectMaxDelay,
			},
			MinConnectTimeout: 5 * time.Second,
		})},
		Logger: zap.NewNop(),
	}
	if cc.DialTimeout <= 0 {
		cc.DialTimeout = DefaultDialTimeout
	}
	if cfg.Logger != nil {
		cc.Logger = cfg.Logger.Named("etcdclient").WithOptions(zap.IncreaseLevel(zapcore.WarnLevel))
	}
	if cfg.PasswordFile != "" {
		if cfg.Username == "" {
			return nil, errors.New("etcd: password file given without a username")
		}
		b, err := os.ReadFile(cfg.PasswordFile)
		if err != nil {
			return nil, fmt.Errorf("etcd: read password file: %w", err)
		}
		cc.Password = strings.TrimSpace(string(b))
	}
	if cfg.TLS.enabled() {
		if (cfg.TLS.CertFile == "") != (cfg.TLS.KeyFile == "") {
			return nil, errors.New("etcd: tls cert_file and key_file must be given together")
		}
		info := transport.TLSInfo{TrustedCAFile: cfg.TLS.CAFile, CertFile: cfg.TLS.CertFile, KeyFile: cfg.TLS.KeyFile}
		tc, err := info.ClientConfig()
		if err != nil {
			return nil, fmt.Errorf("etcd: tls config: %w", err)
		}
		cc.TLS = tc
	}
	c, err := clientv3.New(cc)
	if err != nil {
		return nil, fmt.Errorf("etcd: client for %v: %w", cfg.Endpoints, err)
	}
	return c, nil
}

// servicePrefix returns "<prefix><service>/", the key prefix of one
// service's instances. An empty prefix means DefaultPrefix; a missing
// trailing slash is added, so "services" and "services/" are the same (a
// leading slash is kept: "/services/" and "services/" are different keys).
// The trailing slash after service keeps "web2" out of "web".
func servicePrefix(prefix, service string) (string, error) {
	if service == "" {
		return "", errors.New("etcd: empty service name")
	}
	if strings.Contains(service, "/") {
		return "", fmt.Errorf("etcd: service name %q contains '/'", service)
	}
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	return prefix + service + "/", nil
}

// InstanceKey returns the key Register uses for an instance:
// <prefix><service>/<addr>, with prefix normalised as NewWatcher does.
func InstanceKey(prefix, service, addr string) (string, error) {
	p, err := servicePrefix(prefix, service)
	if err != nil {
		return "", err
	}
	if err := checkAddr(addr); err != nil {
		return "", fmt.Errorf("etcd: instance address %q: %w", addr, err)
	}
	return p + addr, nil
}
