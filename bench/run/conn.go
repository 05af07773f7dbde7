package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// benchConn is issue 30's measurement: keep-alive and new-connection
// request rates, p99 and CPU per request for rota and HAProxy (and the
// baseline, when given) at one and two threads, with the clients straight
// to the backends as the physical limit: many interleaved repetitions,
// every sample kept for the report.
func benchConn(o *options, res results, targets []string) {
	contenders := []string{"rota", "haproxy"}
	if o.baseline != "" {
		contenders = append(contenders, "baseline")
	}
	contenders = append(contenders, "direct")
	reps := 6
	if o.quick {
		reps = 2
	}
	interleaved(o, "conn", []int{1, 2}, reps, contenders, targets, func(th int, px string, p *proc) {
		for _, close := range []bool{false, true} {
			mode := map[bool]string{false: "ka", true: "close"}[close]
			wrkInto(res, p, px, o.dur, close, "conn", th, mode)
		}
	})
}

// interleaved starts each of kinds at each thread count, reps times,
// each repetition starting with a different one, and hands each running
// proxy to measure; a proxy that does not start is logged and skipped.
func interleaved(o *options, what string, threads []int, reps int, kinds, targets []string, measure func(th int, px string, p *proc)) {
	for _, th := range threads {
		for rep := range reps {
			for _, px := range rotated(kinds, rep) {
				logf("%s, %d thread(s), rep %d: %s", what, th, rep+1, px)
				p, err := startProxy(px, th, targets, o, true)
				if err != nil {
					logf("  %v", err)
					continue
				}
				measure(th, px, p)
				p.stop()
			}
		}
	}
}

// wrkInto runs wrk through p for d (a new connection per request with
// closeEach) and adds its rate, p99, TCP segments per request and, for a
// proxy, CPU per request under key(prefix..., "rps"|"p99"|"segs"|"cpu", px).
func wrkInto(res results, p *proc, px string, d time.Duration, closeEach bool, prefix ...any) {
	cpu0, segs0 := p.cpu(), tcpOutSegs()
	m, err := wrk(p.addr, 64, d, closeEach)
	if err != nil {
		logf("  %v", err)
		return
	}
	at := func(what string) string { return key(append(prefix, what, px)...) }
	res.add(at("rps"), m.rps)
	res.add(at("p99"), m.p99)
	if segs1 := tcpOutSegs(); segs0 > 0 && m.n > 0 {
		res.add(at("segs"), float64(segs1-segs0)/m.n)
	}
	if px != "direct" && m.n > 0 {
		res.add(at("cpu"), (p.cpu()-cpu0)*1e6/m.n)
	}
}

// tcpOutSegs is the count of TCP segments sent in this network namespace
// (/proc/net/snmp, Tcp OutSegs), or 0 if it cannot be read. Every end of
// a bench connection is here, so per request it is the segments both legs
// cost: a count the machine's noise does not move, unlike the rates.
func tcpOutSegs() float64 {
	b, err := os.ReadFile("/proc/net/snmp")
	if err != nil {
		return 0
	}
	var names []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "Tcp:" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		if i := slices.Index(names, "OutSegs"); i > 0 && i < len(f) {
			var n float64
			fmt.Sscan(f[i], &n)
			return n
		}
	}
	return 0
}

