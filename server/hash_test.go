package server_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
)

// Two rotas with the same targets send each client (by address) to the
// same target, and a target added to both moves about its share of the
// clients: balance: hash, the clients on 1,000 loopback addresses.
func TestHashSameTargetOnTwoProxies(t *testing.T) {
	bs := []*backend{startBackend(t, "b1"), startBackend(t, "b2"), startBackend(t, "b3"), startBackend(t, "b4")}
	cfgOf := func(n int) *config.Config {
		cfg := config.Default()
		cfg.Admin.Listen = ""
		var addrs []string
		for _, b := range bs[:n] {
			addrs = append(addrs, b.Addr)
		}
		l := fastListener("h", addrs...)
		l.Balance = config.BalanceHash
		// Unbounded: with bounded load a key's target depends on the
		// connections open at that moment (a client's last connection
		// not yet closed in rota when its next comes), which this test
		// does not control; balancer's tests cover the bound.
		l.HashBalanceFactor = 0
		cfg.Listeners = []config.Listener{l}
		return cfg
	}
	a, b := startServer(t, cfgOf(3)), startServer(t, cfgOf(3))
	wantLive := func(n int) {
		t.Helper()
		testenv.Eventually(t, fmt.Sprintf("%d live on both", n), 10*time.Second, func() bool { return liveCount(a, "h") == n && liveCount(b, "h") == n })
	}
	wantLive(3)
	aAddr, bAddr := proxyAddr(t, a, "h"), proxyAddr(t, b, "h")

	const clients = 1000
	src := func(i int) string { return fmt.Sprintf("127.1.%d.%d", i/250, i%250+1) }
	mapping := func(addr string) []string {
		out := make([]string, clients)
		for i := range out {
			name, err := testenv.RequestFrom(src(i), addr)
			if err != nil {
				t.Fatalf("client %s: %v", src(i), err)
			}
			out[i] = name
		}
		return out
	}
	onA, onB := mapping(aAddr), mapping(bAddr)
	for i := range onA {
		if onA[i] != onB[i] {
			t.Fatalf("client %s: %s through one rota, %s through the other", src(i), onA[i], onB[i])
		}
	}
	if again := mapping(aAddr); fmt.Sprint(again) != fmt.Sprint(onA) {
		t.Fatal("the same rota sent a client elsewhere the second time")
	}

	for _, s := range []interface {
		Reload(context.Context, *config.Config) error
	}{a, b} {
		if err := s.Reload(context.Background(), cfgOf(4)); err != nil {
			t.Fatal(err)
		}
	}
	wantLive(4)
	after, afterB := mapping(aAddr), mapping(bAddr)
	moved := 0
	for i := range after {
		if after[i] != afterB[i] {
			t.Fatalf("after the reload, client %s: %s through one rota, %s through the other", src(i), after[i], afterB[i])
		}
		if after[i] != onA[i] {
			moved++
			if after[i] != "b4" {
				t.Errorf("client %s moved from %s to %s, not to the new target", src(i), onA[i], after[i])
			}
		}
	}
	ideal := clients / 4
	t.Logf("one target added to three: %d of %d clients moved (ideal %d, %.2fx)", moved, clients, ideal, float64(moved)/float64(ideal))
	if float64(moved) > 1.2*float64(ideal) || float64(moved) < 0.8*float64(ideal) {
		t.Errorf("%d of %d clients moved, want about %d (within 1.2x)", moved, clients, ideal)
	}
}
