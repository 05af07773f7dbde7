package demo

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/discovery/etcd"
)

// DefaultFleetSize is the number of backends `rota demo` runs.
const DefaultFleetSize = 3

// RegisterFunc keeps one backend address registered until ctx is done,
// then removes the registration and returns; it returns early only on an
// error that retrying cannot fix. EtcdRegistrar's functions behave so.
type RegisterFunc func(ctx context.Context, addr string) error

// EtcdRegistrar returns a RegisterFunc that registers addresses as
// instances of service through etcd.Register on client, under prefix (""
// means etcd.DefaultPrefix) with a lease of ttl (0 means
// etcd.DefaultTTL). The caller keeps owning client and closes it after
// the registrations have returned.
func EtcdRegistrar(client *clientv3.Client, prefix, service string, ttl time.Duration, logger *zap.Logger) RegisterFunc {
	return func(ctx context.Context, addr string) error {
		return etcd.Register(ctx, client, prefix, service, addr, ttl, logger)
	}
}

// FleetOptions describes the backends of StartFleet.
type FleetOptions struct {
	// Addrs are the listen addresses, one backend each. Empty means N
	// backends on Host, each on an ephemeral port.
	Addrs []string
	// N is the number of backends when Addrs is empty (default
	// DefaultFleetSize).
	N int
	// Host is the listen host when Addrs is empty (default 127.0.0.1).
	Host string
	// NamePrefix names the backends NamePrefix+"1", NamePrefix+"2", ...
	// (default "backend-").
	NamePrefix string
	// Register, when set, runs for each backend with its address from
	// start-up until Shutdown or Close, each in a goroutine of its own.
	Register RegisterFunc
	// Logger receives the fleet's state changes; nil discards them.
	Logger *zap.Logger
}

// Fleet is a set of demo backends, each optionally registered in a
// registry. Its owner must call Shutdown or Close.
type Fleet struct {
	backends []*Backend
	log      *zap.Logger

	stopReg context.CancelFunc
	regWG   sync.WaitGroup
	regMu   sync.Mutex
	regErrs []error

	stopOnce sync.Once
	stopErr  error
}

// StartFleet starts the backends named backend-1 ... backend-N and then
// their registrations. It returns once every backend listens; the
// registrations proceed in the background. On failure it stops what it
// started. ctx bounds start-up only (its values reach Register).
func StartFleet(ctx context.Context, opts FleetOptions) (*Fleet, error) {
	addrs := opts.Addrs
	if len(addrs) == 0 {
		n := opts.N
		if n <= 0 {
			n = DefaultFleetSize
		}
		host := opts.Host
		if host == "" {
			host = "127.0.0.1"
		}
		addrs = make([]string, n)
		for i := range addrs {
			addrs[i] = net.JoinHostPort(host, "0")
		}
	}
	prefix := opts.NamePrefix
	if prefix == "" {
		prefix = "backend-"
	}
	log := opts.Logger
	if log == nil {
		log = zap.NewNop()
	}
	f := &Fleet{log: log.Named("demo")}
	for i, addr := range addrs {
		b, err := StartBackend(ctx, fmt.Sprintf("%s%d", prefix, i+1), addr)
		if err != nil {
			for _, started := range f.backends {
				_ = started.Close()
			}
			return nil, fmt.Errorf("demo: start fleet: %w", err)
		}
		f.backends = append(f.backends, b)
		f.log.Info("demo backend listening", zap.String("name", b.Name()), zap.String("addr", b.Addr()))
	}

	regCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	f.stopReg = stop
	if opts.Register != nil {
		for _, b := range f.backends {
			f.regWG.Add(1)
			go func() {
				defer f.regWG.Done()
				if err := opts.Register(regCtx, b.Addr()); err != nil {
					f.log.Error("demo backend registration failed", zap.String("name", b.Name()), zap.Error(err))
					f.regMu.Lock()
					f.regErrs = append(f.regErrs, fmt.Errorf("demo: register %s (%s): %w", b.Name(), b.Addr(), err))
					f.regMu.Unlock()
				}
			}()
		}
	}
	return f, nil
}

// Backends returns the backends in name order.
func (f *Fleet) Backends() []*Backend { return append([]*Backend(nil), f.backends...) }

// Addrs returns the backends' addresses in name order.
func (f *Fleet) Addrs() []string {
	out := make([]string, len(f.backends))
	for i, b := range f.backends {
		out[i] = b.Addr()
	}
	return out
}

// Shutdown deregisters every backend first (ends the registrations and
// waits for them, so that a proxy stops routing to them) and then shuts
// the servers down gracefully within ctx. It returns the registrations'
// and servers' errors. Later calls, and Close after it, return the same
// result without doing anything.
func (f *Fleet) Shutdown(ctx context.Context) error {
	return f.stop(func(b *Backend) error { return b.Shutdown(ctx) })
}

// Close deregisters every backend as Shutdown does and then closes the
// servers and their connections at once.
func (f *Fleet) Close() error {
	return f.stop((*Backend).Close)
}

func (f *Fleet) stop(stopBackend func(*Backend) error) error {
	f.stopOnce.Do(func() {
		f.stopReg()
		f.regWG.Wait()
		errs := f.registrationErrors()
		serr := make([]error, len(f.backends))
		var wg sync.WaitGroup
		for i, b := range f.backends {
			wg.Add(1)
			go func() {
				defer wg.Done()
				serr[i] = stopBackend(b)
			}()
		}
		wg.Wait()
		f.stopErr = errors.Join(append(errs, serr...)...)
		f.log.Info("demo backends stopped", zap.Int("backends", len(f.backends)))
	})
	return f.stopErr
}

func (f *Fleet) registrationErrors() []error {
	f.regMu.Lock()
	defer f.regMu.Unlock()
	return append([]error(nil), f.regErrs...)
}
