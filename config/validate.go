package config

import (
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/discovery/dns"
	"github.com/rota-proxy/rota/discovery/kubernetes"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/proxy"
)

// checker collects problems by field path; Parse adds positions afterwards,
// so the rules are written once for files and for configs built in memory.
type checker struct{ errs []*Error }

func (c *checker) add(field, format string, args ...any) {
	c.errs = append(c.errs, &Error{Field: field, Msg: fmt.Sprintf(format, args...)})
}

// problems returns every rule the config breaks, without positions.
func (c *Config) problems() []*Error {
	var ck checker
	if c.Admin.Listen != "" {
		if err := checkAddr(c.Admin.Listen, listenAddr); err != nil {
			ck.add("admin.listen", "%v", err)
		} else if c.Admin.TokenFile == "" && !loopbackListen(c.Admin.Listen) {
			ck.add("admin.token_file", "required when admin.listen (%q) is not a loopback address: anyone who reaches it could reload the configuration and drain targets", c.Admin.Listen)
		}
	}
	switch t := c.Admin.TLS; {
	case t.CertFile != "" && t.KeyFile == "":
		ck.add("admin.tls.key_file", "required when cert_file is set")
	case t.KeyFile != "" && t.CertFile == "":
		ck.add("admin.tls.cert_file", "required when key_file is set")
	case t.ClientCAFile != "" && t.CertFile == "":
		ck.add("admin.tls.client_ca_file", "needs cert_file and key_file: client certificates are asked for in a TLS handshake")
	}
	if r := c.Registries.Consul; r != nil && r.Address != "" {
		if err := checkConsulAddress(r.Address); err != nil {
			ck.add("registries.consul.address", "%v", err)
		}
	}
	if e := c.Registries.Etcd; e != nil {
		ck.etcd(e)
	}
	if a := c.AccessLog; a != nil {
		if a.Format != accesslog.JSON && a.Format != accesslog.Text {
			ck.add("access_log.format", "must be json or text; got %q", a.Format)
		}
		if a.Path == "" {
			ck.add("access_log.path", "must be stdout, stderr or a file")
		}
		if a.Buffer != 0 && (a.Buffer < 8 || a.Buffer > 1<<20) {
			ck.add("access_log.buffer", "must be 8 to 1048576 records; got %d", a.Buffer)
		}
	}
	ck.dns(&c.Registries.DNS)
	ck.docker(&c.Registries.Docker)
	switch c.Registries.State {
	case "", StateLocal:
	case StateEtcd:
		if c.Registries.Etcd == nil {
			ck.add("registries.state", "etcd needs registries.etcd")
		}
	case StateConsul:
		if c.Registries.Consul == nil {
			ck.add("registries.state", "consul needs registries.consul")
		}
	default:
		ck.add("registries.state", "must be etcd, consul or local; got %q", c.Registries.State)
	}
	if c.Registries.EmptyHold < 0 {
		ck.add("registries.empty_hold", "must not be negative (0 disables it)")
	}
	if len(c.Listeners) == 0 {
		ck.add("listeners", "no listeners defined")
	}
	ck.durations("", reflect.ValueOf(c).Elem())
	names := make(map[string]int)
	for i := range c.Listeners {
		ck.listener(c, i, names)
	}
	return ck.errs
}

func (ck *checker) dns(d *dns.Config) {
	const p = "registries.dns"
	for i, r := range d.Resolvers {
		if ap, err := netip.ParseAddrPort(r); err != nil || ap.Port() == 0 {
			ck.add(fmt.Sprintf("%s.resolvers[%d]", p, i), "must be an IP address and port, like 127.0.0.53:53 or [::1]:53; got %q", r)
		}
	}
	if d.Refresh <= 0 {
		ck.add(p+".refresh", "must be greater than 0")
	}
	if d.MinRefresh <= 0 {
		ck.add(p+".min_refresh", "must be greater than 0")
	} else if d.MinRefresh > d.Refresh && d.Refresh > 0 {
		ck.add(p+".min_refresh", "must not be above refresh (%s); got %s", d.Refresh, d.MinRefresh)
	}
	if d.Timeout <= 0 {
		ck.add(p+".timeout", "must be greater than 0")
	}
}

