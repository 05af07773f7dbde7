package dns_test

import (
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rota-proxy/rota/discovery/dns"
	"github.com/rota-proxy/rota/internal/testenv"
)

// Consul's DNS interface, as a real agent serves it: SRV records carry the
// instances' ports and weights (Weights.Passing), and an instance whose
// check fails leaves the answer.
func TestConsulDNS(t *testing.T) {
	c := testenv.StartConsul(t)
	cl := c.Client(t)
	reg := func(id string, port, weight int) {
		t.Helper()
		err := cl.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: id, Name: "web", Port: port, Address: "127.0.0.1",
			Weights: &api.AgentWeights{Passing: weight, Warning: 1},
			Check:   &api.AgentServiceCheck{CheckID: "check-" + id, TTL: "1h", Status: "passing"},
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	reg("a", 9001, 3)
	reg("b", 9002, 1)
	w, err := dns.NewWatcher("_web._tcp.service.consul", 0, dns.Config{
		Resolvers: []string{c.DNSAddr()}, Refresh: 5 * time.Second, MinRefresh: 100 * time.Millisecond, Timeout: time.Second,
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := testenv.Watch(t, w)
	s := r.WaitAddrs(t, "both instances", "127.0.0.1:9001", "127.0.0.1:9002")
	for _, in := range s.Instances {
		if want := map[string]int{"127.0.0.1:9001": 3, "127.0.0.1:9002": 1}[in.Addr]; in.Weight != want {
			t.Errorf("%s: weight %d, want %d (its Weights.Passing)", in.Addr, in.Weight, want)
		}
	}
	if err := cl.Agent().UpdateTTL("check-b", "test", "critical"); err != nil {
		t.Fatal(err)
	}
	r.WaitAddrs(t, "b gone after its check failed", "127.0.0.1:9001")
	reg("c", 9003, 2)
	r.WaitAddrs(t, "c added", "127.0.0.1:9001", "127.0.0.1:9003")
}
