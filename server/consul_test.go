package server_test

import (
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
)

func consulRegister(t *testing.T, c *api.Client, b *backend, status string) {
	t.Helper()
	host, port, _ := net.SplitHostPort(b.Addr)
	p, _ := strconv.Atoi(port)
	err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: b.Name, Name: "web", Address: host, Port: p,
		Check: &api.AgentServiceCheck{CheckID: "check-" + b.Name, TTL: "1h", Status: status},
	})
	if err != nil {
		t.Fatal(err)
	}
}

func consulConfig(addr string) *config.Config {
	cfg := config.Default()
	cfg.Registries.Consul = &config.Consul{Address: addr}
	l := fastListener("web")
	l.Discovery, l.Service, l.Static = "consul", "web", nil
	cfg.Listeners = []config.Listener{l}
	return cfg
}

func TestConsulDrivesRoutingAndSurvivesAgentLoss(t *testing.T) {
	agent := testenv.StartConsul(t)
	c := agent.Client(t)
	b1, b2, b3 := startBackend(t, "b1"), startBackend(t, "b2"), startBackend(t, "b3")
	consulRegister(t, c, b1, api.HealthPassing)
	consulRegister(t, c, b2, api.HealthCritical)
	srv := startServer(t, consulConfig(agent.Addr()))
	exactly(t, srv, "only the passing b1", "b1")

	if err := c.Agent().UpdateTTL("check-b2", "", api.HealthPassing); err != nil {
		t.Fatal(err)
	}
	t.Logf("check passing -> routed in %v", exactly(t, srv, "b2 routed", "b1", "b2"))
	if err := c.Agent().UpdateTTL("check-b1", "", api.HealthCritical); err != nil {
		t.Fatal(err)
	}
	t.Logf("check critical -> out of rotation in %v", exactly(t, srv, "b1 out", "b2"))
	if err := c.Agent().UpdateTTL("check-b1", "", api.HealthPassing); err != nil {
		t.Fatal(err)
	}
	exactly(t, srv, "b1 back", "b1", "b2")

	ld := startLoad(t, proxyAddr(t, srv, "web"), 6)
	agent.Kill()
	testenv.Eventually(t, "the outage seen", 20*time.Second, func() bool { return srv.Status()[0].DiscoveryErrors > 0 })
	before := ld.OK.Load()
	testenv.Eventually(t, "traffic during the outage", 10*time.Second, func() bool { return ld.OK.Load() > before+200 })
	if n := liveCount(srv, "web"); n != 2 {
		t.Fatalf("%d live targets during the outage, want the last good 2", n)
	}

	agent.Start() // fresh state: rota must follow what it now reports
	c = agent.Client(t)
	consulRegister(t, c, b3, api.HealthPassing)
	t.Logf("new agent's set routed in %v", exactly(t, srv, "b3 only, from the new agent", "b3"))
	ld.Stop()
	ld.AssertNoFailures(t)
	t.Logf("%d client connections across the agent loss, none failed", ld.OK.Load())
}