func (ck *checker) docker(d *Docker) {
	const p = "registries.docker"
	if d.Host != "" {
		u, err := url.Parse(d.Host)
		switch {
		case err != nil:
			ck.add(p+".host", "%v", err)
		case u.Scheme == "unix" && u.Path != "":
		case (u.Scheme == "tcp" || u.Scheme == "http" || u.Scheme == "https") && u.Host != "":
		default:
			ck.add(p+".host", "must be unix:///path/to/docker.sock, tcp://host:port or http(s)://host:port; got %q", d.Host)
		}
	}
	switch {
	case d.TLS.CertFile != "" && d.TLS.KeyFile == "":
		ck.add(p+".tls.key_file", "required when cert_file is set")
	case d.TLS.KeyFile != "" && d.TLS.CertFile == "":
		ck.add(p+".tls.cert_file", "required when key_file is set")
	}
}

func (ck *checker) etcd(e *Etcd) {
	const p = "registries.etcd"
	if len(e.Endpoints) == 0 && e.Embedded == nil {
		ck.add(p+".endpoints", "at least one endpoint is required (or configure embedded)")
	}
	for i, ep := range e.Endpoints {
		if err := checkEndpoint(ep); err != nil {
			ck.add(fmt.Sprintf("%s.endpoints[%d]", p, i), "%v", err)
		}
	}
	if !strings.HasSuffix(e.Prefix, "/") || strings.Trim(e.Prefix, "/") == "" {
		ck.add(p+".prefix", `must end with "/" and name something, like %q or "/services/"; got %q`, DefaultEtcdPrefix, e.Prefix)
	}
	if e.PasswordFile != "" && e.Username == "" {
		ck.add(p+".username", "required when password_file is set")
	}
	switch {
	case e.TLS.CertFile != "" && e.TLS.KeyFile == "":
		ck.add(p+".tls.key_file", "required when cert_file is set")
	case e.TLS.KeyFile != "" && e.TLS.CertFile == "":
		ck.add(p+".tls.cert_file", "required when key_file is set")
	}
	if em := e.Embedded; em != nil {
		if em.DataDir == "" {
			ck.add(p+".embedded.data_dir", "must not be empty")
		}
		ck.embedded(e, em)
	}
}

// embedded checks the embedded server's client URL against its TLS: https
// with a certificate, and off loopback, client certificates too (the
// registry decides where the traffic goes).
func (ck *checker) embedded(e *Etcd, em *Embedded) {
	const p = "registries.etcd.embedded"
	host, _, err := urlHostPort(em.ClientURL)
	if err != nil {
		ck.add(p+".client_url", "%v", err)
		return
	}
	https := strings.HasPrefix(em.ClientURL, "https://")
	t := em.TLS
	switch {
	case t.CertFile != "" && t.KeyFile == "":
		ck.add(p+".tls.key_file", "required when cert_file is set")
	case t.KeyFile != "" && t.CertFile == "":
		ck.add(p+".tls.cert_file", "required when key_file is set")
	case https && t.CertFile == "":
		ck.add(p+".tls.cert_file", "required: client_url %s is https", em.ClientURL)
	case !https && t.Enabled():
		ck.add(p+".client_url", "must be https://host:port when embedded.tls is set; got %q", em.ClientURL)
	case t.ClientCAFile != "" && t.CertFile == "":
		ck.add(p+".tls.cert_file", "required when client_ca_file is set")
	case !loopbackHost(host) && (!https || t.ClientCAFile == ""):
		ck.add(p+".client_url", "%q is not a loopback address: whoever reaches it could register an instance and receive the service's traffic. "+
			"Serve it over https with client certificates (embedded.tls: cert_file, key_file, client_ca_file), or listen on 127.0.0.1", em.ClientURL)
	}
	if t.ClientCAFile != "" && e.TLS.CertFile == "" && e.usesEmbedded() {
		ck.add("registries.etcd.tls.cert_file", "required: rota's own etcd client reaches the embedded server, which asks every client for a certificate (embedded.tls.client_ca_file)")
	}
}

