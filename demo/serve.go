package demo

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/discovery/consul"
	"github.com/rota-proxy/rota/discovery/etcd"
)

// DefaultShutdownTimeout is how long ServeBackend lets requests in flight
// finish when it stops.
const DefaultShutdownTimeout = 5 * time.Second

// DefaultDeregisterWait is how long a registered backend keeps serving
// after it deregistered. A proxy learns of the deregistration a moment
// after it is committed; a backend that closed its listener at once would
// refuse the connections handed to it meanwhile, and when several backends
// stop together (a scale-in) every retry of one client connection can land
// on one of them (seen with docker compose --scale 5 -> 2: three
// consecutive targets in the rotation refused the same client).
const DefaultDeregisterWait = time.Second

// BackendOptions configure ServeBackend (`rota demo-backend`).
type BackendOptions struct {
	// Name is what `GET /` answers; required.
	Name string
	// Listen is host:port to listen on (default DefaultListen).
	Listen string
	// Etcd, when its Endpoints are set, makes the backend register itself
	// as an instance of Service through etcd.Register (under Etcd.Prefix)
	// while it runs, and deregister when it stops. Empty Endpoints: no
	// registration.
	Etcd etcd.Config
	// Consul, when its Address is set, makes the backend register itself
	// as an instance of Service with that Consul agent (ConsulRegistrar:
	// an HTTP check on /healthz) while it runs, and deregister when it
	// stops. It cannot be combined with Etcd.
	Consul consul.ClientConfig
	// Service is the service to register as; required with Etcd or Consul.
	Service string
	// TTL is the etcd registration's lease TTL (default etcd.DefaultTTL).
	TTL time.Duration
	// Advertise is the address registered (default: the listen address;
	// when that host is unspecified, as in ":9000", the first non-loopback
	// address of an up interface, else 127.0.0.1).
	Advertise string
	// DownFile, set, makes /healthz answer 503 while that file exists.
	DownFile string
	// ShutdownTimeout bounds the graceful stop (default
	// DefaultShutdownTimeout).
	ShutdownTimeout time.Duration
	// DeregisterWait is how long a registered backend keeps serving
	// after it deregistered, before it stops accepting (default
	// DefaultDeregisterWait; negative: not at all). A backend that does
	// not register keeps serving this long after ctx ends only when it is
	// positive.
	DeregisterWait time.Duration
	// Ready, when set, is called once with the listen address (real port)
	// as soon as the backend answers, before it registers.
	Ready func(addr string)
	// Logger receives state changes (listening, registered, stopped); nil
	// discards them.
	Logger *zap.Logger
}

// ServeBackend runs one demo backend until ctx is done: it listens,
// registers in etcd or Consul when configured, and on ctx done deregisters
// (etcd: delete the key, revoke the lease; Consul: deregister the service),
// keeps serving for the deregister wait, then shuts the server down
// gracefully. It returns nil after a clean
// stop, and an error when the options are invalid, listening fails, or the
// registration fails for good.
func ServeBackend(ctx context.Context, opts BackendOptions) error {
	inEtcd, inConsul := len(opts.Etcd.Endpoints) > 0, opts.Consul.Address != ""
	register := inEtcd || inConsul
	switch {
	case inEtcd && inConsul:
		return errors.New("demo: a backend registers in etcd or in Consul, not both")
	case register && opts.Service == "":
		return errors.New("demo: backend registration needs a service name")
	case inEtcd:
		if _, err := etcd.InstanceKey(opts.Etcd.Prefix, opts.Service, "127.0.0.1:1"); err != nil {
			return fmt.Errorf("demo: backend registration: %w", err)
		}
		if opts.Advertise != "" {
			if _, err := etcd.InstanceKey(opts.Etcd.Prefix, opts.Service, opts.Advertise); err != nil {
				return fmt.Errorf("demo: advertise address: %w", err)
			}
		}
	case inConsul && opts.Advertise != "":
		if _, err := consulRegistration(opts.Service, opts.Advertise); err != nil {
			return fmt.Errorf("demo: advertise address: %w", err)
		}
	}
	log := opts.Logger
	if log == nil {
		log = zap.NewNop()
	}
	log = log.Named("demo").With(zap.String("name", opts.Name))
	timeout := opts.ShutdownTimeout
	if timeout <= 0 {
		timeout = DefaultShutdownTimeout
	}

	b, err := StartBackend(ctx, opts.Name, opts.Listen)
	if err != nil {
		return err
	}
	b.SetDownFile(opts.DownFile)
	log.Info("demo backend listening", zap.String("addr", b.Addr()))
	if opts.Ready != nil {
		opts.Ready(b.Addr())
	}

	var regErr error
	if register {
		regErr = runRegistered(ctx, b, opts, log)
		if regErr == nil {
			keepServing(opts.DeregisterWait, log)
		}
	} else {
		<-ctx.Done()
		if opts.DeregisterWait > 0 {
			// Proxies that follow the container engine see the stop
			// signal too; those that only check its health see /healthz
			// fail. Serve while they take this one out.
			b.SetDraining()
			keepServing(opts.DeregisterWait, log)
		}
	}

	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	defer cancel()
	err = b.Shutdown(sctx)
	log.Info("demo backend stopped")
	return errors.Join(regErr, err)
}

