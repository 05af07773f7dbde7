package server

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"reflect"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/discovery/dns"
	"github.com/rota-proxy/rota/discovery/docker"
	"github.com/rota-proxy/rota/discovery/etcd"
	"github.com/rota-proxy/rota/discovery/kubernetes"
	"github.com/rota-proxy/rota/discovery/static"
	"github.com/rota-proxy/rota/embedetcd"
	"github.com/rota-proxy/rota/fleet"
)

// registries holds the registry clients listeners share, and the embedded
// etcd server when the configuration asks for one.
type registries struct {
	cfg      config.Registries
	embedded *embedetcd.Server
	etcd     *clientv3.Client
	steer    *etcd.Steering // keeps etcd off members its watches found stale
	consul   *consulRegistry
	// Fleet marks (registries.state), one watch per registry client,
	// stopped before its client is closed.
	etcdFleet, consulFleet *fleetWatch
}

// fleetOf is the fleet watch of registry kind, nil if there is none.
func (r *registries) fleetOf(kind string) *fleetWatch {
	if r == nil {
		return nil
	}
	switch kind {
	case config.StateEtcd:
		return r.etcdFleet
	case config.StateConsul:
		return r.consulFleet
	}
	return nil
}

// openRegistries starts what cfg describes. When reloading, prev is the
// running set: its embedded etcd server is kept (it cannot change without a
// restart, since clients outside rota may be using it).
// applyFleet receives the fleet marks each registry's watch reads.
//
// deferEmbedded leaves the embedded etcd server to StartEmbedded (an
// upgrade's new process: the old one still runs it on the same client
// URL, which this process's client reaches meanwhile).
func openRegistries(ctx context.Context, cfg config.Registries, prev *registries, logger *zap.Logger, applyFleet func(string, fleet.Marks), deferEmbedded bool) (*registries, error) {
	r := &registries{cfg: cfg}
	if e := cfg.Etcd; e != nil {
		var prevEmb *config.Embedded
		if prev != nil && prev.cfg.Etcd != nil {
			prevEmb = prev.cfg.Etcd.Embedded
		}
		switch {
		case prev != nil && !reflect.DeepEqual(prevEmb, e.Embedded):
			return nil, errors.New("registries.etcd.embedded cannot change on reload; restart rota to apply it")
		case prev != nil:
			r.embedded = prev.embedded
		case e.Embedded != nil && deferEmbedded:
			logger.Info("embedded etcd: the process this one takes over from still runs it; starting it once that one lets go",
				zap.Strings("endpoints", e.ClientEndpoints()))
		case e.Embedded != nil:
			srv, err := embedetcd.Start(ctx, embeddedConfig(e.Embedded, logger))
			if err != nil {
				return nil, fmt.Errorf("embedded etcd: %w", err)
			}
			logger.Info("embedded etcd ready", zap.Strings("endpoints", srv.Endpoints()),
				zap.String("data_dir", e.Embedded.DataDir))
			r.embedded = srv
		}
		endpoints := e.ClientEndpoints()
		if r.embedded != nil && (len(e.Endpoints) == 0 || reflect.DeepEqual(endpoints, embeddedDefault(e))) {
			// The server may have picked its port (":0"); ask it.
			endpoints = r.embedded.Endpoints()
		}
		c, err := etcd.NewClient(etcd.Config{
			Endpoints:    endpoints,
			Username:     e.Username,
			PasswordFile: e.PasswordFile,
			TLS:          etcd.TLSConfig{CAFile: e.TLS.CAFile, CertFile: e.TLS.CertFile, KeyFile: e.TLS.KeyFile},
			Logger:       logger.Named("etcd-client"),
		})
		if err != nil {
			if prev == nil && r.embedded != nil {
				r.embedded.Close()
			}
			return nil, fmt.Errorf("registries.etcd: %w", err)
		}
		r.etcd = c
		r.steer = etcd.NewSteering(c, logger.Named("etcd-client"))
		r.etcdFleet = startFleetWatch(&fleet.Etcd{Client: c, Root: fleet.Root(e.Prefix), Log: logger.Named("fleet")},
			applyFleet, logger.Named("fleet"))
		r.etcdFleet.waitFirst()
	} else if prev != nil && prev.embedded != nil {
		return nil, errors.New("registries.etcd.embedded cannot be removed on reload; restart rota to apply it")
	}
	if c := cfg.Consul; c != nil {
		cr, err := openConsul(*c, logger.Named("consul"))
		if err != nil {
			r.closeUnshared(prev)
			return nil, fmt.Errorf("registries.consul: %w", err)
		}
		r.consul = cr
		r.consulFleet = startFleetWatch(&fleet.Consul{Client: cr.client.API, Log: logger.Named("fleet")},
			applyFleet, logger.Named("fleet"))
		r.consulFleet.waitFirst()
	}
	return r, nil
}

