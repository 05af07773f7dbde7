package demo

import (
	"context"
	"net"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zaptest"

	"github.com/rota-proxy/rota/discovery/consul"
	"github.com/rota-proxy/rota/internal/testenv"
)

// passing returns the addresses of the passing instances of service, as
// rota's Consul discovery reads them.
func passing(t *testing.T, c *api.Client, service string) []string {
	t.Helper()
	entries, _, err := c.Health().Service(service, "", true, (&api.QueryOptions{}).WithContext(t.Context()))
	if err != nil {
		return []string{"error: " + err.Error()} // never equal to what a test waits for
	}
	var out []string
	for _, e := range entries {
		out = append(out, net.JoinHostPort(e.Service.Address, strconv.Itoa(e.Service.Port)))
	}
	slices.Sort(out)
	return out
}

// agentService returns the agent's registration of id, nil when it has none.
func agentService(t *testing.T, c *api.Client, id string) *api.AgentService {
	t.Helper()
	s, _, err := c.Agent().Service(id, (&api.QueryOptions{}).WithContext(t.Context()))
	if err != nil {
		return nil
	}
	return s
}

// TestServeBackendConsul: `rota demo-backend --consul`: registered with an
// HTTP check while it runs (and so passing), registered again after the
// agent restarted without its data, deregistered on ctx cancel, then
// ServeBackend returns nil.
func TestServeBackendConsul(t *testing.T) {
	agent := testenv.StartConsul(t)
	direct := agent.Client(t)
	b := startBackend(t, BackendOptions{
		Name:    "backend-c",
		Consul:  consul.ClientConfig{Address: agent.Addr()},
		Service: "web-consul",
	})
	addr := b.addr
	testenv.Eventually(t, "the backend passing in consul", wait, func() bool {
		return slices.Equal(passing(t, direct, "web-consul"), []string{addr})
	})
	id := ConsulServiceID("web-consul", addr)
	s := agentService(t, direct, id)
	if s == nil || s.Service != "web-consul" {
		t.Fatalf("agent service %s: %+v", id, s)
	}
	checks, err := direct.Agent().ChecksWithFilter(`ServiceID == "` + id + `"`)
	if err != nil {
		t.Fatal(err)
	}
	if len(checks) != 1 {
		t.Fatalf("checks of %s: %v", id, checks)
	}
	for _, c := range checks {
		if c.Type != "http" || c.Status != api.HealthPassing {
			t.Errorf("check %+v, want a passing HTTP check", c)
		}
	}

	// A dev agent restarted forgets every service: the backend notices
	// and registers again.
	agent.Kill()
	agent.Start()
	direct = agent.Client(t)
	testenv.Eventually(t, "the backend registered again after the agent restart", wait, func() bool {
		return slices.Equal(passing(t, direct, "web-consul"), []string{addr})
	})

	b.cancel()
	if err := b.wait(); err != nil {
		t.Fatalf("ServeBackend = %v, want nil", err)
	}
	if s := agentService(t, direct, id); s != nil {
		t.Errorf("service left registered after stop: %+v", s)
	}
	if got := passing(t, direct, "web-consul"); len(got) != 0 {
		t.Errorf("passing instances after stop: %v", got)
	}
	if !refused(addr) {
		t.Error("backend still accepts after ServeBackend returned")
	}
}

// TestConsulRegistrarTwoBackends: two backends of one service get two
// registrations (one ID per address), and removing one leaves the other.
func TestConsulRegistrarTwoBackends(t *testing.T) {
	agent := testenv.StartConsul(t)
	direct := agent.Client(t)
	f, err := StartFleet(t.Context(), FleetOptions{
		N:        2,
		Register: ConsulRegistrar(direct, "web", zaptest.NewLogger(t)),
		Logger:   zaptest.NewLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	want := f.Addrs()
	slices.Sort(want)
	testenv.Eventually(t, "both backends passing", wait, func() bool { return slices.Equal(passing(t, direct, "web"), want) })

	// A backend that stops answering turns critical and leaves the
	// passing set, while its registration stays until it deregisters.
	b := f.Backends()[0]
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	other := f.Backends()[1].Addr()
	testenv.Eventually(t, "the closed backend's check critical", wait, func() bool {
		return slices.Equal(passing(t, direct, "web"), []string{other})
	})
	if agentService(t, direct, ConsulServiceID("web", b.Addr())) == nil {
		t.Error("a failing backend lost its registration before it deregistered")
	}

	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	services, err := direct.Agent().Services()
	if err != nil {
		t.Fatal(err)
	}
	for id := range services {
		if strings.HasPrefix(id, "web-") {
			t.Errorf("%s still registered after the fleet stopped", id)
		}
	}
}

func TestConsulRegistrationInvalid(t *testing.T) {
	for _, c := range []struct{ service, addr string }{
		{"", "127.0.0.1:9000"},
		{"web", "nope"},
		{"web", "127.0.0.1:0"},
		{"web", "127.0.0.1:99999"},
		{"web", ":9000"},
	} {
		if _, err := consulRegistration(c.service, c.addr); err == nil {
			t.Errorf("consulRegistration(%q, %q) accepted", c.service, c.addr)
		}
	}
	if err := registerConsul(t.Context(), nil, "web", "127.0.0.1:9000", nil); err == nil {
		t.Error("nil client accepted")
	}
	r, err := consulRegistration("web", "10.0.0.5:9000")
	if err != nil {
		t.Fatal(err)
	}
	if r.ID != "web-10.0.0.5:9000" || r.Address != "10.0.0.5" || r.Port != 9000 ||
		r.Check.HTTP != "http://10.0.0.5:9000/healthz" || r.Check.Interval != "1s" ||
		r.Check.DeregisterCriticalServiceAfter != "1m0s" || r.Check.Status != api.HealthPassing ||
		r.Check.FailuresBeforeCritical != 2 {
		t.Errorf("registration %+v, check %+v", r, r.Check)
	}
}

// TestConsulRegistrarAgentDown: with no agent to reach, the registrar
// keeps retrying without failing the backend, and returns nil once ctx is
// done.
func TestConsulRegistrarAgentDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := ln.Addr().String()
	ln.Close() // nothing listens there now: connections are refused
	c, err := consul.NewClient(consul.ClientConfig{Address: down})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- ConsulRegistrar(c.API, "web", zaptest.NewLogger(t))(ctx, "127.0.0.1:9000") }()
	select {
	case err := <-done:
		t.Fatalf("registrar gave up with the agent down: %v", err)
	case <-time.After(300 * time.Millisecond): // a few retries' worth; the registrar must still run
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("registrar = %v, want nil after ctx done", err)
		}
	case <-time.After(wait):
		t.Fatal("registrar did not return after ctx done")
	}
}
