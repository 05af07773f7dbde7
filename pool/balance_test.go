package pool_test

import (
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/pool"
)

func weighted(pairs ...any) discovery.Snapshot {
	var ins []discovery.Instance
	for i := 0; i < len(pairs); i += 2 {
		ins = append(ins, discovery.Instance{Addr: pairs[i].(string), Weight: pairs[i+1].(int)})
	}
	return discovery.Snapshot{Instances: discovery.SortInstances(ins)}
}

// split picks n times (each pick counted as a new connection) and returns
// the picks per address.
func split(p *pool.Pool, n int) map[string]int {
	out := map[string]int{}
	for range n {
		c := p.Pick()
		t := c.Next()
		if t == nil {
			out[""]++
			continue
		}
		t.Total.Add(1)
		out[t.Addr]++
	}
	return out
}

func target(p *pool.Pool, addr string) pool.TargetView {
	for _, tv := range p.View().Targets {
		if tv.Addr == addr {
			return tv
		}
	}
	return pool.TargetView{}
}

// Registry weights set the round-robin split exactly, and a weight changed
// by the registry applies with the next snapshot.
func TestRegistryWeights(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := trusted(0)
		defer p.Close()
		sink := p.NewSink()
		sink.Update(weighted("10.0.0.1:1", 1, "10.0.0.2:1", 2, "10.0.0.3:1", 3))
		p.Flush()
		got := split(p, 6000)
		if got["10.0.0.1:1"] != 1000 || got["10.0.0.2:1"] != 2000 || got["10.0.0.3:1"] != 3000 {
			t.Fatalf("split %v, want 1000/2000/3000", got)
		}
		if tv := target(p, "10.0.0.3:1"); tv.Weight != 3 || tv.EffectiveWeight != 3 {
			t.Fatalf("view weight %d effective %v, want 3 and 3", tv.Weight, tv.EffectiveWeight)
		}
		sink.Update(weighted("10.0.0.1:1", 1, "10.0.0.2:1", 1, "10.0.0.3:1", 1))
		p.Flush()
		got = split(p, 3000)
		if got["10.0.0.1:1"] != 1000 || got["10.0.0.2:1"] != 1000 || got["10.0.0.3:1"] != 1000 {
			t.Fatalf("after the weights changed: split %v, want 1000 each", got)
		}
	})
}

// A target that turns live while others serve ramps from a small share to
// its full weight over SlowStart; the targets the pool starts with do not.
func TestSlowStart(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := pool.New(pool.Config{Health: health.Config{Check: health.CheckNone}, SlowStart: 10 * time.Second}, nil)
		defer p.Close()
		sink := p.NewSink()
		sink.Update(weighted("10.0.0.1:1", 1, "10.0.0.2:1", 1))
		p.Flush()
		if tv := target(p, "10.0.0.2:1"); tv.EffectiveWeight != 1 {
			t.Fatalf("a target of the first answer ramps: effective weight %v", tv.EffectiveWeight)
		}
		sink.Update(weighted("10.0.0.1:1", 1, "10.0.0.2:1", 1, "10.0.0.3:1", 1))
		p.Flush()
		const fresh = "10.0.0.3:1"
		if tv := target(p, fresh); tv.EffectiveWeight != 0.05 {
			t.Fatalf("a new target starts at effective weight %v, want 0.05", tv.EffectiveWeight)
		}
		// The first fifth of the window: well under its third.
		var early, earlyAll int
		for range 4 {
			got := split(p, 1000)
			early += got[fresh]
			earlyAll += 1000
			time.Sleep(500 * time.Millisecond)
			synctest.Wait()
			p.Flush()
		}
		if share := float64(early) / float64(earlyAll); share > 0.15 {
			t.Fatalf("share in the first fifth of the slow start %.3f, want well under 1/3", share)
		}
		mid := target(p, fresh).EffectiveWeight
		if mid < 0.15 || mid > 0.25 {
			t.Fatalf("effective weight after 2s of 10s: %v, want about 0.2", mid)
		}
		time.Sleep(8 * time.Second)
		synctest.Wait()
		p.Flush()
		if tv := target(p, fresh); tv.EffectiveWeight != 1 {
			t.Fatalf("effective weight after the slow start %v, want 1", tv.EffectiveWeight)
		}
		if got := split(p, 3000); got[fresh] != 1000 {
			t.Fatalf("after the slow start: split %v, want 1000 each", got)
		}
	})
}

// retirements records what Retired is told.
type retirements struct {
	mu  sync.Mutex
	got []string
}

func (r *retirements) note(t *balancer.Target, why balancer.Reason) {
	r.mu.Lock()
	r.got = append(r.got, t.Addr+" "+why.String())
	r.mu.Unlock()
}

func (r *retirements) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.got
	r.got = nil
	return out
}

