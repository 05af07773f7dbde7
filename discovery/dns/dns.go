// Package dns discovers a service's instances in DNS, the one registry
// Kubernetes headless Services, Consul, Nomad, docker-compose and cloud
// DNS all speak. A name that starts with "_" (such as
// _web._tcp.service.consul) is an SRV query: each record's target is
// resolved and is an instance with the record's port and weight, the
// records of the lowest priority being the instances. Any other name is
// looked up for A and AAAA records, every address an instance on the
// listener's port. The name is resolved again when its answer's TTL runs
// out, the wait clamped to [MinRefresh, Refresh].
//
// It asks resolvers of its own choosing with github.com/miekg/dns (the
// standard library's resolver gives no TTL and no choice of server).
// Failures keep the last good set: SERVFAIL, refusals, timeouts and
// unreachable resolvers are errors (the set stays); NXDOMAIN or an empty
// answer is believed at once, except the first answer after failures,
// which is marked Resync so that the pool holds it (empty_hold).
package dns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/internal/retry"
)

// Config is how names are resolved: registries.dns in rota.yaml (the tags
// are its keys).
type Config struct {
	// Resolvers are ip:port; empty: /etc/resolv.conf's nameservers
	// (in a container, the engine's DNS), with its search list and ndots.
	Resolvers []string `yaml:"resolvers"`
	// Refresh is the longest wait between two resolutions; MinRefresh the
	// shortest (a shorter TTL waits that long).
	Refresh    time.Duration `yaml:"refresh"`
	MinRefresh time.Duration `yaml:"min_refresh"`
	// Timeout bounds one query to one resolver.
	Timeout time.Duration `yaml:"timeout"`
}

// Defaults of Config.
const (
	DefaultRefresh    = 5 * time.Second
	DefaultMinRefresh = time.Second
	DefaultTimeout    = 2 * time.Second
)

// DefaultConfig returns the defaults: the system's resolvers, refresh 5s,
// min_refresh 1s, timeout 2s.
func DefaultConfig() Config {
	return Config{Refresh: DefaultRefresh, MinRefresh: DefaultMinRefresh, Timeout: DefaultTimeout}
}

// resolvConf is where the system's resolvers are read from.
const resolvConf = "/etc/resolv.conf"