// renderConn is benchConn's part of the report.
func renderConn(b *strings.Builder, o *options, res results) {
	if _, ok := res.median(key("conn", 1, "close", "rps", "rota")); !ok {
		return
	}
	cols := []string{"direct", "rota", "haproxy"}
	if o.baseline != "" {
		cols = append(cols, "baseline")
	}
	rows := []struct {
		mode, what, label string
		lower             bool
	}{
		{"ka", "rps", "keep-alive req/s", false}, {"ka", "p99", "keep-alive p99 (ms)", true}, {"ka", "cpu", "CPU per keep-alive request (µs)", true},
		{"close", "rps", "new connection per request, req/s", false}, {"close", "p99", "new connection p99 (ms)", true}, {"close", "cpu", "CPU per new-connection request (µs)", true},
		{"ka", "segs", "TCP segments per keep-alive request (both legs)", true}, {"close", "segs", "TCP segments per new-connection request (both legs)", true},
	}
	for _, th := range []int{1, 2} {
		fmt.Fprintf(b, "\n## Connections, %d thread(s) each (wrk -t1 -c64, interleaved; median, min-max)\n\n|  |", th)
		for _, px := range cols {
			fmt.Fprintf(b, " %s |", proxyTitle[px])
		}
		b.WriteString(" rota/HAProxy | rota/direct |")
		if o.baseline != "" {
			b.WriteString(" rota/baseline |")
		}
		b.WriteString("\n|---|" + strings.Repeat("---:|", len(cols)+2))
		if o.baseline != "" {
			b.WriteString("---:|")
		}
		b.WriteString("\n")
		for _, r := range rows {
			fmt.Fprintf(b, "| %s |", r.label)
			for _, px := range cols {
				k := key("conn", th, r.mode, r.what, px)
				fmt.Fprintf(b, " %s (%s) |", cell(res, k, "%.1f"), spread(res, k))
			}
			rota := key("conn", th, r.mode, r.what, "rota")
			fmt.Fprintf(b, " %s | %s |", ratioCell(res, rota, key("conn", th, r.mode, r.what, "haproxy"), r.lower),
				ratioCell(res, rota, key("conn", th, r.mode, r.what, "direct"), r.lower))
			if o.baseline != "" {
				fmt.Fprintf(b, " %s |", ratioCell(res, rota, key("conn", th, r.mode, r.what, "baseline"), r.lower))
			}
			b.WriteString("\n")
		}
		b.WriteString("\nSamples, in run order:\n\n")
		for _, r := range rows {
			for _, px := range cols {
				if v := res[key("conn", th, r.mode, r.what, px)]; len(v) > 0 {
					fmt.Fprintf(b, "- %s, %s: %s\n", r.label, proxyTitle[px], samples(v))
				}
			}
		}
	}
}

func samples(v []float64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = fmt.Sprintf("%.1f", x)
	}
	return strings.Join(s, " ")
}

// features are the settings that cost something on the data path or
// beside it, each measured beside its plain case in the same passes. With
// wrk (a new connection per request to three HTTP targets): the access
// log as JSON to a file (HAProxy: option tcplog to a file), a hash
// listener (balance source), and 1,000 targets checked with http (option
// httpchk) beside 1,000 with tcp checks. With the TLS load client (a full
// TLS 1.3 handshake per connection, 32 at once): a routed listener that
// reads the ClientHello's server name (HAProxy: req.ssl_sni) beside a
// plain one passing the same TLS through, and TLS termination (bind ...
// ssl) beside that same passthrough, where the backend does the handshake.
var features = []struct {
	name, rota, haproxy string
	targets             int
	tls                 string // the TLS load client's case; "": wrk
}{
	{"plain, 3 targets", "rota", "haproxy", 3, ""},
	{"access log, JSON to a file (HAProxy: tcplog to a file)", "rota+log", "haproxy+log", 3, ""},
	{"hash listener (client address), 3 targets", "rota+hash", "haproxy+hash", 3, ""},
	{"1,000 targets, tcp checks every 2 s", "rota", "haproxy", 1000, ""},
	{"1,000 targets, http checks every 2 s", "rota+http", "haproxy+http", 1000, ""},
	{"TLS clients: plain listener, passed through to a TLS backend", "rota", "haproxy", 1, "pass"},
	{"TLS clients: routed listener, 2 routes by SNI", "rota", "haproxy", 2, "routed"},
	{"TLS clients: TLS terminated (ECDSA P-256), plain to the backend", "rota", "haproxy", 1, "term"},
}

// featureTLS is what the TLS features need: TLS backends, the plain "ok"
// backend termination passes to, and the proxies' certificate.
type featureTLS struct {
	tlsBackends, okBackends *backendSet
	cert, key, both         string
}

func startFeatureTLS(o *options) (*featureTLS, error) {
	f := &featureTLS{}
	var err error
	if f.tlsBackends, err = tlsBackends(); err != nil {
		return nil, err
	}
	if f.okBackends, err = startBackendChild("-ok-backend-mode"); err != nil {
		f.tlsBackends.stop()
		return nil, err
	}
	dir := filepath.Join(o.tmp, "feature-cert")
	os.MkdirAll(dir, 0o755)
	if f.cert, f.key, f.both, err = termCert(dir); err != nil {
		f.stop()
		return nil, err
	}
	return f, nil
}

func (f *featureTLS) stop() {
	f.tlsBackends.stop()
	f.okBackends.stop()
}