// Draining takes a target out of the picker (it stays in the view, marked),
// survives the target leaving and coming back, and undraining restores it;
// Retired hears of each change, and of removals and failures.
func TestDrainAndRetired(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var r retirements
		p := pool.New(pool.Config{Health: health.Config{Check: health.CheckNone}, Retired: r.note}, nil)
		defer p.Close()
		sink := p.NewSink()
		sink.Update(weighted("10.0.0.1:1", 1, "10.0.0.2:1", 1))
		p.Flush()
		if got := r.take(); len(got) != 0 {
			t.Fatalf("retired at start: %v", got)
		}
		p.Drain("10.0.0.2:1", true)
		if got := split(p, 100); got["10.0.0.2:1"] != 0 || got["10.0.0.1:1"] != 100 {
			t.Fatalf("a drained target is picked: %v", got)
		}
		if tv := target(p, "10.0.0.2:1"); !tv.Draining {
			t.Fatal("the view does not show the drain")
		}
		sink.Update(weighted("10.0.0.1:1", 1))
		p.Flush()
		sink.Update(weighted("10.0.0.1:1", 1, "10.0.0.2:1", 1))
		p.Flush()
		if got := split(p, 100); got["10.0.0.2:1"] != 0 {
			t.Fatalf("the drain was lost when the target left and came back: %v", got)
		}
		p.Drain("10.0.0.2:1", false)
		if got := split(p, 100); got["10.0.0.2:1"] != 50 {
			t.Fatalf("after undrain: %v", got)
		}
		// Once removed, the drained target has no connections: it is
		// followed again when it serves.
		want := []string{"10.0.0.2:1 drained", "10.0.0.2:1 removed"}
		if got := r.take(); !equal(got, want) {
			t.Fatalf("Retired told %q, want %q", got, want)
		}
		p.ReportFailure("10.0.0.1:1", nil)
		p.Flush()
		if got := r.take(); !equal(got, []string{"10.0.0.1:1 down"}) {
			t.Fatalf("after a failed dial Retired told %q", got)
		}
	})
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// The history holds a target's new connections second by second.
func TestHistory(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := trusted(0)
		defer p.Close()
		p.NewSink().Update(weighted("10.0.0.1:1", 1))
		p.Flush()
		for i := range 3 {
			split(p, 10*(i+1))
			time.Sleep(time.Second)
			synctest.Wait()
		}
		p.Flush()
		h := target(p, "10.0.0.1:1").History
		got := h.Samples()
		if len(got) != 3 || got[0] != 10 || got[1] != 20 || got[2] != 30 || h.Sum() != 60 {
			t.Fatalf("history %v (sum %d), want [10 20 30]", got, h.Sum())
		}
		time.Sleep(100 * time.Second)
		synctest.Wait()
		if got := h.Samples(); len(got) != 60 || h.Sum() != 0 {
			t.Fatalf("after 100 idle seconds: %d samples, sum %d; want 60 and 0", len(got), h.Sum())
		}
	})
}

// An upgrade hands a pool the instances and slow-start progress of the
// process it takes over from: the pool is synced before its watch answers,
// a target halfway through its ramp goes on from there (not from the
// start, nor at full weight), and Handover reads back what was seeded.
func TestSeededDiscoveryAndRamp(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := pool.New(pool.Config{Health: health.Config{Check: health.CheckNone}, SlowStart: 10 * time.Second}, nil)
		defer p.Close()
		ins := weighted("10.0.0.1:1", 1, "10.0.0.2:1", 1).Instances
		p.SeedDiscovery(ins, map[string]time.Time{"10.0.0.2:1": time.Now().Add(-5 * time.Second)})
		p.Flush()
		if !p.Discovery().Synced {
			t.Fatal("not synced by the seed")
		}
		if w := target(p, "10.0.0.2:1").EffectiveWeight; w < 0.4 || w > 0.6 {
			t.Fatalf("the ramping target's effective weight %v, want about half", w)
		}
		if w := target(p, "10.0.0.1:1").EffectiveWeight; w != 1 {
			t.Fatalf("the other's %v, want 1", w)
		}
		got, ramps := p.Handover()
		if len(got) != 2 || got[0].Addr != "10.0.0.1:1" || len(ramps) != 1 || ramps["10.0.0.2:1"].IsZero() {
			t.Fatalf("Handover: %v, %v", got, ramps)
		}
		// The watch's first answer replaces the seed.
		p.NewSink().Update(weighted("10.0.0.1:1", 1))
		p.Flush()
		if got, _ := p.Handover(); len(got) != 1 {
			t.Fatalf("after the watch's answer: %v", got)
		}
	})
}

// TestRegistryDrain: an instance its registry marks Draining (a
// terminating Kubernetes endpoint) takes no new connections, shows as
// drained by the registry, and is told to Retired as drained, then
// removed when it leaves.
func TestRegistryDrain(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var r retirements
		p := pool.New(pool.Config{Health: health.Config{Check: health.CheckNone}, Retired: r.note}, nil)
		defer p.Close()
		sink := p.NewSink()
		sink.Update(discovery.Snapshot{Instances: []discovery.Instance{{Addr: "10.0.0.1:1"}, {Addr: "10.0.0.2:1"}}})
		p.Flush()
		split(p, 10) // both serve: Retired follows them
		sink.Update(discovery.Snapshot{Instances: []discovery.Instance{{Addr: "10.0.0.1:1"}, {Addr: "10.0.0.2:1", Draining: true}}})
		p.Flush()
		if got := split(p, 100); got["10.0.0.2:1"] != 0 || got["10.0.0.1:1"] != 100 {
			t.Fatalf("a draining instance is picked: %v", got)
		}
		if tv := target(p, "10.0.0.2:1"); !tv.Draining || tv.DrainSource != "registry" {
			t.Fatalf("view: draining %v, source %q", tv.Draining, tv.DrainSource)
		}
		sink.Update(discovery.Snapshot{Instances: []discovery.Instance{{Addr: "10.0.0.1:1"}}})
		p.Flush()
		if got, want := r.take(), []string{"10.0.0.2:1 drained", "10.0.0.2:1 removed"}; !equal(got, want) {
			t.Fatalf("Retired told %q, want %q", got, want)
		}
	})
}
