// Package config loads and validates rota's YAML configuration (rota.yaml).
//
// The schema is the "Configuration (rota.yaml)" section of DESIGN.md. The
// loader is strict on purpose: rota sits in front of production traffic and a
// typo such as "helth:" or "interval: 2" silently falling back to a default is
// worse than refusing to start. Every problem is reported with the file, line,
// column and field path (for example
// "rota.yaml:14:7: listeners[0].health.rise: must be at least 1"), and all
// problems of a file are reported at once so that one `rota check` run is
// enough to fix them.
//
// Beyond the contract, these rules apply (they are decisions, documented here
// so that users and the rest of rota can rely on them):
//
//   - A listener without a name is named after its service, or
//     "listener-N" (N is its index in the listeners list, as in the
//     "listeners[N]" paths of error messages) when it has no service. When
//     that name is already taken, "-N" is appended. Explicit names must be
//     unique.
//   - accept_proxy_protocol entries are CIDRs; a bare IP address is accepted
//     and means that single host (/32 or /128). See [Listener.TrustedProxies].
//   - idle_timeout: 0 disables the idle timeout; drain_timeout: 0 closes open
//     connections at once on shutdown; slow_start and max_conn_age: 0 is
//     off; removed_conn_grace: "never" (the default) or a duration, 0
//     closing at once. Other durations must be positive.
//   - When health.interval is set above the default backoff_max (30s) and
//     backoff_max is not set, backoff_max is raised to the interval (a down
//     target is then simply probed every interval). An explicit backoff_max
//     below interval is an error.
//   - A null value ("key:" with nothing after it) is the zero value for
//     scalars and lists, except that a null section ("embedded:",
//     "consul:", "health:", ...) means the section is present with its
//     defaults, since the only reason to write "embedded:" is to enable it.
//   - With an embedded etcd and no endpoints, the endpoints default to the
//     embedded client URL's host:port (an unspecified host such as 0.0.0.0
//     becomes loopback).
//   - Two listen addresses conflict when their ports are equal (and not 0)
//     and their hosts are equal or either is a wildcard ("", 0.0.0.0, ::).
//   - Files named in the config (token_file, tls files, ...) are not opened
//     here: validation is static, so it gives the same answer on a laptop
//     running `rota check` as on the server.
//   - YAML anchors, aliases and merge keys ("<<: *defaults") work. Top-level
//     keys starting with "x-" are ignored, as in docker-compose, to give
//     anchors a home; every other unknown key is an error. Only one YAML
//     document per file is allowed.
package config

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"time"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/balancer"
	"github.com/rota-proxy/rota/discovery/dns"
	"github.com/rota-proxy/rota/discovery/kubernetes"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/proxy"
)

// Config is the whole of rota.yaml.
type Config struct {
	Admin Admin `yaml:"admin"`
	// PIDFile, if set, holds the serving process's id: written at start,
	// and by the new process when an upgrade takes over.
	PIDFile string `yaml:"pid_file"`
	// AccessLog, when present, records every connection of the listeners
	// (and routes) whose access_log is not false.
	AccessLog  *accesslog.Config `yaml:"access_log"`
	Registries Registries        `yaml:"registries"`
	Listeners  []Listener        `yaml:"listeners"`

	// File is the path the config was loaded from, "" when built in memory.
	// It lets a reload re-read the same file and lets errors name it.
	File string `yaml:"-"`
}

// Admin is the admin HTTP server.
type Admin struct {
	// Listen is the admin address, default "127.0.0.1:9090"; "" disables
	// the admin server.
	Listen string `yaml:"listen"`
	// TokenFile holds the bearer token every POST must carry and, when
	// set, every request but /healthz and /readyz. Required when Listen
	// is not a loopback address.
	TokenFile string `yaml:"token_file"`
	// TLS serves the admin API over TLS, so that the token (and what
	// Prometheus scrapes) never crosses a network in cleartext.
	TLS AdminTLS `yaml:"tls"`
}

// AdminTLS is the admin API's certificate: cert_file and key_file are
// re-read on reload and when they change on disk (a renewed certificate
// applies to the next handshake); with client_ca_file every client must
// present a certificate that CA signed.
type AdminTLS struct {
	CertFile     string `yaml:"cert_file"`
	KeyFile      string `yaml:"key_file"`
	ClientCAFile string `yaml:"client_ca_file"`
}

