package main

import (
	"context"
	"fmt"
	"net"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/discovery/dns"
	"github.com/rota-proxy/rota/internal/testenv"
)

// dnsRegistry is a DNS server on loopback (miekg/dns, in-process) holding
// an SRV record per backend, with a TTL of dnsTTL; rota's discovery/dns
// asks it for _web._tcp.bench. A write is acknowledged at once: what is
// measured is how soon rota asks again and routes the answer.
type dnsRegistry struct {
	zone    *testenv.Zone
	watcher *dns.Watcher

	mu    sync.Mutex
	ports []string // registered backends' ports, in order
}

const (
	dnsName = "_web._tcp.bench."
	dnsTTL  = time.Second
)

func startDNS(log *zap.Logger) (*dnsRegistry, error) {
	zone, err := testenv.NewZone()
	if err != nil {
		return nil, err
	}
	zone.Set("h.bench.", fmt.Sprintf("h.bench. %d IN A 127.0.0.1", int(dnsTTL.Seconds())))
	zone.Set(dnsName)
	w, err := dns.NewWatcher(dnsName, 0, dns.Config{
		Resolvers: []string{zone.Addr()}, Refresh: 5 * time.Second, MinRefresh: dnsTTL, Timeout: time.Second,
	}, log)
	if err != nil {
		zone.Close()
		return nil, err
	}
	return &dnsRegistry{zone: zone, watcher: w}, nil
}

func (r *dnsRegistry) Describe() string {
	return fmt.Sprintf("a DNS server on loopback (miekg/dns, in-process), SRV records with a %v TTL and their target's address as glue, discovery/dns (min_refresh %v)", dnsTTL, dnsTTL)
}

func (r *dnsRegistry) Watcher() discovery.Watcher { return r.watcher }

func (r *dnsRegistry) Register(_ context.Context, addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !slices.Contains(r.ports, port) {
		r.ports = append(r.ports, port)
	}
	r.publish()
	return nil
}

func (r *dnsRegistry) Deregister(_ context.Context, addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ports = slices.DeleteFunc(r.ports, func(p string) bool { return p == port })
	r.publish()
	return nil
}

// publish replaces the SRV records; r.mu is held.
func (r *dnsRegistry) publish() {
	recs := make([]string, 0, len(r.ports))
	for _, p := range r.ports {
		recs = append(recs, fmt.Sprintf("%s %d IN SRV 10 10 %s h.bench.", dnsName, int(dnsTTL.Seconds()), p))
	}
	r.zone.Set(dnsName, recs...)
}

// Close is called after every Watch has returned.
func (r *dnsRegistry) Close() { r.zone.Close() }
