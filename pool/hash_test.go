package pool_test

import (
	"net/netip"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/pool"
)

// keyed maps 3,000 clients (by address) to their first target.
func keyed(p *pool.Pool) []string {
	out := make([]string, 3000)
	for i := range out {
		c := p.PickFor(netip.AddrFrom4([4]byte{10, 9, byte(i >> 8), byte(i)}), "")
		if t := c.Next(); t != nil {
			out[i] = t.Addr
		}
	}
	return out
}

// The hash policy with the pool's other features: a drained target's
// clients go elsewhere and only they move, and come back when it is
// undrained (and ramped up again); a target that joins while others serve takes its share of
// clients gradually (slow start); with every primary down, the backup
// takes every client.
func TestHashWithDrainSlowStartAndBackups(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := pool.New(pool.Config{Health: health.Config{Check: health.CheckNone}, Balance: balancer.Hash,
			HashBalanceFactor: 0, SlowStart: 10 * time.Second}, nil)
		defer p.Close()
		sink := p.NewSink()
		ins := []discovery.Instance{{Addr: "10.0.0.1:1"}, {Addr: "10.0.0.2:1"}, {Addr: "10.0.0.3:1"}, {Addr: "10.0.0.9:1", Backup: true}}
		sink.Update(discovery.Snapshot{Instances: discovery.SortInstances(ins)})
		p.Flush()
		base := keyed(p)
		for i, a := range base {
			if a == "10.0.0.9:1" || a == "" {
				t.Fatalf("client %d went to %q with every primary live", i, a)
			}
		}

		p.Drain("10.0.0.2:1", true)
		for i, a := range keyed(p) {
			switch {
			case a == "10.0.0.2:1":
				t.Fatalf("client %d still goes to the drained target", i)
			case base[i] != "10.0.0.2:1" && a != base[i]:
				t.Fatalf("client %d of %s moved to %s when another target was drained", i, base[i], a)
			}
		}
		p.Drain("10.0.0.2:1", false) // it ramps up again (slow start)
		time.Sleep(11 * time.Second)
		synctest.Wait()
		p.Flush()
		for i, a := range keyed(p) {
			if a != base[i] {
				t.Fatalf("client %d: %s after the undrain, %s before the drain", i, a, base[i])
			}
		}

		// A fourth target joins while the others serve: it ramps up.
		sink.Update(discovery.Snapshot{Instances: discovery.SortInstances(append(ins, discovery.Instance{Addr: "10.0.0.4:1"}))})
		p.Flush()
		share := func() float64 {
			n := 0
			for i, a := range keyed(p) {
				if a == "10.0.0.4:1" {
					n++
				} else if a != base[i] {
					t.Fatalf("client %d of %s moved to %s, not to the new target", i, base[i], a)
				}
			}
			return float64(n) / 3000
		}
		if s := share(); s > 0.05 {
			t.Fatalf("the new target took %.3f of the clients at once, want a small share while it ramps", s)
		}
		time.Sleep(11 * time.Second)
		synctest.Wait()
		p.Flush()
		if s := share(); s < 0.2 || s > 0.3 {
			t.Fatalf("after the slow start the new target has %.3f of the clients, want about 1/4", s)
		}

		for _, a := range []string{"10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1", "10.0.0.4:1"} {
			p.ReportFailure(a, nil)
		}
		p.Flush()
		for i, a := range keyed(p) {
			if a != "10.0.0.9:1" {
				t.Fatalf("client %d went to %q with every primary down, want the backup", i, a)
			}
		}
	})
}
