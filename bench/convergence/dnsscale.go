package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/rota-proxy/rota/discovery/dns"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/internal/retry"
	"github.com/rota-proxy/rota/internal/testenv"
)

// runDNSScale measures discovery/dns with n records: n A records of one
// name (every address an instance on port 80), or n SRV records (each its
// own target host, its address as glue). It times the first resolution
// until every instance is routed, then the CPU of the process per
// refresh, with a 1 s TTL, for dur: first with the answer unchanged, then
// with one record replaced before every refresh. The DNS server runs in
// this process, so its share (packing n records, UDP then TCP) is
// included: an upper bound on rota's; rewriting the zone is not. Instances are never dialled
// (check: none).
func runDNSScale(ctx context.Context, o options, out io.Writer) error {
	log := newLogger(o.verbose)
	defer func() { _ = log.Sync() }()
	zone, err := testenv.NewZone()
	if err != nil {
		return err
	}
	defer zone.Close()
	n, srv := o.scale, o.registry == "dns-srv"
	name := "big.bench."
	if srv {
		name = "_big._tcp.bench."
	}
	gen := 0 // bumped to replace one record
	set := func() {
		var recs []string
		for i := range n {
			ip := fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255)
			if i == 0 {
				ip = fmt.Sprintf("10.255.%d.%d", gen>>8&255, gen&255)
			}
			if srv {
				host := fmt.Sprintf("h%d.bench.", i)
				zone.Set(host, fmt.Sprintf("%s 1 IN A %s", host, ip))
				recs = append(recs, fmt.Sprintf("%s 1 IN SRV 10 10 80 %s", name, host))
			} else {
				recs = append(recs, fmt.Sprintf("%s 1 IN A %s", name, ip))
			}
		}
		zone.Set(name, recs...)
	}
	set()
	port := 80
	if srv {
		port = 0
	}
	w, err := dns.NewWatcher(name, port, dns.Config{
		Resolvers: []string{zone.Addr()}, Refresh: 5 * time.Second, MinRefresh: time.Second, Timeout: 2 * time.Second,
	}, log)
	if err != nil {
		return err
	}
	start := time.Now()
	rt, err := startRouter(w, health.CheckNone, log)
	if err != nil {
		return err
	}
	defer rt.stop(log)
	for rt.live() != n {
		if time.Since(start) > time.Minute {
			return fmt.Errorf("%d instances routed after a minute, want %d", rt.live(), n)
		}
		time.Sleep(time.Millisecond) // polling the picker of this process
	}
	first := time.Since(start)

	// measure runs for dur, replacing one record every second when asked
	// to, and returns the CPU per refresh (one a second: the TTL) and the
	// queries the server answered per refresh.
	measure := func(change bool) (time.Duration, float64, error) {
		q0, cpu0, t0 := zone.Queries(), cpuTime(), time.Now()
		secs := int(o.dur.Seconds())
		for range secs {
			if change {
				// The bench's own work of writing the zone is not counted.
				c := cpuTime()
				gen++
				set()
				cpu0 += cpuTime() - c
			}
			if !retry.Sleep(ctx, time.Second) {
				return 0, 0, ctx.Err()
			}
		}
		if change {
			// The last change is routed: the replaced address is live.
			want := fmt.Sprintf("10.255.%d.%d:80", gen>>8&255, gen&255)
			for !rt.balancerHas(want) {
				if time.Since(t0) > o.dur+10*time.Second {
					return 0, 0, fmt.Errorf("the last change (%s) was not routed", want)
				}
				time.Sleep(10 * time.Millisecond) // polling the picker of this process
			}
		}
		cpu := cpuTime() - cpu0
		refreshes := time.Since(t0).Seconds()
		return time.Duration(float64(cpu) / refreshes), float64(zone.Queries()-q0) / refreshes, nil
	}
	same, qSame, err := measure(false)
	if err != nil {
		return err
	}
	changed, qChanged, err := measure(true)
	if err != nil {
		return err
	}
	kind := fmt.Sprintf("%d A records of one name", n)
	if srv {
		kind = fmt.Sprintf("%d SRV records, each target's address as glue", n)
	}
	fmt.Fprintf(out, "### DNS discovery at scale: %s\n\n", kind)
	fmt.Fprintf(out, "A DNS server on loopback (miekg/dns, in this process; UDP answers over 512 bytes truncated, so each refresh asks again over TCP), TTL 1 s; discovery/dns, health check none.\n\n")
	fmt.Fprintf(out, "| measurement | result |\n|---|---:|\n")
	fmt.Fprintf(out, "| first resolution -> all %d instances routed | **%v** |\n", n, first.Round(time.Millisecond))
	fmt.Fprintf(out, "| process CPU per refresh (one a second for %v), answer unchanged; the server's share included | **%.1f ms** (%.1f queries a refresh) |\n", o.dur, float64(same)/1e6, qSame)
	fmt.Fprintf(out, "| the same, one record replaced before each refresh (the last one routed) | **%.1f ms** (%.1f queries a refresh) |\n\n", float64(changed)/1e6, qChanged)
	return nil
}