// loopbackHost reports whether host, from a URL, can only be reached from
// this machine: localhost or a loopback address (not 0.0.0.0 or ::, which
// listen on every interface).
func loopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// uniqueName checks the name of element i of list (at path p): not empty,
// and not taken by an earlier element (names, which it records it in).
func (ck *checker) uniqueName(p, list, what, name string, i int, names map[string]int) {
	switch j, dup := names[name]; {
	case name == "":
		ck.add(p+".name", "must not be empty")
	case dup:
		ck.add(p+".name", "duplicate %s %q (%s[%d] has it too)", what, name, list, j)
	default:
		names[name] = i
	}
}

func (ck *checker) listener(c *Config, i int, names map[string]int) {
	l := &c.Listeners[i]
	p := fmt.Sprintf("listeners[%d]", i)

	ck.uniqueName(p, "listeners", "name", l.Name, i, names)

	if l.Listen == "" {
		ck.add(p+".listen", `required: the address to listen on, like ":8080"`)
	} else if err := checkAddr(l.Listen, listenAddr); err != nil {
		ck.add(p+".listen", "%v", err)
	} else {
		for j := range i {
			if other := c.Listeners[j].Listen; listenConflict(other, l.Listen) {
				ck.add(p+".listen", "%q conflicts with listeners[%d].listen %q", l.Listen, j, other)
				break
			}
		}
		if listenConflict(c.Admin.Listen, l.Listen) {
			ck.add(p+".listen", "%q conflicts with admin.listen %q", l.Listen, c.Admin.Listen)
		}
	}

	if l.Routed() {
		ck.routes(c, p, l)
	} else {
		ck.pool(c, p, &l.Pool, false)
	}

	if l.DialTimeout <= 0 {
		ck.add(p+".dial_timeout", "must be greater than 0")
	}
	if l.Retries < 0 || l.Retries > MaxRetries {
		ck.add(p+".retries", "must be 0 to %d; got %d", MaxRetries, l.Retries)
	}
	if l.MaxConns < 0 {
		ck.add(p+".max_conns", "must not be negative (0 means unlimited)")
	}
	if l.IdleTimeout < 0 {
		ck.add(p+".idle_timeout", "must not be negative (0 disables it)")
	}
	if l.DrainTimeout < 0 {
		ck.add(p+".drain_timeout", "must not be negative (0 closes connections at once)")
	}
	if l.ProxyHeaderTimeout <= 0 {
		ck.add(p+".proxy_header_timeout", "must be greater than 0")
	}
	if l.SNITimeout <= 0 && (l.Routed() || l.TLS != nil) {
		ck.add(p+".sni_timeout", "must be greater than 0")
	}
	if t := l.TLS; t != nil {
		ck.tlsServer(p+".tls", t, l)
	}
	if l.MaxConnsPerClient < 0 {
		ck.add(p+".max_conns_per_client", "must not be negative (0 means unlimited)")
	}
	if l.RemovedConnGrace < 0 && l.RemovedConnGrace != proxy.Never {
		ck.add(p+".removed_conn_grace", `must be "never" or a duration that is not negative (0 closes at once)`)
	}
	if l.MaxConnAge < 0 {
		ck.add(p+".max_conn_age", "must not be negative (0 turns it off)")
	}
}

