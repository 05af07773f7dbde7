package etcd

import (
	"slices"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"
)

// TestSteeringRefreshesRaceFree runs refreshes from two goroutines while
// one endpoint comes and goes: each refresh asks every endpoint (the etcd
// client dials it) while another may be changing the client's endpoint
// list, which etcd's client reads without its lock when it dials; -race
// found that in a cluster test. The list must end as the last answers say.
func TestSteeringRefreshesRaceFree(t *testing.T) {
	e := startEtcd(t)
	target := strings.TrimPrefix(e.Endpoints()[0], "http://")
	p1, p2 := startProxy(t, target), startProxy(t, target)
	eps := []string{"http://" + p1.addr(), "http://" + p2.addr()}
	c := newClient(t, eps)
	s := NewSteering(c, zap.NewNop()) // not the test log: its lock would order the goroutines
	t.Cleanup(s.Close)

	// Each goroutine flips one endpoint and refreshes, so both change the
	// list while the other asks.
	const rounds = 16
	flip := func(p *cutProxy) {
		for i := range rounds {
			if i%2 == 0 {
				p.set(refuse)
			} else {
				p.set(pass)
			}
			s.Refresh(0)
		}
	}
	var wg sync.WaitGroup
	wg.Go(func() { flip(p2) })
	flip(p1)
	wg.Wait()

	// The last round let both through again: a refresh puts them back.
	s.Refresh(0)
	if got := c.Endpoints(); !slices.Equal(got, eps) {
		t.Fatalf("endpoints after every member answers: %v, want %v", got, eps)
	}
	p1.set(refuse)
	s.Refresh(0)
	if got := c.Endpoints(); !slices.Equal(got, eps[1:]) {
		t.Fatalf("endpoints with the first refusing: %v, want %v", got, eps[1:])
	}
}