// Enabled reports whether the admin API is served over TLS.
func (t AdminTLS) Enabled() bool { return t.CertFile != "" }

// Cleartext says why the admin API's token would cross a network in
// cleartext ("" when it would not): it listens off loopback with a token
// and without TLS. rota check warns of it.
func (a Admin) Cleartext() string {
	if a.Listen == "" || a.TokenFile == "" || a.TLS.Enabled() || loopbackListen(a.Listen) {
		return ""
	}
	return fmt.Sprintf("admin.listen %q is not a loopback address and admin.tls is not set: the bearer token (and every answer, /metrics included) crosses the network in cleartext; set admin.tls, or keep the port on loopback and publish it only to this host", a.Listen)
}

// Registries holds the service registries listeners can discover from. A nil
// registry is not configured; a listener that uses it is an error.
type Registries struct {
	// State is where drain marks and weight overrides live: etcd or
	// consul (fleet-wide: every rota reading that registry applies them,
	// under rota/state/<listener>/<addr>), or local (this process). ""
	// is each listener's own discovery registry when it is etcd or
	// consul, else local.
	State string `yaml:"state"`
	// EmptyHold is how long a zero-instance answer right after a registry
	// outage, restart or resync is held before it empties a pool (it may be
	// a registry that lost its data); 0 disables the hold. Default 5s. A
	// deregistration seen on a healthy watch applies at once.
	EmptyHold time.Duration `yaml:"empty_hold"`
	// DNS is how discovery: dns (and a static list's host names) resolve;
	// always there, with the system's resolvers by default.
	DNS dns.Config `yaml:"dns"`
	// Docker is the engine discovery: docker follows.
	Docker Docker `yaml:"docker"`
	// Kubernetes is the API server discovery: kubernetes reads.
	Kubernetes Kubernetes `yaml:"kubernetes"`
	Consul     *Consul    `yaml:"consul"`
	Etcd       *Etcd      `yaml:"etcd"`
}

// State stores (registries.state).
const (
	StateLocal  = "local"
	StateEtcd   = "etcd"
	StateConsul = "consul"
)

// StateOf is where listener l's drain marks and weight overrides live:
// registries.state, else the registry l (or its first route that reads
// one) discovers from when it is etcd or consul, else local.
func (r Registries) StateOf(l Listener) string {
	if r.State != "" {
		return r.State
	}
	pools := []Pool{l.Pool}
	for _, rt := range l.Routes {
		pools = append(pools, rt.Pool)
	}
	for _, p := range pools {
		if p.Discovery == "etcd" || p.Discovery == "consul" {
			return p.Discovery
		}
	}
	return StateLocal
}

// Docker is a Docker engine's API. Empty fields take the Docker CLI's
// environment (DOCKER_HOST, DOCKER_CERT_PATH, DOCKER_TLS_VERIFY), else the
// local socket.
type Docker struct {
	// Host is unix:///path, tcp://host:port or http(s)://host:port.
	Host string `yaml:"host"`
	TLS  TLS    `yaml:"tls"`
}

// Kubernetes is how rota reaches a Kubernetes API server: in-cluster
// configuration when rota runs in a pod, else a kubeconfig as kubectl
// finds it (KUBECONFIG, ~/.kube/config).
type Kubernetes struct {
	Kubeconfig string `yaml:"kubeconfig"` // a kubeconfig file; "": as above
	Context    string `yaml:"context"`    // its context; "": the current one
}

// Consul is a Consul agent. Empty fields fall back to consul/api's own
// defaults and environment (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN(_FILE), ...).
type Consul struct {
	// Address is host:port, an http(s):// URL or unix:// socket path.
	Address    string `yaml:"address"`
	Datacenter string `yaml:"datacenter"`
	TokenFile  string `yaml:"token_file"`
}

// Etcd is an etcd cluster, or an etcd server embedded in rota.
type Etcd struct {
	// Endpoints are host:port or http(s)://host:port. Required unless
	// Embedded is set; see ClientEndpoints.
	Endpoints []string `yaml:"endpoints"`
	// Prefix ends with "/" (a leading "/" is optional); instance keys are
	// <prefix><service>/<id>. Default "services/", where gRPC's etcd
	// resolver looks for etcd:///services/<service>.
	Prefix       string    `yaml:"prefix"`
	Username     string    `yaml:"username"`
	PasswordFile string    `yaml:"password_file"`
	TLS          TLS       `yaml:"tls"`
	Embedded     *Embedded `yaml:"embedded"`
}