// pool checks the keys of a listener's or a route's pool, at path p.
func (ck *checker) pool(c *Config, p string, pl *Pool, routed bool) {
	switch pl.Discovery {
	case "consul", "etcd":
		configured := c.Registries.Consul != nil
		if pl.Discovery == "etcd" {
			configured = c.Registries.Etcd != nil
		}
		switch {
		case configured:
		case pl.Discovery == "consul":
			ck.add(p+".discovery", "consul needs registries.consul (or CONSUL_HTTP_ADDR in the environment), which is not configured")
		default:
			ck.add(p+".discovery", "%s needs registries.%s, which is not configured", pl.Discovery, pl.Discovery)
		}
		if pl.Service == "" {
			ck.add(p+".service", "required with discovery: %s", pl.Discovery)
		} else if pl.Discovery == "etcd" && strings.Contains(pl.Service, "/") {
			// Keys are <prefix><service>/<addr>: a "/" in the service
			// would make "a/b" also list the instances of "a".
			ck.add(p+".service", `must not contain "/" with discovery: etcd; got %q`, pl.Service)
		}
	case "static":
		if len(pl.Static) == 0 {
			ck.add(p+".static", "at least one host:port is required with discovery: static")
		}
		seen := make(map[string]int)
		for k, t := range pl.Static {
			f := fmt.Sprintf("%s.static[%d]", p, k)
			if t.Weight < 0 || t.Weight > 1000 {
				ck.add(f+".weight", "must be 1-1000; got %d", t.Weight)
			}
			if t.Addr == "" {
				ck.add(f+".addr", "required")
			} else if err := checkAddr(t.Addr, targetAddr); err != nil {
				ck.add(f, "%v", err)
			} else if first, dup := seen[t.Addr]; dup {
				ck.add(f, "duplicate target %q (static[%d] has it too)", t.Addr, first)
			} else {
				seen[t.Addr] = k
			}
		}
	case "dns":
		switch {
		case pl.Service == "":
			ck.add(p+".service", "required with discovery: dns: a host name (its A and AAAA records) or an SRV name such as _web._tcp.example.com")
		case !dns.ValidName(pl.Service):
			ck.add(p+".service", "must be a DNS name (dot-separated labels of letters, digits, - and _); got %q", pl.Service)
		case strings.HasPrefix(pl.Service, "_") && !pl.Port.IsZero():
			ck.add(p+".port", "not used with an SRV name (%s): its records carry the ports", pl.Service)
		case !strings.HasPrefix(pl.Service, "_") && pl.Port.IsZero():
			ck.add(p+".port", "required with discovery: dns and a host name: the port of its addresses")
		}
	case "docker":
		if pl.Service == "" {
			ck.add(p+".service", "required with discovery: docker: the rota.service label's value (or, with docker.match: compose, the compose service)")
		}
		if m := pl.Docker.Match; m != "" && m != MatchLabel && m != MatchCompose {
			ck.add(p+".docker.match", "must be label or compose; got %q", m)
		}
	case "kubernetes":
		if pl.Service == "" {
			ck.add(p+".service", "required with discovery: kubernetes: a Service's name, or namespace/name")
		} else if _, err := kubernetes.ParseName(pl.Service); err != nil {
			ck.add(p+".service", "must be name or namespace/name of a Kubernetes Service: %v", err)
		}
	case "":
		ck.add(p+".discovery", "required: one of consul, etcd, static, dns, docker, kubernetes")
	default:
		ck.add(p+".discovery", "must be one of consul, etcd, static, dns, docker, kubernetes; got %q", pl.Discovery)
	}
	if pl.Discovery != "static" && pl.Discovery != "" && len(pl.Static) > 0 {
		ck.add(p+".static", "only valid with discovery: static")
	}
	switch n := pl.Port.Number; {
	case n < 0 || n > 65535:
		ck.add(p+".port", "must be 1-65535; got %d", n)
	case !pl.Port.IsZero() && pl.Discovery != "dns" && pl.Discovery != "docker" && pl.Discovery != "kubernetes":
		ck.add(p+".port", "only valid with discovery: dns, docker or kubernetes")
	case pl.Port.Name != "" && pl.Discovery != "kubernetes":
		ck.add(p+".port", "a port name (%q) is only valid with discovery: kubernetes; dns and docker take a number", pl.Port.Name)
	}
	if pl.Docker != (DockerMatch{}) && pl.Discovery != "docker" {
		ck.add(p+".docker", "only valid with discovery: docker")
	}
	if pl.Connect && pl.Discovery != "consul" {
		ck.add(p+".connect", "only valid with discovery: consul")
	}
	if pl.ConnectService != "" && !pl.Connect {
		ck.add(p+".connect_service", "only valid with connect: true")
	}
	if pl.Connect && pl.TargetTLS != nil {
		ck.add(p+".target_tls", "not used with connect: true: Consul Connect's certificates are the agent's")
	}
	if t := pl.TargetTLS; t != nil {
		switch {
		case t.CertFile != "" && t.KeyFile == "":
			ck.add(p+".target_tls.key_file", "required when cert_file is set")
		case t.KeyFile != "" && t.CertFile == "":
			ck.add(p+".target_tls.cert_file", "required when key_file is set")
		}
	}
	if len(pl.Tags) > 0 && pl.Discovery != "consul" && pl.Discovery != "" {
		ck.add(p+".tags", "only valid with discovery: consul")
	}
	for k, t := range pl.Tags {
		if t == "" {
			ck.add(fmt.Sprintf("%s.tags[%d]", p, k), "must not be empty")
		}
	}

	ck.health(p+".health", &pl.Health)
	switch pl.Balance {
	case "", BalanceRoundRobin, BalanceLeastConn, BalanceRandomTwo, BalanceHash:
	default:
		ck.add(p+".balance", "must be round_robin, least_conn, random_two or hash; got %q", pl.Balance)
	}
	switch pl.HashKey {
	case "", HashClientIP:
	case HashSNI:
		if !routed {
			ck.add(p+".hash_key", "sni needs routes: the server name is read to route (a route with sni: [\"*\"] takes every name)")
		}
	default:
		ck.add(p+".hash_key", "must be client_ip or sni; got %q", pl.HashKey)
	}
	if f := pl.HashBalanceFactor; f != 0 && (f < 1 || f != f) {
		ck.add(p+".hash_balance_factor", "must be at least 1 (1.25: no target above 1.25x the mean of open connections), or 0 for unbounded; got %v", f)
	}
	if pl.SlowStart < 0 {
		ck.add(p+".slow_start", "must not be negative (0 turns it off)")
	}
	if pl.MaxConnsPerTarget < 0 {
		ck.add(p+".max_conns_per_target", "must not be negative (0 is no cap); got %d", pl.MaxConnsPerTarget)
	}
	switch q := pl.Queue; {
	case q.Size < 0:
		ck.add(p+".queue.size", "must not be negative (0 is no queue); got %d", q.Size)
	case q.Size > 0 && pl.MaxConnsPerTarget == 0:
		ck.add(p+".queue", "queues only under max_conns_per_target: set it, or drop the queue")
	case q.Size > 0 && q.Timeout <= 0:
		ck.add(p+".queue.timeout", "must be positive: how long a connection may wait for a place (e.g. 5s)")
	}
}

