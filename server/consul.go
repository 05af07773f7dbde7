package server

import (
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/discovery/consul"
)

// consulRegistry is the shared Consul client of all consul listeners.
type consulRegistry struct {
	client *consul.Client
}

func openConsul(cfg config.Consul) (*consulRegistry, error) {
	c, err := consul.NewClient(consul.ClientConfig{
		Address: cfg.Address, Datacenter: cfg.Datacenter, TokenFile: cfg.TokenFile,
	})
	if err != nil {
		return nil, err
	}
	return &consulRegistry{client: c}, nil
}

func (c *consulRegistry) watcher(lc config.Pool, log *zap.Logger) (discovery.Watcher, error) {
	return consul.NewWatcher(c.client.API, lc.Service, lc.Tags, log)
}

func (c *consulRegistry) close() { c.client.Close() }
