package demo

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/internal/retry"
)

// Timings of a Consul registration. The check interval lets Consul (and so
// rota, which reads only passing instances) see a dead backend within a
// couple of seconds; ConsulFailuresBeforeCritical keeps one probe delayed
// on a busy host from taking every backend out of the passing set at once
// (seen with a dozen containers on two shared cores).
// DeregisterCriticalServiceAfter removes a backend that crashed without
// deregistering; one minute is the shortest Consul honours.
const (
	ConsulCheckInterval          = time.Second
	ConsulCheckTimeout           = time.Second
	ConsulFailuresBeforeCritical = 2
	ConsulDeregisterCriticalAge  = time.Minute

	// consulResync is how often a registered backend asks its agent
	// whether it still holds the registration: a dev agent (or any agent
	// restarted without its data dir) forgets every service it had.
	consulResync = time.Second
	// consulRetryInitial and consulRetryMax bound the backoff between
	// failed registrations (agent down or starting).
	consulRetryInitial = 100 * time.Millisecond
	consulRetryMax     = 5 * time.Second
	// consulDeregisterTimeout bounds the deregistration after ctx is done.
	consulDeregisterTimeout = 3 * time.Second
)

// ConsulServiceID is the service ID a backend at addr registers as: one
// per address, so that instances on different hosts or ports never clash,
// and a backend restarted on the address of a crashed one replaces its
// stale registration instead of adding a second.
func ConsulServiceID(service, addr string) string { return service + "-" + addr }

// ConsulRegistrar returns a RegisterFunc that registers addresses as
// instances of service with the Consul agent behind client: Address and
// Port from the address, and an HTTP check of http://<addr>/healthz every
// ConsulCheckInterval (critical after ConsulFailuresBeforeCritical failures
// in a row). The registration starts as passing (the backend
// already answers when it registers), is registered again whenever the
// agent has lost it (an agent restarted without its data), is retried on
// capped exponential backoff while the agent is unreachable, and is
// removed when ctx is done. The caller keeps owning client.
func ConsulRegistrar(client *api.Client, service string, logger *zap.Logger) RegisterFunc {
	return func(ctx context.Context, addr string) error {
		return registerConsul(ctx, client, service, addr, logger)
	}
}

// consulRegistration builds the agent registration of a backend at addr.
func consulRegistration(service, addr string) (*api.AgentServiceRegistration, error) {
	if service == "" {
		return nil, errors.New("demo: consul registration needs a service name")
	}
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("demo: consul registration of %q: %w", addr, err)
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 1 || port > 65535 || host == "" {
		return nil, fmt.Errorf("demo: consul registration of %q: want host:port with a port in 1-65535", addr)
	}
	return &api.AgentServiceRegistration{
		ID:      ConsulServiceID(service, addr),
		Name:    service,
		Address: host,
		Port:    port,
		Check: &api.AgentServiceCheck{
			CheckID:                        "check-" + ConsulServiceID(service, addr),
			Name:                           "HTTP GET /healthz",
			HTTP:                           "http://" + net.JoinHostPort(host, p) + "/healthz",
			Method:                         http.MethodGet,
			Interval:                       ConsulCheckInterval.String(),
			Timeout:                        ConsulCheckTimeout.String(),
			Status:                         api.HealthPassing,
			FailuresBeforeCritical:         ConsulFailuresBeforeCritical,
			DeregisterCriticalServiceAfter: ConsulDeregisterCriticalAge.String(),
		},
	}, nil
}

func registerConsul(ctx context.Context, client *api.Client, service, addr string, logger *zap.Logger) error {
	if client == nil {
		return errors.New("demo: consul registration: nil client")
	}
	reg, err := consulRegistration(service, addr)
	if err != nil {
		return err
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	log := logger.Named("consul").With(zap.String("service", service), zap.String("service_id", reg.ID))
	agent := client.Agent()
	b := retry.New(consulRetryInitial, consulRetryMax)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()

	// attempted: a registration was sent, so one may exist even if its
	// answer was lost to ctx; deregistering then is harmless.
	registered, attempted := false, false
	for {
		wait := consulResync
		if !registered {
			attempted = true
			err := agent.ServiceRegisterOpts(reg, api.ServiceRegisterOpts{ReplaceExistingChecks: true}.WithContext(ctx))
			switch {
			case err == nil:
				registered = true
				b.Reset()
				log.Info("registered in consul", zap.String("check", reg.Check.HTTP))
			case ctx.Err() == nil:
				wait = b.Next()
				log.Warn("consul registration failed; retrying", zap.Error(err), zap.Duration("retry_in", wait))
			}
		} else if lost, err := consulLost(ctx, agent, reg.ID); lost {
			registered = false
			log.Warn("consul agent lost the registration (restarted without its data?); registering again", zap.Error(err))
			continue
		}
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			if attempted {
				deregisterConsul(ctx, agent, reg.ID, log)
			}
			return nil
		case <-timer.C:
		}
	}
}

// consulLost says whether the agent answered that it has no service id. An
// unreachable agent is not a loss: its registrations may come back with it,
// and the next ask after it is back tells.
func consulLost(ctx context.Context, agent *api.Agent, id string) (bool, error) {
	_, _, err := agent.Service(id, (&api.QueryOptions{}).WithContext(ctx))
	var se api.StatusError
	if errors.As(err, &se) && se.Code == http.StatusNotFound {
		return true, err
	}
	return false, err
}

// deregisterConsul removes the registration on a fresh short timeout, since
// ctx is already done. When the agent cannot be reached, the check turns
// critical once the backend stops, and Consul drops the service after
// ConsulDeregisterCriticalAge.
func deregisterConsul(ctx context.Context, agent *api.Agent, id string, log *zap.Logger) {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), consulDeregisterTimeout)
	defer cancel()
	err := agent.ServiceDeregisterOpts(id, (&api.QueryOptions{}).WithContext(dctx))
	var se api.StatusError
	switch {
	case errors.As(err, &se) && se.Code == http.StatusNotFound:
		log.Info("not registered in consul; nothing to deregister")
		return
	case err != nil:
		log.Warn("consul deregistration failed; the failing check removes the service", zap.Error(err))
		return
	}
	log.Info("deregistered from consul")
}