// routes checks a routed listener: its routes, each a pool, and the
// server names they match.
func (ck *checker) routes(c *Config, p string, l *Listener) {
	if l.Service != "" || l.Discovery != "" || len(l.Static) > 0 || len(l.Tags) > 0 {
		ck.add(p+".routes", "a listener has either routes or its own service/discovery/static, not both: move them into a route")
	}
	names := map[string]int{}
	patterns := map[string]string{}
	for j := range l.Routes {
		r := &l.Routes[j]
		rp := fmt.Sprintf("%s.routes[%d]", p, j)
		ck.uniqueName(rp, "routes", "route name", r.Name, j, names)
		if len(r.SNI) == 0 {
			ck.add(rp+".sni", `required: the server names this route serves, like [api.example.com, "*.example.com"], or ["*"] for anything else`)
		}
		for k, pat := range r.SNI {
			f := fmt.Sprintf("%s.sni[%d]", rp, k)
			if err := checkSNIPattern(pat); err != nil {
				ck.add(f, "%v", err)
				continue
			}
			key := strings.ToLower(strings.TrimSuffix(pat, "."))
			if other, dup := patterns[key]; dup {
				ck.add(f, "%q is matched by %s already", pat, other)
				continue
			}
			patterns[key] = fmt.Sprintf("routes[%d].sni[%d]", j, k)
		}
		ck.pool(c, rp, &r.Pool, true)
		if r.TLS != nil {
			ck.tlsServer(rp+".tls", r.TLS, nil)
		}
	}
}

