package main

import (
	"context"
	"flag"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/rota-proxy/rota/demo"
	"github.com/rota-proxy/rota/discovery/etcd"
)

// etcdFlags are the flags that say how to reach etcd.
type etcdFlags struct {
	endpoints              listFlag
	prefix                 string
	username, passwordFile string
	ca, cert, key          string
}

func (e *etcdFlags) register(fs *flag.FlagSet) {
	fs.Var(&e.endpoints, "etcd", "etcd endpoints host:port[,host:port]")
	fs.StringVar(&e.prefix, "prefix", etcd.DefaultPrefix, "key prefix of services")
	fs.StringVar(&e.username, "etcd-username", "", "etcd user name")
	fs.StringVar(&e.passwordFile, "etcd-password-file", "", "file holding the etcd password")
	fs.StringVar(&e.ca, "etcd-ca", "", "CA file verifying etcd's certificate")
	fs.StringVar(&e.cert, "etcd-cert", "", "client certificate file for etcd")
	fs.StringVar(&e.key, "etcd-key", "", "client key file for etcd")
}

func (e *etcdFlags) config() etcd.Config {
	return etcd.Config{
		Endpoints: e.endpoints, Prefix: e.prefix,
		Username: e.username, PasswordFile: e.passwordFile,
		TLS: etcd.TLSConfig{CAFile: e.ca, CertFile: e.cert, KeyFile: e.key},
	}
}

// signalContext is cancelled by SIGINT or SIGTERM.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func cmdRegister(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("register", stderr, "rota register --etcd host:port --service NAME --addr host:port [--ttl 10s] [--weight N]")
	var (
		ef      etcdFlags
		service string
		addr    string
		ttl     time.Duration
		weight  int
		lf      logFlags
	)
	ef.register(fs)
	fs.StringVar(&service, "service", "", "service to register as (required)")
	fs.StringVar(&addr, "addr", "", "instance address host:port to register (required)")
	fs.DurationVar(&ttl, "ttl", etcd.DefaultTTL, "lease TTL: a crashed registrant disappears this long after it stopped")
	fs.IntVar(&weight, "weight", 0, "share of new connections relative to other instances, 1-1000 (Metadata.weight; 0: none, counts as 1)")
	lf.register(fs, "auto")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	switch {
	case len(ef.endpoints) == 0:
		return usagef("--etcd is required")
	case service == "":
		return usagef("--service is required")
	case addr == "":
		return usagef("--addr is required")
	case weight < 0 || weight > 1000:
		return usagef("--weight %d: want 1-1000 (or 0 for none)", weight)
	}
	if _, err := etcd.InstanceKey(ef.prefix, service, addr); err != nil {
		return usagef("%v", err)
	}
	logger, err := lf.logger(stderr)
	if err != nil {
		return err
	}
	defer logger.Sync()
	cfg := ef.config()
	cfg.Logger = logger.Named("etcd-client")
	client, err := etcd.NewClient(cfg)
	if err != nil {
		return err
	}
	defer client.Close()
	ctx, stop := signalContext()
	defer stop()
	return etcd.RegisterInstance(ctx, client, etcd.Registration{
		Prefix: ef.prefix, Service: service, Addr: addr, Weight: weight, TTL: ttl,
	}, logger.Named("register"))
}

func cmdDemoBackend(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("demo-backend", stderr, "rota demo-backend --name NAME --listen host:port [--etcd host:port | --consul host:port] [--service NAME]")
	var (
		opts demo.BackendOptions
		ef   etcdFlags
		lf   logFlags
	)
	fs.StringVar(&opts.Name, "name", "", "what GET / answers (default: the host name)")
	fs.StringVar(&opts.Listen, "listen", "127.0.0.1:0", "address to listen on")
	fs.StringVar(&opts.Service, "service", "web", "service to register as (with --etcd or --consul)")
	fs.StringVar(&opts.Consul.Address, "consul", "", "Consul agent host:port to register with, with an HTTP check on /healthz (instead of --etcd)")
	fs.StringVar(&opts.Consul.TokenFile, "consul-token-file", "", "file holding the Consul ACL token (default: CONSUL_HTTP_TOKEN)")
	fs.StringVar(&opts.Advertise, "advertise", "", "address to register (default: the listen address, or this host's first IP when listening on all)")
	fs.DurationVar(&opts.TTL, "ttl", etcd.DefaultTTL, "registration lease TTL")
	fs.StringVar(&opts.DownFile, "down-file", "", "/healthz answers 503 while this file exists (docker cp a file in to fail a container's healthcheck)")
	fs.DurationVar(&opts.DeregisterWait, "deregister-wait", demo.DefaultDeregisterWait, "on SIGTERM, keep serving this long after deregistering (a plain backend: after the signal), so proxies stop sending new connections first (negative: none; a plain backend's default: none)")
	ef.register(fs)
	lf.register(fs, "auto")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if len(ef.endpoints) > 0 && opts.Consul.Address != "" {
		return usagef("--etcd and --consul are exclusive: a demo backend registers in one registry")
	}
	waitSet := false
	fs.Visit(func(f *flag.Flag) { waitSet = waitSet || f.Name == "deregister-wait" })
	if opts.DeregisterWait == 0 || !waitSet && len(ef.endpoints) == 0 && opts.Consul.Address == "" {
		// Asked for none (0 in the options means the default), or a
		// plain backend that did not ask: it stops at once.
		opts.DeregisterWait = -1
	}
	if opts.Name == "" {
		opts.Name, _ = os.Hostname()
	}
	logger, err := lf.logger(stderr)
	if err != nil {
		return err
	}
	defer logger.Sync()
	opts.Etcd = ef.config()
	opts.Logger = logger
	ctx, stop := signalContext()
	defer stop()
	return demo.ServeBackend(ctx, opts)
}