// ValidName reports whether name is a host or SRV name rota can look up:
// dot-separated labels of 1 to 63 letters, digits, '-' and '_', 253
// characters at most, a final dot allowed.
func ValidName(name string) bool {
	name = strings.TrimSuffix(name, ".")
	if name == "" || len(name) > 253 {
		return false
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// Watcher resolves one name, or the names of a static list. Create it
// with NewWatcher or NewStatic.
type Watcher struct {
	queries []query
	cfg     Config
	servers []string // host:port; none: the system resolver (NewStatic)
	search  *dns.ClientConfig
	client  *dns.Client
	log     *zap.Logger
}

// query is one name to resolve into instances.
type query struct {
	name   string // as configured: an SRV name, a host name or an IP literal
	srv    bool
	port   int  // host names: the instances' port
	weight int  // host names: the instances' weight (0: none given)
	backup bool // static entries: backup targets
}

// NewWatcher watches name: an SRV name (starting with "_"), or a host
// name whose addresses are instances on port.
func NewWatcher(name string, port int, cfg Config, log *zap.Logger) (*Watcher, error) {
	if !ValidName(name) {
		return nil, fmt.Errorf("dns: %q is not a DNS name (labels of letters, digits, - and _, dot-separated)", name)
	}
	q := query{name: name, srv: name[0] == '_', port: port}
	if !q.srv && (port < 1 || port > 65535) {
		return nil, fmt.Errorf("dns: %s: a port is needed for its addresses", name)
	}
	w := newWatcher(cfg, log, q)
	w.servers = slices.Clone(cfg.Resolvers)
	if len(w.servers) == 0 {
		cc, err := dns.ClientConfigFromFile(resolvConf)
		if err != nil {
			return nil, fmt.Errorf("dns: no resolvers configured and %s unreadable: %w", resolvConf, err)
		}
		for _, s := range cc.Servers {
			w.servers = append(w.servers, net.JoinHostPort(s, cc.Port))
		}
		w.search = cc
	}
	if len(w.servers) == 0 {
		return nil, errors.New("dns: no resolvers")
	}
	w.client = &dns.Client{Timeout: w.cfg.Timeout, UDPSize: dns.DefaultMsgSize}
	return w, nil
}

// Target is one entry of a static list: host:port and its weight.
type Target struct {
	Addr   string
	Weight int
	Backup bool
}

// NewStatic watches a static list whose entries may be host names: each
// name is looked up with the system's resolver (the hosts file, search
// domains and nsswitch, as any other program on the host would see it)
// every cfg.Refresh, and every address it has is a target. The system's
// resolver gives no TTL, hence the fixed refresh.
func NewStatic(targets []Target, cfg Config, log *zap.Logger) (*Watcher, error) {
	qs := make([]query, 0, len(targets))
	for _, t := range targets {
		host, portStr, err := net.SplitHostPort(t.Addr)
		if err != nil {
			return nil, fmt.Errorf("dns: %q: %w", t.Addr, err)
		}
		port, err := strconv.ParseUint(portStr, 10, 16)
		if err != nil || port == 0 {
			return nil, fmt.Errorf("dns: %q: port %q is not 1-65535", t.Addr, portStr)
		}
		if _, err := netip.ParseAddr(host); err != nil && !ValidName(host) {
			return nil, fmt.Errorf("dns: %q: %q is not an IP address or DNS name", t.Addr, host)
		}
		qs = append(qs, query{name: host, port: int(port), weight: t.Weight, backup: t.Backup})
	}
	return newWatcher(cfg, log, qs...), nil
}

func newWatcher(cfg Config, log *zap.Logger, qs ...query) *Watcher {
	if log == nil {
		log = zap.NewNop()
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Refresh <= 0 {
		cfg.Refresh = DefaultRefresh
	}
	return &Watcher{queries: qs, cfg: cfg, log: log}
}

// Watch implements discovery.Watcher.
func (w *Watcher) Watch(ctx context.Context, sink discovery.Sink) error {
	bo := retry.New(250*time.Millisecond, max(w.cfg.Refresh, time.Second))
	pub := discovery.Publisher{Sink: sink}
	for {
		snap, ttl, err := w.resolve(ctx)
		if ctx.Err() != nil {
			return nil
		}
		wait := w.clamp(ttl)
		if err != nil {
			pub.Fail(err)
			wait = bo.Next()
		} else {
			bo.Reset()
			pub.Publish(snap)
		}
		if !retry.Sleep(ctx, wait) {
			return nil
		}
	}
}

func (w *Watcher) clamp(ttl time.Duration) time.Duration {
	return min(max(ttl, w.cfg.MinRefresh), max(w.cfg.Refresh, w.cfg.MinRefresh))
}

// resolve answers every query once: the instances, and the TTL of the
// answer (the shortest of the records it read). One failed query fails the
// whole answer, so that the last good set stays whole.
func (w *Watcher) resolve(ctx context.Context) (discovery.Snapshot, time.Duration, error) {
	var ins []discovery.Instance
	ttl := w.cfg.Refresh
	for _, q := range w.queries {
		var t time.Duration
		var err error
		if q.srv {
			ins, t, err = w.resolveSRV(ctx, q.name, ins)
		} else {
			var addrs []netip.Addr
			addrs, t, err = w.resolveHost(ctx, q.name)
			for _, a := range addrs {
				ins = append(ins, discovery.Instance{Addr: netip.AddrPortFrom(a, uint16(q.port)).String(), Weight: q.weight, Backup: q.backup})
			}
		}
		if err != nil {
			return discovery.Snapshot{}, 0, err
		}
		ttl = min(ttl, t)
	}
	return discovery.Snapshot{Instances: discovery.SortInstances(ins)}, ttl, nil
}

// resolveSRV reads the SRV records and resolves their targets, with the
// addresses the answer's additional section carries where it has them.
// It appends the instances to ins.
func (w *Watcher) resolveSRV(ctx context.Context, name string, ins []discovery.Instance) ([]discovery.Instance, time.Duration, error) {
	resp, err := w.query(ctx, name, dns.TypeSRV)
	if err != nil || resp == nil {
		return ins, w.cfg.Refresh, err
	}
	ttl := w.cfg.Refresh
	var srvs []*dns.SRV
	for _, rr := range resp.Answer {
		if s, ok := rr.(*dns.SRV); ok {
			srvs = append(srvs, s)
			ttl = min(ttl, time.Duration(s.Hdr.Ttl)*time.Second)
		}
	}
	if len(srvs) == 0 {
		return ins, ttl, nil
	}
	// The lowest priority's records are the instances; higher priorities
	// are backups, for when none of those is live.
	best := slices.MinFunc(srvs, func(a, b *dns.SRV) int { return int(a.Priority) - int(b.Priority) }).Priority
	extra := map[string][]netip.Addr{}
	for _, rr := range resp.Extra {
		if a, ok := addrOf(rr); ok {
			extra[dns.CanonicalName(rr.Header().Name)] = append(extra[dns.CanonicalName(rr.Header().Name)], a)
		}
	}
	for _, s := range srvs {
		if s.Target == "." {
			continue
		}
		addrs := extra[dns.CanonicalName(s.Target)]
		if len(addrs) == 0 {
			var t time.Duration
			addrs, t, err = w.resolveHost(ctx, s.Target)
			if err != nil {
				return nil, 0, err
			}
			ttl = min(ttl, t)
		}
		for _, a := range addrs {
			ins = append(ins, discovery.Instance{Addr: netip.AddrPortFrom(a, s.Port).String(), Weight: min(max(int(s.Weight), 1), 1000),
				Backup: s.Priority != best})
		}
	}
	return ins, ttl, nil
}

// resolveHost looks name up for A and AAAA records.
func (w *Watcher) resolveHost(ctx context.Context, name string) ([]netip.Addr, time.Duration, error) {
	if a, err := netip.ParseAddr(name); err == nil {
		return []netip.Addr{a}, w.cfg.Refresh, nil
	}
	if w.servers == nil {
		// The system's resolver: no TTL, so the refresh.
		ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", name)
		var dnsErr *net.DNSError
		if errors.As(err, &dnsErr) && dnsErr.IsNotFound {
			return nil, w.cfg.Refresh, nil
		}
		for i := range ips {
			ips[i] = ips[i].Unmap()
		}
		return ips, w.cfg.Refresh, err
	}
	ttl := w.cfg.Refresh
	var out []netip.Addr
	for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA} {
		resp, err := w.query(ctx, name, qt)
		if err != nil {
			return nil, 0, err
		}
		if resp == nil {
			continue
		}
		for _, rr := range resp.Answer {
			if a, ok := addrOf(rr); ok {
				out = append(out, a)
				ttl = min(ttl, time.Duration(rr.Header().Ttl)*time.Second)
			}
		}
	}
	return out, ttl, nil
}

func addrOf(rr dns.RR) (netip.Addr, bool) {
	switch r := rr.(type) {
	case *dns.A:
		a, ok := netip.AddrFromSlice(r.A.To4())
		return a, ok
	case *dns.AAAA:
		a, ok := netip.AddrFromSlice(r.AAAA)
		return a.Unmap(), ok
	}
	return netip.Addr{}, false
}

// query asks the resolvers in turn for name's records of type qt, with the
// system's search list when the resolvers are the system's. A nil answer
// and no error: the name does not exist or has no such records.
func (w *Watcher) query(ctx context.Context, name string, qt uint16) (*dns.Msg, error) {
	names := []string{dns.Fqdn(name)}
	if w.search != nil && !dns.IsFqdn(name) {
		names = w.search.NameList(name)
	}
	var lastErr error
	for _, n := range names {
		m := new(dns.Msg)
		m.SetQuestion(n, qt)
		m.SetEdns0(dns.DefaultMsgSize, false)
		resp, err := w.exchange(ctx, m)
		if err != nil {
			lastErr = err
			continue
		}
		if resp.Rcode == dns.RcodeNameError || resp.Rcode == dns.RcodeSuccess && len(resp.Answer) == 0 {
			lastErr = nil // this name does not exist: the next of the search list may
			continue
		}
		return resp, nil
	}
	return nil, lastErr
}

// exchange sends m to each resolver until one answers for real (not
// SERVFAIL or a refusal), over TCP when the UDP answer was truncated.
func (w *Watcher) exchange(ctx context.Context, m *dns.Msg) (*dns.Msg, error) {
	var errs []error
	for _, server := range w.servers {
		resp, _, err := w.client.ExchangeContext(ctx, m, server)
		if err == nil && resp.Truncated {
			tcp := *w.client
			tcp.Net = "tcp"
			resp, _, err = tcp.ExchangeContext(ctx, m, server)
		}
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("%s: %w", server, err))
		case resp.Rcode != dns.RcodeSuccess && resp.Rcode != dns.RcodeNameError:
			errs = append(errs, fmt.Errorf("%s: %s", server, dns.RcodeToString[resp.Rcode]))
		default:
			return resp, nil
		}
	}
	return nil, fmt.Errorf("dns: %s %s: %w", m.Question[0].Name, dns.TypeToString[m.Question[0].Qtype], errors.Join(errs...))
}