// checkSNIPattern accepts "*", "*.domain" and host names.
func checkSNIPattern(s string) error {
	if s == "*" {
		return nil
	}
	name := strings.TrimPrefix(s, "*.")
	if strings.Contains(name, "*") {
		return fmt.Errorf(`%q: a wildcard is "*" or a "*." prefix, like "*.example.com"`, s)
	}
	name = strings.TrimSuffix(name, ".")
	if name == "" || len(name) > 253 {
		return fmt.Errorf("%q is not a host name", s)
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" || len(label) > 63 || strings.HasPrefix(label, "-") || strings.HasSuffix(label, "-") {
			return fmt.Errorf("%q is not a host name", s)
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return fmt.Errorf("%q is not a host name (%q)", s, r)
			}
		}
	}
	return nil
}

func (ck *checker) health(p string, h *health.Config) {
	uses := func(kinds ...string) bool { return slices.Contains(kinds, h.Check) }
	only := func(key string, set bool, kinds ...string) {
		if set && !uses(kinds...) {
			ck.add(p+"."+key, "only for %s checks (this one is %s)", strings.Join(kinds, ", "), h.Check)
		}
	}
	switch h.Check {
	case health.CheckHTTP, health.CheckHTTPS:
		if !strings.HasPrefix(h.Path, "/") {
			ck.add(p+".path", `must start with "/", like %q; got %q`, DefaultHealthPath, h.Path)
		} else if strings.ContainsFunc(h.Path, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
			ck.add(p+".path", "must not contain spaces or control characters; got %q", h.Path)
		} else if _, err := url.ParseRequestURI(h.Path); err != nil {
			ck.add(p+".path", "is not a valid URL path: %q", h.Path)
		}
		if h.Host != "" {
			host := h.Host
			if hp, port, err := splitHostPort(host); err == nil {
				if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
					ck.add(p+".host", "port %q is not 1-65535", port)
				}
				host = hp
			}
			if err := checkHost(host); err != nil {
				ck.add(p+".host", "%v", err)
			}
		}
		for i, st := range h.ExpectStatus {
			if _, _, err := health.ParseStatus(st); err != nil {
				ck.add(fmt.Sprintf("%s.expect_status[%d]", p, i), "%v", err)
			}
		}
	case health.CheckSendExpect:
		expects := 0
		for i, st := range h.Steps {
			sp := fmt.Sprintf("%s.steps[%d]", p, i)
			switch {
			case st.Send != "" && st.Expect != "", st.Send == "" && st.Expect == "":
				ck.add(sp, "must have one of send and expect")
			case st.Send != "":
				if _, err := health.ParseBytes(st.Send); err != nil {
					ck.add(sp+".send", "%v", err)
				}
			default:
				expects++
				if _, err := health.ParseBytes(st.Expect); err != nil {
					ck.add(sp+".expect", "%v", err)
				}
			}
		}
		if expects == 0 {
			ck.add(p+".steps", `must have at least one expect (like [{send: "PING\r\n"}, {expect: "+PONG"}]): a check that sends without expecting judges nothing`)
		}
	case health.CheckTCP, health.CheckTLS, health.CheckGRPC, health.CheckNone:
	default:
		ck.add(p+".check", "must be one of %s; got %q", strings.Join(health.Checks, ", "), h.Check)
		only = func(string, bool, ...string) {} // which keys fit is unknown
	}
	only("host", h.Host != "", health.CheckHTTP, health.CheckHTTPS)
	only("expect_status", len(h.ExpectStatus) > 0, health.CheckHTTP, health.CheckHTTPS)
	only("expect_body", h.ExpectBody != "", health.CheckHTTP, health.CheckHTTPS)
	only("steps", len(h.Steps) > 0, health.CheckSendExpect)
	only("tls", h.TLS.Set(), health.CheckHTTPS, health.CheckTLS, health.CheckGRPC)
	only("grpc_service", h.GRPCService != "", health.CheckGRPC)
	if h.Port < 0 || h.Port > 65535 {
		ck.add(p+".port", "must be 0 (the target's own port) to 65535; got %d", h.Port)
	}
	if h.TLS.Set() && uses(health.CheckHTTPS, health.CheckTLS, health.CheckGRPC) {
		if _, err := h.TLS.ClientConfig(); err != nil {
			var te *health.TLSError
			if errors.As(err, &te) {
				ck.add(p+".tls."+te.Key, "%v", te.Err)
			} else {
				ck.add(p+".tls", "%v", err)
			}
		}
	}
	if h.Interval <= 0 {
		ck.add(p+".interval", "must be greater than 0")
	}
	if h.Timeout <= 0 {
		ck.add(p+".timeout", "must be greater than 0")
	}
	if h.Rise < 1 {
		ck.add(p+".rise", "must be at least 1")
	}
	if h.Fall < 1 {
		ck.add(p+".fall", "must be at least 1")
	}
	if h.Interval > 0 && h.BackoffMax < h.Interval {
		ck.add(p+".backoff_max", "must be at least interval (%s)", h.Interval)
	}
}