// start starts kind (rota or haproxy) for the TLS case c.
func (f *featureTLS) start(c, kind string, o *options) (*proc, error) {
	switch c {
	case "pass":
		return startSNIProxy(kind+"+plain", f.tlsBackends.addrs, o)
	case "routed":
		return startSNIProxy(kind, f.tlsBackends.addrs, o)
	}
	return startTermProxy(kind, f.okBackends.addrs[0], "", f.cert, f.key, f.both, false, o)
}

// benchFeatures measures each feature's new-connection rate and CPU per
// connection at one thread, interleaved.
func benchFeatures(o *options, res results) {
	type run struct {
		kind string
		f    int
	}
	var runs []run
	for i, f := range features {
		runs = append(runs, run{f.rota, i}, run{f.haproxy, i})
	}
	ft, err := startFeatureTLS(o)
	if err != nil {
		logf("features: TLS backends: %v", err) // the TLS rows stay empty
	} else {
		defer ft.stop()
	}
	for rep := range o.reps {
		order := rotated(runs, rep)
		for _, r := range order {
			f := features[r.f]
			logf("features, rep %d: %s, %s", rep+1, r.kind, f.name)
			px := "rota"
			if strings.HasPrefix(r.kind, "haproxy") {
				px = "haproxy"
			}
			if f.tls == "" {
				p, err := startProxy(r.kind, 1, o.backends.addrs[:f.targets], o, true)
				if err != nil {
					logf("  %v", err)
					continue
				}
				wrkInto(res, p, px, o.dur, true, "feat", r.f)
				p.stop()
				continue
			}
			if ft == nil {
				continue
			}
			p, err := ft.start(f.tls, r.kind, o)
			if err != nil {
				logf("  %v", err)
				continue
			}
			mode := "" // passthrough: the backend's handshake
			if f.tls == "term" {
				mode = "full"
			}
			cpu0 := p.cpu()
			if m, err := tlsClient(p.addr, o.dur, 32, mode); err == nil {
				res.add(key("feat", r.f, "rps", px), m.RPS)
				if m.N > 0 {
					res.add(key("feat", r.f, "cpu", px), (p.cpu()-cpu0)*1e6/m.N)
				}
			} else {
				logf("  %v", err)
			}
			p.stop()
		}
	}
}

// renderFeatures is benchFeatures' part of the report.
func renderFeatures(b *strings.Builder, res results) {
	if _, ok := res.median(key("feat", 0, "rps", "rota")); !ok {
		return
	}
	b.WriteString("\n## What each feature costs (new connection per request, 1 thread each; median, min-max; against the plain row of its kind)\n\n")
	b.WriteString("wrk rows: 64 clients, three HTTP targets. TLS rows: the Go TLS load client, 32 clients, a full TLS 1.3 handshake per connection; the plain TLS row passes it through to a TLS backend.\n\n")
	b.WriteString("| case | rota req/s | rota CPU/conn (µs) | rota CPU/conn against plain | HAProxy req/s | HAProxy CPU/conn (µs) | HAProxy CPU/conn against plain | rota/HAProxy req/s | rota/HAProxy CPU |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	plain := map[string]int{"": 0, "pass": 5, "routed": 5, "term": 5}
	for i, f := range features {
		r, h := key("feat", i, "rps", "rota"), key("feat", i, "rps", "haproxy")
		rc, hc := key("feat", i, "cpu", "rota"), key("feat", i, "cpu", "haproxy")
		base := plain[f.tls]
		fmt.Fprintf(b, "| %s | %s (%s) | %s (%s) | %s | %s (%s) | %s (%s) | %s | %s | %s |\n", f.name,
			cell(res, r, "%.0f"), spread(res, r), cell(res, rc, "%.1f"), spread(res, rc),
			ratioCell(res, key("feat", base, "cpu", "rota"), rc, true),
			cell(res, h, "%.0f"), spread(res, h), cell(res, hc, "%.1f"), spread(res, hc),
			ratioCell(res, key("feat", base, "cpu", "haproxy"), hc, true),
			ratioCell(res, r, h, false), ratioCell(res, rc, hc, true))
	}
}

// rotated is a copy of s turned left by n: repetition n of an interleaved
// measurement starts with a different contender each time.
func rotated[T any](s []T, n int) []T {
	if len(s) == 0 {
		return nil
	}
	n %= len(s)
	return append(slices.Clone(s[n:]), s[:n]...)
}