// TLS names the PEM files of a TLS client. CertFile and KeyFile go together.
type TLS struct {
	CAFile   string `yaml:"ca_file"`
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// Embedded, when present, makes rota run an etcd server in-process.
type Embedded struct {
	DataDir   string `yaml:"data_dir"`   // default "./rota-data"
	ClientURL string `yaml:"client_url"` // default "http://127.0.0.1:2379"
	// TLS serves clients over TLS (client_url https://); with a client CA,
	// only clients holding a certificate it signed get in. Required, CA
	// included, off loopback: whoever can write the registry receives the
	// service's traffic.
	TLS ServerTLS `yaml:"tls"`
}

// ServerTLS names the PEM files of a TLS server: its certificate and key,
// and ClientCAFile, when set, the CA that must have signed every client's
// certificate.
type ServerTLS struct {
	CertFile     string `yaml:"cert_file"`
	KeyFile      string `yaml:"key_file"`
	ClientCAFile string `yaml:"client_ca_file"`
}

// Enabled reports whether any file is named.
func (t ServerTLS) Enabled() bool { return t != ServerTLS{} }

// Listener is one proxied port and where its backends come from: one pool
// of targets (the Pool keys on the listener), or Routes chosen by the TLS
// server name.
type Listener struct {
	Name   string `yaml:"name"`   // unique; defaulted by Parse, see package doc
	Listen string `yaml:"listen"` // host:port, ":8080" listens on all addresses

	Pool `yaml:",inline"`

	// Routes, instead of a pool on the listener, route each client by the
	// server name (SNI) of its TLS ClientHello, passed through unchanged.
	Routes []Route `yaml:"routes"`

	// TLS terminates TLS in rota: clients speak TLS to it, the targets
	// get plaintext. nil: bytes pass through unchanged.
	TLS *TLSServer `yaml:"tls"`

	// DrainTimeout bounds the wait for open connections on shutdown (and
	// when a reload removes the listener); 0 closes them at once.
	DrainTimeout time.Duration `yaml:"drain_timeout"`

	// Settings are the connection settings, declared once in
	// proxy.Settings (their keys are its yaml tags: dial_timeout,
	// retries, max_conns, idle_timeout, replay_on_reset, proxy_protocol,
	// accept_proxy_protocol, proxy_header_timeout, removed_conn_grace,
	// max_conn_age, allow, deny, max_conns_per_client, sni_timeout),
	// parsed into typed values as the file is read.
	proxy.Settings `yaml:",inline"`
}

// Pool is where a listener's (or a route's) targets come from and how they
// are checked and picked.
type Pool struct {
	Service   string `yaml:"service"`   // required but with static
	Discovery string `yaml:"discovery"` // consul | etcd | static | dns | docker | kubernetes

	Tags []string `yaml:"tags"` // consul only: every tag must match
	// Connect (consul only) routes to the service's Consul Connect
	// endpoints (sidecars, Connect-native instances) with mTLS, as
	// ConnectService's leaf certificate (default "rota"): intentions name
	// it as the source.
	Connect        bool   `yaml:"connect"`
	ConnectService string `yaml:"connect_service"`
	// Port is the instances' port where the registry gives none: a DNS
	// host name's addresses, a container without a rota.port label; with
	// kubernetes, the endpoints' port to dial, by number or by the Service
	// port's name.
	Port Port `yaml:"port"`
	// Docker says which containers are the service's.
	Docker DockerMatch `yaml:"docker"`
	// Static is the static list; a host name is resolved every
	// registries.dns.refresh with the system's resolver, each address a
	// target.
	Static []StaticTarget `yaml:"static"` // static only: host:port, or {addr: host:port, weight: 3}

	// Health is how each target is probed (health.Config documents the
	// keys, its yaml tags).
	Health health.Config `yaml:"health"`

	// Panic routes over all discovered targets when none is healthy.
	Panic bool `yaml:"panic"`
	// Balance is the picking policy: round_robin (weighted, smooth; the
	// default), least_conn, random_two or hash.
	Balance balancer.Policy `yaml:"balance"`
	// HashKey is what hash hashes: client_ip (the default; the PROXY
	// header's client when one is accepted) or sni (routed listeners: the
	// TLS server name read to route).
	HashKey string `yaml:"hash_key"`
	// HashBalanceFactor bounds hash's load: no target takes more than
	// this times its weighted share of the open connections (the next in
	// the key's order takes the connection); 0 is unbounded.
	HashBalanceFactor float64 `yaml:"hash_balance_factor"`
	// SlowStart ramps a target that turns live while others serve from a
	// small share to its full weight over this long; 0 is off.
	SlowStart time.Duration `yaml:"slow_start"`
	// MaxConnsPerTarget caps the connections each target holds at once
	// (dialling or open); 0 is no cap. A new connection that finds every
	// live target at its cap waits in Queue, without its client being
	// read, or is refused when the queue is full (or has no room).
	MaxConnsPerTarget int   `yaml:"max_conns_per_target"`
	Queue             Queue `yaml:"queue"`
	// TargetTLS makes rota speak TLS (or mTLS) to the targets; its health
	// checks then use it too, unless health.tls says otherwise.
	TargetTLS *TLSClient `yaml:"target_tls"`
}

// TLSClient is how rota speaks TLS to targets (target_tls).
type TLSClient struct {
	// ServerName is verified against the target's certificate and sent
	// as SNI; default: the target's host (its address).
	ServerName string `yaml:"server_name"`
	// CAFile verifies the targets' certificates; default: the system's.
	CAFile string `yaml:"ca_file"`
	// CertFile and KeyFile are rota's client certificate (mTLS),
	// followed on disk like a listener's.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// InsecureSkipVerify accepts any certificate (tests, self-signed
	// targets on a trusted network).
	InsecureSkipVerify bool     `yaml:"insecure_skip_verify"`
	ALPN               []string `yaml:"alpn"`
}

// Queue is where connections wait for a place under max_conns_per_target,
// first in first out.
type Queue struct {
	// Size is how many may wait at once; 0: no queue (refused at the cap).
	Size int `yaml:"size"`
	// Timeout bounds a connection's wait; past it, it is closed and
	// counted (termination queue_timeout).
	Timeout time.Duration `yaml:"timeout"`
}

// Port is a port number, or the name of a Kubernetes Service port
// (discovery: kubernetes), parsed as the file is read.
type Port struct {
	Number int
	Name   string
}

// UnmarshalText reads a number or a port name.
func (p *Port) UnmarshalText(b []byte) error {
	s := string(b)
	if n, err := strconv.Atoi(s); err == nil {
		*p = Port{Number: n}
		return nil
	}
	if err := kubernetes.CheckPortName(s); err != nil {
		return fmt.Errorf("expected a port number or a Service port's name (discovery: kubernetes), which %w", err)
	}
	*p = Port{Name: s}
	return nil
}

// MarshalText writes what UnmarshalText reads.
func (p Port) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// IsZero reports an unset port.
func (p Port) IsZero() bool { return p == Port{} }

func (p Port) String() string {
	if p.Name != "" {
		return p.Name
	}
	return strconv.Itoa(p.Number)
}

// DockerMatch selects a service's containers (discovery: docker).
type DockerMatch struct {
	// Match is "label" (the default: containers labelled
	// rota.service=<service>) or "compose" (the compose service <service>
	// of rota's own compose project).
	Match string `yaml:"match"`
	// Network names the network whose address is dialled; "" the one the
	// container shares with rota, else its only one.
	Network string `yaml:"network"`
}

// Docker match modes.
const (
	MatchLabel   = "label"
	MatchCompose = "compose"
)

// Route is one service behind a routed listener, for the clients whose
// TLS server name matches SNI.
type Route struct {
	// Name labels the route in metrics and the admin API; default its
	// service, else "route-N". Unique within the listener.
	Name string `yaml:"name"`
	// SNI lists exact names ("api.example.com"), wildcards for any name
	// below a domain ("*.example.com") and "*" (anything: no SNI, not
	// TLS). The most specific match wins; no two routes share a pattern.
	SNI  []string `yaml:"sni"`
	Pool `yaml:",inline"`
	// AccessLog, set, overrides the listener's access_log for this route.
	AccessLog *bool `yaml:"access_log"`
	// TLS terminates this route's clients' TLS (the route chosen by the
	// ClientHello's server name); nil passes it through.
	TLS *TLSServer `yaml:"tls"`
}

// TLSServer is a listener's TLS termination. Its files are re-read on
// reload and when they change on disk; a file that does not load keeps
// the certificate in force.
type TLSServer struct {
	// Certs are the certificates; a handshake gets the first whose names
	// match the client's server name (SNI), else the first.
	Certs []CertFiles `yaml:"certs"`
	// ClientCAFile verifies clients' certificates.
	ClientCAFile string `yaml:"client_ca_file"`
	// ClientAuth is none, request (verified when given) or require;
	// default require with client_ca_file, else none.
	ClientAuth string `yaml:"client_auth"`
	// MinVersion is "1.2" (the default) or "1.3".
	MinVersion string `yaml:"min_version"`
	// ALPN are the protocols offered, in order of preference.
	ALPN []string `yaml:"alpn"`
}

// CertFiles is a certificate (chain) and its key, PEM files.
type CertFiles struct {
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// TLS client authentication modes (client_auth).
const (
	ClientAuthNone    = "none"
	ClientAuthRequest = "request"
	ClientAuthRequire = "require"
)

// Auth is client_auth with its default applied.
func (t *TLSServer) Auth() string {
	switch {
	case t.ClientAuth != "":
		return t.ClientAuth
	case t.ClientCAFile != "":
		return ClientAuthRequire
	}
	return ClientAuthNone
}

// Routed reports whether the listener routes by server name.
func (l *Listener) Routed() bool { return len(l.Routes) > 0 }

// Balance policies (the balance key): balancer's.
const (
	BalanceRoundRobin = balancer.RoundRobin
	BalanceLeastConn  = balancer.LeastConn
	BalanceRandomTwo  = balancer.RandomTwo
	BalanceHash       = balancer.Hash
)

// StaticTarget is one entry of a static list: "host:port" in the file, or
// a mapping {addr: host:port, weight: 3}.
type StaticTarget struct {
	Addr   string `yaml:"addr"`
	Weight int    `yaml:"weight"` // 1-1000; 0 (absent) is 1
	Backup bool   `yaml:"backup"` // only while no other target is live
}

// Statics makes a static list of addresses, each with no weight.
func Statics(addrs ...string) []StaticTarget {
	if addrs == nil {
		return nil
	}
	out := make([]StaticTarget, len(addrs))
	for i, a := range addrs {
		out[i] = StaticTarget{Addr: a}
	}
	return out
}

// Defaults that are not zero values. They are constants so that documentation
// and tests can name them.
const (
	DefaultAdminListen        = "127.0.0.1:9090"
	DefaultEtcdPrefix         = "services/"
	DefaultEmptyHold          = 5 * time.Second
	DefaultEmbeddedDataDir    = "./rota-data"
	DefaultEmbeddedClientURL  = "http://127.0.0.1:2379"
	DefaultCheck              = "tcp"
	DefaultHealthPath         = "/healthz"
	DefaultInterval           = 2 * time.Second
	DefaultTimeout            = 1 * time.Second
	DefaultRise               = 2
	DefaultFall               = 3
	DefaultBackoffMax         = 30 * time.Second
	DefaultDialTimeout        = 2 * time.Second
	DefaultRetries            = 2
	DefaultIdleTimeout        = 1 * time.Hour
	DefaultDrainTimeout       = 30 * time.Second
	DefaultProxyHeaderTimeout = 5 * time.Second
	DefaultSNITimeout         = 5 * time.Second
)

// Default returns a config with the admin defaults and no registries or
// listeners. It does not pass Validate until a listener is added.
func Default() *Config {
	return &Config{Admin: Admin{Listen: DefaultAdminListen}, Registries: Registries{EmptyHold: DefaultEmptyHold, DNS: dns.DefaultConfig()}}
}

// DefaultListener returns a listener with every default filled in; Name,
// Listen, Service and Discovery are left empty for the caller.
func DefaultListener() Listener {
	return Listener{
		Pool:         DefaultPool(),
		DrainTimeout: DefaultDrainTimeout,
		Settings: proxy.Settings{
			DialTimeout:        DefaultDialTimeout,
			Retries:            DefaultRetries,
			IdleTimeout:        DefaultIdleTimeout,
			ProxyHeaderTimeout: DefaultProxyHeaderTimeout,
			SNITimeout:         DefaultSNITimeout,
			RemovedConnGrace:   proxy.Never,
			AccessLog:          true,
		},
	}
}

// DefaultPool returns the pool defaults; Service and Discovery are left
// empty for the caller.
func DefaultPool() Pool {
	return Pool{
		Health: health.Config{
			Check:      DefaultCheck,
			Path:       DefaultHealthPath,
			Interval:   DefaultInterval,
			Timeout:    DefaultTimeout,
			Rise:       DefaultRise,
			Fall:       DefaultFall,
			BackoffMax: DefaultBackoffMax,
		},
		Balance:           BalanceRoundRobin,
		HashKey:           HashClientIP,
		HashBalanceFactor: DefaultHashBalanceFactor,
		Queue:             Queue{Timeout: DefaultQueueTimeout},
	}
}

// DefaultQueueTimeout is queue.timeout's default (HAProxy's timeout queue
// defaults to timeout connect; 5 s is what its documentation suggests).
const DefaultQueueTimeout = 5 * time.Second

// Hash keys (the hash_key key).
const (
	HashClientIP = "client_ip"
	HashSNI      = "sni"
)

// DefaultHashBalanceFactor is hash_balance_factor's default: HAProxy's
// hash-balance-factor 125 and the bounded-load paper's usual choice.
const DefaultHashBalanceFactor = 1.25

// DefaultEtcd returns an etcd registry with its defaults (the prefix) and no
// endpoints, for configs built in memory.
func DefaultEtcd() Etcd {
	return Etcd{Prefix: DefaultEtcdPrefix}
}

// DefaultEmbedded returns the defaults of an embedded etcd server.
func DefaultEmbedded() Embedded {
	return Embedded{DataDir: DefaultEmbeddedDataDir, ClientURL: DefaultEmbeddedClientURL}
}

// ClientEndpoints returns the endpoints an etcd client should dial: Endpoints
// when set, else the embedded server's client address. Parse already fills
// Endpoints this way; the method exists for configs built in memory, which
// Validate accepts with an embedded server and no endpoints.
func (e *Etcd) ClientEndpoints() []string {
	if len(e.Endpoints) > 0 || e.Embedded == nil {
		return e.Endpoints
	}
	if ep, ok := embeddedEndpoint(e.Embedded.ClientURL); ok {
		return []string{ep}
	}
	return nil
}

// usesEmbedded reports whether rota's own client dials the embedded server:
// there is one, and the endpoints are those Parse derives from it.
func (e *Etcd) usesEmbedded() bool {
	if e.Embedded == nil {
		return false
	}
	if len(e.Endpoints) == 0 {
		return true
	}
	ep, ok := embeddedEndpoint(e.Embedded.ClientURL)
	return ok && len(e.Endpoints) == 1 && e.Endpoints[0] == ep
}

// Load reads the file at path and parses it with Parse.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(data, path)
}

// Parse decodes data, applies defaults and validates the result. file names
// the source in errors and is stored in Config.File. On failure the config is
// nil and the error joins one *Error per problem, sorted by position.
func Parse(data []byte, file string) (*Config, error) {
	root, err := parseDocument(data, file)
	if err != nil {
		return nil, err
	}
	d := newDecoder(file)
	cfg := Default()
	cfg.File = file
	if root != nil {
		d.decode(root, "", cfg)
	}
	if d.tooBig {
		// The walk stopped half way; rules checked on what it got so far
		// would only add noise.
		return nil, joinErrors(d.errs)
	}
	d.applyDefaults(cfg)

	for _, e := range cfg.problems() {
		if d.covered(e.Field) {
			// The value was rejected while decoding; a second complaint
			// about the default that stood in for it would only confuse.
			continue
		}
		e.File = file
		e.Line, e.Column = d.position(e.Field)
		d.errs = append(d.errs, e)
	}
	if err := joinErrors(d.errs); err != nil {
		return nil, err
	}
	return cfg, nil
}

// Validate checks a config built in memory (for example from the quick flags
// of `rota serve`) with the same rules as Parse. It changes nothing: unlike
// Parse it does not default names, so every listener needs one. Errors carry
// the field path but no line numbers.
func (c *Config) Validate() error {
	if c == nil {
		return &Error{Msg: "no config"}
	}
	errs := c.problems()
	for _, e := range errs {
		e.File = c.File
	}
	return joinErrors(errs)
}

// embeddedEndpoint turns an embedded client URL into the host:port a client
// dials, mapping an unspecified host to loopback.
func embeddedEndpoint(clientURL string) (string, bool) {
	host, port, err := urlHostPort(clientURL)
	if err != nil {
		return "", false
	}
	if ip, err := netip.ParseAddr(host); err == nil && ip.IsUnspecified() {
		if ip.Is4() {
			host = "127.0.0.1"
		} else {
			host = "::1"
		}
	}
	return net.JoinHostPort(host, port), true
}
