package main

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"os"
	"runtime"
	"strings"
	"time"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

var proxyTitle = map[string]string{"direct": "direct", "rota": "rota", "baseline": "rota (baseline)", "haproxy": "HAProxy", "nginx": "nginx"}

type metric struct {
	key, label, unit string
	lowerBetter      bool
	format           string
}

var metrics = []metric{
	{"ka_rps", "keep-alive requests/s (64 conns)", "req/s", false, "%.0f"},
	{"ka_p50", "keep-alive p50 latency", "ms", true, "%.3f"},
	{"ka_p99", "keep-alive p99 latency", "ms", true, "%.3f"},
	{"close_rps", "new connection per request, req/s", "req/s", false, "%.0f"},
	{"close_p99", "new connection per request, p99", "ms", true, "%.3f"},
	{"ka_cpu", "proxy CPU per keep-alive request", "µs", true, "%.1f"},
	{"close_cpu", "proxy CPU per new-connection request", "µs", true, "%.1f"},
	{"bulk_gbps", "bulk single stream (iperf3)", "Gbit/s", false, "%.2f"},
	{"idle_kib", "idle memory per connection", "KiB", true, "%.1f"},
}

func cell(res results, k string, format string) string {
	if v, ok := res.median(k); ok {
		return fmt.Sprintf(format, v)
	}
	return "–"
}

// ratio is rota/other, oriented so that > 1 means rota is better.
func ratio(res results, a, b string, lowerBetter bool) (float64, bool) {
	x, ok1 := res.median(a)
	y, ok2 := res.median(b)
	if !ok1 || !ok2 || x == 0 || y == 0 {
		return 0, false
	}
	if lowerBetter {
		return y / x, true
	}
	return x / y, true
}

func ratioCell(res results, a, b string, lowerBetter bool) string {
	if r, ok := ratio(res, a, b, lowerBetter); ok {
		return fmt.Sprintf("%.2fx", r)
	}
	return "–"
}