// embeddedConfig is the embedded server's configuration.
func embeddedConfig(e *config.Embedded, logger *zap.Logger) embedetcd.Config {
	return embedetcd.Config{
		DataDir:   e.DataDir,
		ClientURL: e.ClientURL,
		TLS: embedetcd.TLS{CertFile: e.TLS.CertFile, KeyFile: e.TLS.KeyFile,
			ClientCAFile: e.TLS.ClientCAFile},
		Logger: logger,
	}
}

// embeddedDefault is the endpoint list Parse derives from the embedded
// server's client URL.
func embeddedDefault(e *config.Etcd) []string {
	cp := *e
	cp.Endpoints = nil
	return cp.ClientEndpoints()
}

// watcher builds the discovery watcher of one pool; log names its
// listener (and route).
func (r *registries) watcher(lc config.Pool, log *zap.Logger) (discovery.Watcher, error) {
	log = log.Named("discovery")
	switch lc.Discovery {
	case "static":
		ins := make([]discovery.Instance, len(lc.Static))
		named := false
		for i, st := range lc.Static {
			ins[i] = discovery.Instance{Addr: st.Addr, Weight: st.Weight, Backup: st.Backup}
			if _, err := netip.ParseAddrPort(st.Addr); err != nil {
				named = true
			}
		}
		if !named {
			return static.Watcher{Instances: ins}, nil
		}
		// A host name is every address it has, looked up again every
		// refresh: five replicas behind one name are five targets.
		ts := make([]dns.Target, len(lc.Static))
		for i, st := range lc.Static {
			ts[i] = dns.Target{Addr: st.Addr, Weight: st.Weight, Backup: st.Backup}
		}
		return dns.NewStatic(ts, r.cfg.DNS, log)
	case "dns":
		return dns.NewWatcher(lc.Service, lc.Port.Number, r.cfg.DNS, log)
	case "docker":
		d := r.cfg.Docker
		return docker.NewWatcher(
			docker.Config{Host: d.Host, CAFile: d.TLS.CAFile, CertFile: d.TLS.CertFile, KeyFile: d.TLS.KeyFile},
			docker.Match{Service: lc.Service, Compose: lc.Docker.Match == config.MatchCompose, Network: lc.Docker.Network, Port: lc.Port.Number},
			log)
	case "kubernetes":
		name, err := kubernetes.ParseName(lc.Service)
		if err != nil {
			return nil, err
		}
		// One client per watcher: client-go shares the connections of
		// clients of one configuration.
		cl, err := kubernetes.NewClient(kubernetes.Config{Kubeconfig: r.cfg.Kubernetes.Kubeconfig, Context: r.cfg.Kubernetes.Context})
		if err != nil {
			return nil, err
		}
		return kubernetes.NewWatcher(cl, name, kubernetes.Port{Number: lc.Port.Number, Name: lc.Port.Name}, log)
	case "etcd":
		if r.etcd == nil {
			return nil, errors.New("discovery etcd needs registries.etcd")
		}
		w, err := etcd.NewWatcher(r.etcd, r.cfg.Etcd.Prefix, lc.Service, log)
		if err != nil {
			return nil, err
		}
		w.Steer = r.steer
		return w, nil
	case "consul":
		if r.consul == nil {
			return nil, errors.New("discovery consul needs registries.consul")
		}
		return r.consul.watcher(lc, log)
	}
	return nil, fmt.Errorf("unknown discovery %q", lc.Discovery)
}

// closeUnshared closes the clients of r that other does not also hold.
func (r *registries) closeUnshared(other *registries) {
	if r == nil {
		return
	}
	if r.etcd != nil && (other == nil || other.etcd != r.etcd) {
		r.etcdFleet.stop()
		r.steer.Close()
		r.etcd.Close()
	}
	if r.consul != nil && (other == nil || other.consul != r.consul) {
		if r.consulFleet != nil {
			r.consulFleet.stop()
		}
		r.consul.close()
	}
	if r.embedded != nil && (other == nil || other.embedded != r.embedded) {
		r.embedded.Close()
	}
}

func (r *registries) close() { r.closeUnshared(nil) }
