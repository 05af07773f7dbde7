package server

import (
	"context"
	"crypto/tls"
	"errors"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/discovery/consul"
)

// consulRegistry is the shared Consul client of all consul listeners, and
// the Connect identities (leaf certificates) their connect pools dial as.
type consulRegistry struct {
	client *consul.Client
	log    *zap.Logger

	mu      sync.Mutex // guards connect; never held across a wait
	connect map[string]*consul.ConnectTLS
}

func openConsul(cfg config.Consul, log *zap.Logger) (*consulRegistry, error) {
	c, err := consul.NewClient(consul.ClientConfig{
		Address: cfg.Address, Datacenter: cfg.Datacenter, TokenFile: cfg.TokenFile,
	})
	if err != nil {
		return nil, err
	}
	return &consulRegistry{client: c, log: log, connect: map[string]*consul.ConnectTLS{}}, nil
}

func (c *consulRegistry) watcher(lc config.Pool, log *zap.Logger) (discovery.Watcher, error) {
	w, err := consul.NewWatcher(c.client.API, lc.Service, lc.Tags, log)
	if err != nil {
		return nil, err
	}
	w.Connect = lc.Connect
	return w, nil
}

// connectReadyTimeout bounds the wait for a new Connect identity's first
// leaf certificate and roots; past it, dials fail until they come.
const connectReadyTimeout = 10 * time.Second

// connectTLS is the TLS configuration that dials the Connect service
// lc.Service as lc.ConnectService (default "rota"), following that leaf
// certificate from the agent (started on first use, waited for a while).
func (c *consulRegistry) connectTLS(lc config.Pool) (*tls.Config, error) {
	name := lc.ConnectService
	if name == "" {
		name = "rota"
	}
	c.mu.Lock()
	ct, ok := c.connect[name]
	if !ok {
		ct = consul.StartConnectTLS(c.client.API, name, c.log)
		c.connect[name] = ct
	}
	c.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), connectReadyTimeout)
	defer cancel()
	if err := ct.WaitReady(ctx); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			c.log.Warn("consul connect: no leaf certificate yet; dials to Connect services fail until the agent gives one", zap.Error(err))
		} else {
			return nil, err
		}
	}
	return ct.ClientConfig(lc.Service), nil
}

func (c *consulRegistry) close() {
	c.mu.Lock()
	cts := c.connect
	c.connect = nil
	c.mu.Unlock()
	for _, ct := range cts {
		ct.Close()
	}
	c.client.Close()
}