// loopbackListen reports whether a listen address only accepts
// connections from this host.
func loopbackListen(addr string) bool {
	host, _, err := splitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

// addrKind says what an address is for: a listen address may leave the host
// empty (all interfaces) and use port 0 (any free port, handy in tests); a
// target must name a host and a real port.
type addrKind int

const (
	listenAddr addrKind = iota
	targetAddr
)

// checkAddr checks a host:port.
func checkAddr(s string, kind addrKind) error {
	example := `":8080" or "127.0.0.1:8080"`
	if kind == targetAddr {
		example = `"10.0.0.5:9000" or "web-1:9000"`
	}
	host, port, err := splitHostPort(s)
	if err != nil {
		if kind == listenAddr && s != "" && strings.Trim(s, "0123456789") == "" {
			return fmt.Errorf("must be host:port; got %q (did you mean \":%s\"?)", s, s)
		}
		return fmt.Errorf("must be host:port, like %s; got %q (%w)", example, s, err)
	}
	if err := checkPort(port, kind == listenAddr); err != nil {
		return fmt.Errorf("%q: %w", s, err)
	}
	if host == "" {
		if kind == targetAddr {
			return fmt.Errorf("must name a host, like %s; got %q", example, s)
		}
		return nil
	}
	if err := checkHost(host); err != nil {
		return fmt.Errorf("%q: %w", s, err)
	}
	return nil
}

func checkPort(port string, zeroOK bool) error {
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return fmt.Errorf("port %q must be a number from %d to 65535", port, boolInt(!zeroOK))
	}
	if n == 0 && !zeroOK {
		return errors.New("port must be from 1 to 65535")
	}
	return nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// checkHost accepts an IP address (IPv6 with an optional zone) or a DNS-style
// host name; underscores are allowed because docker-compose service names
// use them.
func checkHost(host string) error {
	if strings.ContainsAny(host, ":%") || strings.Trim(host, "0123456789.") == "" {
		if _, err := netip.ParseAddr(host); err != nil {
			return fmt.Errorf("host %q is not a valid IP address", host)
		}
		return nil
	}
	name := strings.TrimSuffix(host, ".")
	if len(name) > 253 {
		return fmt.Errorf("host name is longer than 253 characters")
	}
	for _, label := range strings.Split(name, ".") {
		ok := len(label) > 0 && len(label) <= 63 && label[0] != '-' && label[len(label)-1] != '-'
		for i := 0; ok && i < len(label); i++ {
			c := label[i]
			ok = c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_'
		}
		if !ok {
			return fmt.Errorf("host %q is not a valid IP address or host name", host)
		}
	}
	return nil
}

// urlHostPort checks an http(s)://host:port URL with nothing after the
// port, and returns its host and port.
func urlHostPort(s string) (host, port string, err error) {
	bad := func(why string) (string, string, error) {
		return "", "", fmt.Errorf("must be a URL like %q; got %q (%s)", DefaultEmbeddedClientURL, s, why)
	}
	u, err := url.Parse(s)
	if err != nil {
		return bad("not a URL")
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return bad("scheme must be http or https")
	}
	if u.Opaque != "" || u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" || u.ForceQuery {
		return bad("only scheme, host and port are allowed")
	}
	host, port, err = splitHostPort(u.Host)
	if err != nil {
		return bad(err.Error())
	}
	if host == "" {
		return bad("host is missing")
	}
	if err := checkHost(host); err != nil {
		return bad(err.Error())
	}
	if err := checkPort(port, false); err != nil {
		return bad(err.Error())
	}
	return host, port, nil
}