// keepServing lets the backend serve for the deregister wait after its
// deregistration, so that proxies watching the registry stop handing it
// connections before it stops accepting them.
func keepServing(wait time.Duration, log *zap.Logger) {
	switch {
	case wait < 0:
		return
	case wait == 0:
		wait = DefaultDeregisterWait
	}
	log.Info("deregistered; serving a little longer while proxies catch up", zap.Duration("for", wait))
	t := time.NewTimer(wait)
	defer t.Stop()
	<-t.C
}

// runRegistered keeps b registered in etcd or Consul until ctx is done and
// returns after the deregistration, or earlier when the registration fails
// for good.
func runRegistered(ctx context.Context, b *Backend, opts BackendOptions, log *zap.Logger) error {
	addr := opts.Advertise
	if addr == "" {
		addr = advertiseAddr(b.Addr())
	}
	if opts.Consul.Address != "" {
		return runConsulRegistered(ctx, addr, opts, log)
	}
	cfg := opts.Etcd
	if cfg.Logger == nil {
		cfg.Logger = opts.Logger
	}
	client, err := etcd.NewClient(cfg)
	if err != nil {
		return fmt.Errorf("demo: backend %s: %w", opts.Name, err)
	}
	defer client.Close()
	log.Info("registering demo backend in etcd", zap.String("service", opts.Service),
		zap.String("addr", addr), zap.Strings("endpoints", cfg.Endpoints))
	if err := etcd.Register(ctx, client, cfg.Prefix, opts.Service, addr, opts.TTL, opts.Logger); err != nil {
		return fmt.Errorf("demo: backend %s: %w", opts.Name, err)
	}
	return nil
}

// runConsulRegistered keeps addr registered with the Consul agent of
// opts.Consul until ctx is done.
func runConsulRegistered(ctx context.Context, addr string, opts BackendOptions, log *zap.Logger) error {
	client, err := consul.NewClient(opts.Consul)
	if err != nil {
		return fmt.Errorf("demo: backend %s: %w", opts.Name, err)
	}
	defer client.Close()
	log.Info("registering demo backend in consul", zap.String("service", opts.Service),
		zap.String("addr", addr), zap.String("agent", opts.Consul.Address))
	if err := ConsulRegistrar(client.API, opts.Service, opts.Logger)(ctx, addr); err != nil {
		return fmt.Errorf("demo: backend %s: %w", opts.Name, err)
	}
	return nil
}

// advertiseAddr replaces an unspecified listen host (0.0.0.0, ::) by an
// address other hosts can dial.
func advertiseAddr(listen string) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return listen
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsUnspecified() {
		return listen
	}
	return net.JoinHostPort(firstInterfaceIP(), port)
}

// firstInterfaceIP returns the first non-loopback IPv4 address of an up
// interface (in a container, its address on the container network), else
// 127.0.0.1.
func firstInterfaceIP() string {
	ifaces, err := net.Interfaces()
	if err != nil {
		return "127.0.0.1"
	}
	for _, ifc := range ifaces {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, err := ifc.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && !n.IP.IsLoopback() && !n.IP.IsLinkLocalUnicast() {
				return n.IP.String()
			}
		}
	}
	return "127.0.0.1"
}