func renderReport(o *options, res results, took time.Duration) string {
	var b strings.Builder
	host, _ := os.Hostname()
	fmt.Fprintf(&b, "# rota benchmark, %s\n\n", time.Now().Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(&b, "Host `%s`, %d CPUs, %s. Mode: %s, %d repetition(s) interleaved, median shown; %v per measurement; run took %v.\n\n",
		host, runtime.NumCPU(), runtime.Version(), map[bool]string{true: "quick", false: "full"}[o.quick], o.reps, o.dur, took.Round(time.Second))
	b.WriteString("Ratios are oriented so that **> 1.00x means rota is better** (for latency, memory and CPU: the other's value divided by rota's).\n\n")
	b.WriteString("<!--chart-->\n")
	for _, th := range o.threads {
		fmt.Fprintf(&b, "## %d thread(s) each (GOMAXPROCS=%d, nbthread %d, worker_processes %d)\n\n", th, th, th, th)
		b.WriteString("| metric |")
		for _, px := range o.proxies {
			fmt.Fprintf(&b, " %s |", proxyTitle[px])
		}
		b.WriteString(" rota/HAProxy | rota/nginx | rota/direct |")
		if o.baseline != "" {
			b.WriteString(" rota/baseline |")
		}
		b.WriteString("\n|---|" + strings.Repeat("---:|", len(o.proxies)+3))
		if o.baseline != "" {
			b.WriteString("---:|")
		}
		b.WriteString("\n")
		for _, m := range metrics {
			fmt.Fprintf(&b, "| %s (%s) |", m.label, m.unit)
			for _, px := range o.proxies {
				fmt.Fprintf(&b, " %s |", cell(res, key(th, m.key, px), m.format))
			}
			fmt.Fprintf(&b, " %s | %s | %s |",
				ratioCell(res, key(th, m.key, "rota"), key(th, m.key, "haproxy"), m.lowerBetter),
				ratioCell(res, key(th, m.key, "rota"), key(th, m.key, "nginx"), m.lowerBetter),
				ratioCell(res, key(th, m.key, "rota"), key(th, m.key, "direct"), m.lowerBetter))
			if o.baseline != "" {
				fmt.Fprintf(&b, " %s |", ratioCell(res, key(th, m.key, "rota"), key(th, m.key, "baseline"), m.lowerBetter))
			}
			b.WriteString("\n")
		}
		b.WriteString("\n")
	}
	b.WriteString("## Concurrency (keep-alive req/s, 1 thread each)\n\n| connections |")
	for _, px := range o.proxies {
		fmt.Fprintf(&b, " %s |", proxyTitle[px])
	}
	b.WriteString(" rota/HAProxy |\n|---:|" + strings.Repeat("---:|", len(o.proxies)+1) + "\n")
	for _, c := range o.conc {
		fmt.Fprintf(&b, "| %d |", c)
		for _, px := range o.proxies {
			fmt.Fprintf(&b, " %s |", cell(res, key("conc", c, px), "%.0f"))
		}
		fmt.Fprintf(&b, " %s |\n", ratioCell(res, key("conc", c, "rota"), key("conc", c, "haproxy"), false))
	}
	b.WriteString("\n## Targets (new connection per request, req/s, 1 thread each)\n\nEach request is a new connection, so each is a pick; the rate should not fall as targets grow.\n\n| targets |")
	for _, px := range o.proxies[1:] {
		fmt.Fprintf(&b, " %s |", proxyTitle[px])
	}
	b.WriteString(" rota/HAProxy |\n|---:|" + strings.Repeat("---:|", len(o.proxies)) + "\n")
	for _, n := range o.targets {
		fmt.Fprintf(&b, "| %d |", n)
		for _, px := range o.proxies[1:] {
			fmt.Fprintf(&b, " %s |", cell(res, key("targets", n, px), "%.0f"))
		}
		fmt.Fprintf(&b, " %s |\n", ratioCell(res, key("targets", n, "rota"), key("targets", n, "haproxy"), false))
	}
	if _, ok := res.median(key("ab", "close", "rps", "rota")); ok {
		b.WriteString("\n## rota against the baseline (1 thread, 8 interleaved repetitions; median, and min-max)\n\n| | rota | baseline | rota/baseline |\n|---|---:|---:|---:|\n")
		for _, m := range []struct {
			mode, what, label string
			lower             bool
		}{
			{"ka", "rps", "keep-alive req/s", false}, {"ka", "cpu", "CPU per keep-alive request (µs)", true},
			{"close", "rps", "new connection per request, req/s", false}, {"close", "cpu", "CPU per new-connection request (µs)", true},
		} {
			a, bb := key("ab", m.mode, m.what, "rota"), key("ab", m.mode, m.what, "baseline")
			fmt.Fprintf(&b, "| %s | %s (%s) | %s (%s) | %s |\n", m.label, cell(res, a, "%.1f"), spread(res, a), cell(res, bb, "%.1f"), spread(res, bb), ratioCell(res, a, bb, m.lower))
		}
	}
	renderConn(&b, o, res)
	renderFeatures(&b, res)
	if _, ok := res.median(key("alog", 1, "rps", "rota")); ok {
		b.WriteString("\n## Access log (new connection per request, 64 clients; rota: JSON to a file, HAProxy: option tcplog to a file)\n\n")
		b.WriteString("| threads | rota req/s off | on | on/off | rota CPU/conn off (µs) | on | on/off | HAProxy req/s off | on | on/off | HAProxy CPU/conn off | on | on/off |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, th := range []int{1, 2} {
			fmt.Fprintf(&b, "| %d |", th)
			for _, px := range []string{"rota", "haproxy"} {
				for _, m := range []string{"rps", "cpu"} {
					off, on := key("alog", th, m, px), key("alog", th, m, px+"+log")
					x, ok1 := res.median(off)
					y, ok2 := res.median(on)
					r := "–"
					if ok1 && ok2 && x > 0 {
						r = fmt.Sprintf("%.3f", y/x)
					}
					fmt.Fprintf(&b, " %s | %s | %s |", cell(res, off, "%.1f"), cell(res, on, "%.1f"), r)
				}
			}
			b.WriteString("\n")
		}
	}
	proxyTable(&b, o, res, "\n## TLS passthrough routed by SNI (1 thread each; a full handshake per connection, 32 clients)\n\nrota with `routes:`; HAProxy `mode tcp`, `tcp-request inspect-delay`, `req.ssl_sni`; nginx `ssl_preread` and a `map`. The handshakes (client and backend, ECDSA P-256, X25519MLKEM768) take most of the CPU; CPU per connection is the proxy's own.\n\n", []proxyRow{{"new TLS connections/s", "tls_rps", "%.0f", false}, {"p99 (ms)", "tls_p99", "%.2f", true}, {"proxy CPU per connection (µs)", "tls_cpu", "%.1f", true}})
	proxyTable(&b, o, res, "\n## TLS termination (1 thread each; TLS 1.3, ECDSA P-256, 32 clients, a plaintext backend answering at once)\n\nrota `tls:`; HAProxy `bind ... ssl crt`; nginx `stream` `listen ... ssl`; direct: a Go TLS server answering itself. Full: a new handshake per connection; resumed: each client resumes its session (PSK with ECDHE). CPU per handshake is the proxy's own. Bulk: one TLS connection writing for the run's duration into a backend that discards it (the client one thread, Go's crypto/tls).\n\n", []proxyRow{{"full handshakes/s", "term_rps", "%.0f", false}, {"p99 (ms)", "term_p99", "%.2f", true}, {"proxy CPU per handshake (µs)", "term_cpu", "%.1f", true},
		{"resumed handshakes/s", "termr_rps", "%.0f", false}, {"p99 resumed (ms)", "termr_p99", "%.2f", true}, {"proxy CPU per resumed handshake (µs)", "termr_cpu", "%.1f", true},
		{"bulk into a sink, one connection (Gbit/s)", "termbulk", "%.2f", false}})
	proxyTable(&b, o, res, "\n## TLS origination (1 thread each; plaintext clients, the proxy speaking TLS to a Go TLS backend, 32 clients)\n\nrota `target_tls:`; HAProxy `server ... ssl verify none`; nginx `proxy_ssl on`. Each proxy resumes its sessions with the backend as it does by default; direct: the client does the TLS itself, a full handshake each. Bulk: one plaintext connection into a TLS sink through the proxy.\n\n", []proxyRow{{"connections/s", "orig_rps", "%.0f", false}, {"p99 (ms)", "orig_p99", "%.2f", true}, {"proxy CPU per connection (µs)", "orig_cpu", "%.1f", true},
		{"bulk into a TLS sink, one connection (Gbit/s)", "origbulk", "%.2f", false}})
	b.WriteString("\n## Health checking (CPU of the idle proxy, % of one core, TCP checks every 2 s, 1 thread each)\n\nThe proxy's user and system time while it only probes its targets, over a quiet window; on loopback the kernel's work for both ends of each probe's handshake runs in the prober's context, so this is an upper bound of what the same probing costs against remote targets.\n\n| targets |")
	hpx := []string{}
	for _, px := range o.proxies[1:] {
		if px != "nginx" {
			hpx = append(hpx, px)
			fmt.Fprintf(&b, " %s |", proxyTitle[px])
		}
	}
	b.WriteString(" kernel floor | rota/HAProxy | rota cost / floor |\n|---:|" + strings.Repeat("---:|", len(hpx)+3) + "\n")
	for _, n := range o.targets {
		if n < 1000 {
			continue
		}
		fmt.Fprintf(&b, "| %d |", n)
		for _, px := range hpx {
			fmt.Fprintf(&b, " %s |", cell(res, key("healthcpu", n, px), "%.1f"))
		}
		fmt.Fprintf(&b, " %s |", cell(res, key("healthcpu", n, "floor"), "%.1f"))
		fmt.Fprintf(&b, " %s |", ratioCell(res, key("healthcpu", n, "rota"), key("healthcpu", n, "haproxy"), true))
		fmt.Fprintf(&b, " %s |\n", ratioCell(res, key("healthcpu", n, "rota"), key("healthcpu", n, "floor"), false))
	}
	b.WriteString("\nThe kernel floor is the same probes sent by a bare program (a raw non-blocking connect, its error, a reset on close; no scheduler, no state, no event loop): what any prober pays on this machine.\n")
	b.WriteString("\nLoad: `wrk -t1` (one thread, so the proxy keeps a core), small HTTP responses from Go backends in a separate process; bulk: `iperf3` single stream; idle memory: RSS growth of the proxy's processes (nginx: its workers) per idle proxied connection; CPU per request: user and system time of the proxy's processes (including the kernel's TCP work on their sockets) during the wrk run, divided by the requests served, which is steadier than the rates on a shared two-core machine.\n")
	return dropEmpty(b.String())
}

// writeChart draws the rota/HAProxy and rota/nginx ratios per metric and
// pass as horizontal bars around the 1.0x line.
func writeChart(path string, o *options, res results) error {
	type bar struct {
		label string
		v     float64
		c     color.RGBA
	}
	var bars []bar
	blue := color.RGBA{37, 99, 235, 255}
	green := color.RGBA{22, 163, 74, 255}
	for _, th := range o.threads {
		for _, m := range metrics {
			if r, ok := ratio(res, key(th, m.key, "rota"), key(th, m.key, "haproxy"), m.lowerBetter); ok {
				bars = append(bars, bar{fmt.Sprintf("%dT %s vs HAProxy", th, m.label), r, blue})
			}
			if r, ok := ratio(res, key(th, m.key, "rota"), key(th, m.key, "nginx"), m.lowerBetter); ok {
				bars = append(bars, bar{fmt.Sprintf("%dT %s vs nginx", th, m.label), r, green})
			}
		}
	}
	const (
		rowH   = 18
		labelW = 380
		plotW  = 520
		top    = 40
	)
	maxV := 2.0
	for _, b := range bars {
		maxV = max(maxV, b.v)
	}
	h := top + rowH*len(bars) + 30
	img := image.NewRGBA(image.Rect(0, 0, labelW+plotW+80, h))
	draw.Draw(img, img.Bounds(), &image.Uniform{color.White}, image.Point{}, draw.Src)
	text := func(x, y int, s string, c color.Color) {
		d := &font.Drawer{Dst: img, Src: image.NewUniform(c), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
		d.DrawString(s)
	}
	text(10, 20, "rota vs HAProxy (blue) and nginx (green): > 1.0x means rota is better", color.Black)
	xOf := func(v float64) int { return labelW + int(v/maxV*plotW) }
	for i, b := range bars {
		y := top + i*rowH
		text(10, y+13, b.label, color.Black)
		draw.Draw(img, image.Rect(labelW, y+3, xOf(b.v), y+rowH-3), &image.Uniform{b.c}, image.Point{}, draw.Src)
		text(xOf(b.v)+4, y+13, fmt.Sprintf("%.2fx", b.v), color.Black)
	}
	one := xOf(1)
	draw.Draw(img, image.Rect(one, top-4, one+1, top+rowH*len(bars)+4), &image.Uniform{color.RGBA{220, 38, 38, 255}}, image.Point{}, draw.Src)
	text(one-12, h-8, "1.0x", color.RGBA{220, 38, 38, 255})
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return png.Encode(f, img)
}

// spread is the min-max of a key's samples.
func spread(res results, k string) string {
	v := res[k]
	if len(v) == 0 {
		return "–"
	}
	lo, hi := v[0], v[0]
	for _, x := range v {
		lo, hi = min(lo, x), max(hi, x)
	}
	return fmt.Sprintf("%.1f-%.1f", lo, hi)
}

// dropEmpty leaves out the sections whose tables have no figure (a part of
// the run that was not measured: an -only run prints just its own).
func dropEmpty(report string) string {
	parts := strings.Split(report, "\n## ")
	out := parts[:1]
	for _, sec := range parts[1:] {
		if hasTable(sec) && !hasFigure(sec) {
			continue
		}
		out = append(out, sec)
	}
	return strings.Join(out, "\n## ")
}

func hasTable(sec string) bool { return strings.Contains(sec, "\n|") }

// hasFigure reports whether a data row of sec's tables (not a header or
// separator) has a cell past the first other than "–".
func hasFigure(sec string) bool {
	rows := 0
	for _, line := range strings.Split(sec, "\n") {
		if !strings.HasPrefix(line, "|") {
			rows = 0
			continue
		}
		rows++
		if rows <= 2 { // a header and its separator
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		for _, c := range cells[1:] {
			if c = strings.TrimSpace(c); c != "" && c != "–" {
				return true
			}
		}
	}
	return false
}

// proxyRow is a row of proxyTable: its label, its results' key (before
// the proxy), the cells' format, and whether lower is better.
type proxyRow struct {
	name, k, f string
	lower      bool
}

// proxyTable writes a section (head: its heading and text, ending where
// the table starts) with a column per proxy and rota/HAProxy.
func proxyTable(b *strings.Builder, o *options, res results, head string, rows []proxyRow) {
	b.WriteString(head + "| | direct |")
	for _, px := range o.proxies[1:] {
		fmt.Fprintf(b, " %s |", proxyTitle[px])
	}
	b.WriteString(" rota/HAProxy |\n|---|" + strings.Repeat("---:|", len(o.proxies)+1) + "\n")
	for _, row := range rows {
		fmt.Fprintf(b, "| %s |", row.name)
		for _, px := range o.proxies {
			fmt.Fprintf(b, " %s |", cell(res, key(row.k, px), row.f))
		}
		fmt.Fprintf(b, " %s |\n", ratioCell(res, key(row.k, "rota"), key(row.k, "haproxy"), row.lower))
	}
}