// checkEndpoint accepts what etcd's client accepts and rota can check
// statically: host:port or http(s)://host:port.
func checkEndpoint(s string) error {
	if strings.Contains(s, "://") {
		_, _, err := urlHostPort(s)
		return err
	}
	return checkAddr(s, targetAddr)
}

// checkConsulAddress accepts what consul/api accepts: host:port,
// http(s)://host:port or unix:///path/to/socket.
func checkConsulAddress(s string) error {
	if path, ok := strings.CutPrefix(s, "unix://"); ok {
		if path == "" {
			return errors.New(`"unix://" needs a socket path, like "unix:///run/consul.sock"`)
		}
		return nil
	}
	return checkEndpoint(s)
}

// listenConflict reports whether two listen addresses would collide when
// bound: same non-zero port and same host, or either host a wildcard (which
// takes the port on every address). Host names are compared as written, not
// resolved.
func listenConflict(a, b string) bool {
	ha, pa, err1 := splitHostPort(a)
	hb, pb, err2 := splitHostPort(b)
	if err1 != nil || err2 != nil {
		return false
	}
	na, err1 := strconv.ParseUint(pa, 10, 16)
	nb, err2 := strconv.ParseUint(pb, 10, 16)
	if err1 != nil || err2 != nil || na != nb || na == 0 {
		return false
	}
	if wildcard(ha) || wildcard(hb) || strings.EqualFold(ha, hb) {
		return true
	}
	ia, err1 := netip.ParseAddr(ha)
	ib, err2 := netip.ParseAddr(hb)
	return err1 == nil && err2 == nil && ia.Unmap() == ib.Unmap()
}

func wildcard(host string) bool {
	if host == "" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsUnspecified()
}

// ParsePrefix is how an allow, deny or accept_proxy_protocol entry is
// read: see parsePrefix.
func ParsePrefix(s string) (netip.Prefix, error) { return parsePrefix(s) }

// parsePrefix parses a CIDR, or a bare IP as a single-host prefix; the
// result is masked so that "10.1.2.3/8" means 10.0.0.0/8. IPv4-mapped IPv6
// ("::ffff:10.9.0.5", "::ffff:10.0.0.0/104") is unmapped to the IPv4 it
// names: client addresses are unmapped before they are matched, so a
// mapped entry would otherwise match nobody (a deny failing open).
func parsePrefix(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		p = p.Masked()
		if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
		}
		return p, nil
	}
	if ip, err := netip.ParseAddr(s); err == nil && ip.Zone() == "" {
		ip = ip.Unmap()
		return netip.PrefixFrom(ip, ip.BitLen()), nil
	}
	return netip.Prefix{}, fmt.Errorf("%q is not a CIDR (like 10.0.0.0/8) or an IP address", s)
}

// tlsServer checks a listener's TLS termination.
func (ck *checker) tlsServer(p string, t *TLSServer, l *Listener) {
	if len(t.Certs) == 0 {
		ck.add(p+".certs", "required: at least one {cert_file, key_file}")
	}
	for i, c := range t.Certs {
		f := fmt.Sprintf("%s.certs[%d]", p, i)
		if c.CertFile == "" {
			ck.add(f+".cert_file", "required")
		}
		if c.KeyFile == "" {
			ck.add(f+".key_file", "required")
		}
	}
	switch t.ClientAuth {
	case "", ClientAuthNone, ClientAuthRequest:
	case ClientAuthRequire:
		if t.ClientCAFile == "" {
			ck.add(p+".client_ca_file", "required with client_auth: require: the CA certificates that sign the clients' certificates")
		}
	default:
		ck.add(p+".client_auth", "must be none, request or require; got %q", t.ClientAuth)
	}
	if t.ClientAuth == ClientAuthNone && t.ClientCAFile != "" {
		ck.add(p+".client_ca_file", "not used with client_auth: none")
	}
	if v := t.MinVersion; v != "" && v != "1.2" && v != "1.3" {
		ck.add(p+".min_version", `must be "1.2" or "1.3"; got %q`, v)
	}
	if l != nil && l.Routed() {
		ck.add(p, "on a routed listener, set tls on the routes that terminate (the others pass TLS through)")
	}
}
