// Package consul discovers the passing instances of a service in Consul by
// blocking query on /v1/health/service/<service>?passing.
package consul

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-cleanhttp"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/internal/retry"
)

// Defaults of a Watcher.
const (
	DefaultWaitTime   = 5 * time.Minute
	DefaultMinBetween = 20 * time.Millisecond
	DefaultBackoffMax = 10 * time.Second
)

// ClientConfig is how rota reaches Consul (registries.consul in rota.yaml).
// Empty fields leave what the standard environment says (CONSUL_HTTP_ADDR,
// CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE, CONSUL_CACERT,
// CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY, CONSUL_HTTP_SSL), as consul/api's
// DefaultConfig reads it.
type ClientConfig struct {
	Address    string // host:port or a URL (http:// or https://)
	Datacenter string
	TokenFile  string
}

// Client is a Consul API client whose idle connections can be closed.
type Client struct {
	API       *api.Client
	transport *http.Transport
}

// Close releases the client's idle connections. Watchers using it must have
// stopped.
func (c *Client) Close() {
	if c.transport != nil {
		c.transport.CloseIdleConnections()
	}
}

// NewClient builds a Consul API client from cfg and the environment. It does
// not contact Consul. The token is never logged or put in errors.
func NewClient(cfg ClientConfig) (*Client, error) {
	c := api.DefaultConfig()
	if cfg.Address != "" {
		addr := cfg.Address
		switch {
		case strings.HasPrefix(addr, "https://"):
			c.Scheme, addr = "https", strings.TrimPrefix(addr, "https://")
		case strings.HasPrefix(addr, "http://"):
			c.Scheme, addr = "http", strings.TrimPrefix(addr, "http://")
		}
		c.Address = strings.TrimSuffix(addr, "/")
	}
	if cfg.Datacenter != "" {
		c.Datacenter = cfg.Datacenter
	}
	if cfg.TokenFile != "" {
		if _, err := os.Stat(cfg.TokenFile); err != nil {
			return nil, fmt.Errorf("consul: token_file: %w", err)
		}
		c.TokenFile = cfg.TokenFile
		c.Token = "" // the file wins over CONSUL_HTTP_TOKEN, as it was asked for explicitly
	}
	if c.Transport == nil {
		c.Transport = cleanhttp.DefaultPooledTransport()
	}
	client, err := api.NewClient(c)
	if err != nil {
		return nil, fmt.Errorf("consul: client: %w", scrub(err, c.Token))
	}
	return &Client{API: client, transport: c.Transport}, nil
}

// Watcher follows the passing instances of one service. Create it with
// NewWatcher.
type Watcher struct {
	client  *api.Client
	service string
	tags    []string
	log     *zap.Logger

	// WaitTime is the blocking query's wait (default DefaultWaitTime).
	WaitTime time.Duration
	// MinBetween is the least time between two queries, so that an index
	// that churns while the result stays the same cannot spin (default
	// DefaultMinBetween).
	MinBetween time.Duration
	// BackoffMax caps the retry delay after errors (default
	// DefaultBackoffMax).
	BackoffMax time.Duration
	// Connect follows the service's Connect endpoints
	// (/v1/health/connect/<service>): its sidecar proxies and its
	// Connect-native instances, which are dialled with mTLS
	// (ConnectTLS), instead of the service's own addresses.
	Connect bool

	queries atomic.Uint64
}

// NewWatcher returns a watcher of service through client (which the caller
// owns; several watchers may share it). Every tag in tags must be present on
// an instance for it to count.
func NewWatcher(client *api.Client, service string, tags []string, logger *zap.Logger) (*Watcher, error) {
	if client == nil {
		return nil, errors.New("consul: nil client")
	}
	if service == "" {
		return nil, errors.New("consul: empty service name")
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	return &Watcher{
		client:  client,
		service: service,
		tags:    slices.Clone(tags),
		log:     logger.Named("consul").With(zap.String("service", service)),
	}, nil
}

// Queries is the number of health queries sent so far (for tests and
// metrics: a hot loop shows here).
func (w *Watcher) Queries() uint64 { return w.queries.Load() }

// Watch implements discovery.Watcher. It returns nil when ctx is done.
func (w *Watcher) Watch(ctx context.Context, sink discovery.Sink) error {
	wait := w.WaitTime
	if wait <= 0 {
		wait = DefaultWaitTime
	}
	minBetween := w.MinBetween
	if minBetween <= 0 {
		minBetween = DefaultMinBetween
	}
	boMax := w.BackoffMax
	if boMax <= 0 {
		boMax = DefaultBackoffMax
	}
	bo := retry.New(100*time.Millisecond, boMax)

	var (
		index   uint64
		last    discovery.Snapshot
		synced  bool
		failing bool
		lastAt  time.Time
		warned  = map[discovery.Warning]bool{} // malformed entries logged, while they last
	)
	for {
		// Rate limit: successive queries at least minBetween apart.
		if d := minBetween - time.Since(lastAt); d > 0 {
			if !retry.Sleep(ctx, d) {
				return nil
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		lastAt = time.Now()
		snap, newIndex, err := w.query(ctx, index, wait)
		if ctx.Err() != nil {
			return nil
		}
		held := false // an empty answer doubted like a resync
		if err == nil && len(snap.Instances) == 0 && len(last.Instances) > 0 {
			// An answer that empties the pool is confirmed with the leader
			// before it is believed: an agent's streamed view can briefly
			// come from a server that rejoined behind the others, or an
			// agent restarted without its data. If the leader cannot say
			// (no leader yet), Consul cannot answer the question: that is
			// an outage, and the last known instances stay, however long
			// it lasts (holding the answer for empty_hold would empty the
			// pool when an election takes longer).
			if confirmed, cerr := w.confirmEmpty(ctx); cerr != nil {
				err = fmt.Errorf("consul: an answer with no instances could not be confirmed with the leader: %w", cerr)
			} else if len(confirmed.Instances) > 0 {
				w.log.Warn("the agent answered no instances but the leader knows some; keeping the leader's", zap.Int("instances", len(confirmed.Instances)))
				snap = confirmed
			} else if n, uerr := w.unreachableOnly(ctx); uerr != nil {
				err = fmt.Errorf("consul: the leader answered no passing instances but could not say why: %w", uerr)
			} else if n > 0 {
				// A leader just elected re-checks every member and
				// reports those it was cut off from as failed until
				// gossip catches up (tens of milliseconds after a
				// partition heals): a verdict on the cluster's
				// membership, not on the instances, which rota probes
				// itself. Held like a resync; a deregistration or a
				// failing service check still applies at once.
				w.log.Warn("the leader answered no passing instances only because it cannot reach their nodes by gossip (serfHealth); holding it",
					zap.Int("instances", n))
				held = true
			}
		}
		if err != nil {
			if !failing {
				w.log.Warn("consul query failed; keeping the last known instances", zap.Error(err))
				failing = true
			}
			sink.Error(err)
			// After an error the agent may be a different one (restarted
			// without its data) whose index is below ours: a blocking query
			// at our index would then hang for the whole wait time. Start
			// over with a non-blocking query.
			index = 0
			if !retry.Sleep(ctx, bo.Next()) {
				return nil
			}
			continue
		}
		bo.Reset()
		// The first answer after an error, or from an agent whose index
		// went backwards (restarted, restored), is a resync: an empty one
		// may be an agent that lost its data.
		snap.Resync = !synced || failing || newIndex < index || held
		if failing {
			w.log.Info("consul reachable again")
			failing = false
		}
		index = nextIndex(index, newIndex)
		w.logWarnings(snap.Warnings, warned)
		if snap.Resync || !snap.Equal(last) {
			synced, last = true, snap
			sink.Update(snap)
		} else {
			sink.Synced()
		}
	}
}

// logWarnings logs each malformed entry once while it stays malformed
// (warned holds those logged; entries fixed or gone are forgotten).
func (w *Watcher) logWarnings(ws []discovery.Warning, warned map[discovery.Warning]bool) {
	now := make(map[discovery.Warning]bool, len(ws))
	for _, x := range ws {
		now[x] = true
		if !warned[x] {
			w.log.Warn("malformed registry entry skipped", zap.String("service_id", x.Key), zap.String("reason", x.Reason))
		}
	}
	for x := range warned {
		if !now[x] {
			delete(warned, x)
		}
	}
	for x := range now {
		warned[x] = true
	}
}

// nextIndex applies Consul's rules for blocking-query indexes: an index that
// goes backwards (an agent restarted, a snapshot restored) resets to 0 so
// that the next query returns at once with fresh data, and an index of 0
// returned by the server is treated as 1 so a real index is never followed by
// a non-blocking 0 again and again.
func nextIndex(prev, got uint64) uint64 {
	switch {
	case got < prev:
		return 0
	case got == 0:
		return 1
	}
	return got
}

// confirmEmpty asks again, consistently (the leader answers, having
// checked it still leads), without blocking.
func (w *Watcher) confirmEmpty(ctx context.Context) (discovery.Snapshot, error) {
	snap, _, err := w.queryOpts(ctx, &api.QueryOptions{RequireConsistent: true}, 10*time.Second)
	return snap, err
}

// serfHealth is the check of a node's membership that Consul's leader keeps:
// critical while the leader cannot reach the node's agent by gossip.
const serfHealth = "serfHealth"

// unreachableOnly asks the leader (consistently) how many of the service's
// instances fail nothing but their node's serfHealth check.
func (w *Watcher) unreachableOnly(ctx context.Context) (int, error) {
	entries, _, err := w.entries(ctx, &api.QueryOptions{RequireConsistent: true}, 10*time.Second, false)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range entries {
		if e != nil && failsOnlySerfHealth(e.Checks) {
			n++
		}
	}
	return n, nil
}

// failsOnlySerfHealth reports whether serfHealth is the one check of cs not
// passing (?passing drops an entry with any check not passing, warning too).
func failsOnlySerfHealth(cs api.HealthChecks) bool {
	serf := false
	for _, c := range cs {
		switch {
		case c == nil || c.Status == api.HealthPassing:
		case c.CheckID == serfHealth:
			serf = true
		default:
			return false
		}
	}
	return serf
}

func (w *Watcher) query(ctx context.Context, index uint64, wait time.Duration) (discovery.Snapshot, uint64, error) {
	// The server adds up to wait/16 of jitter to the wait; the deadline
	// leaves room for it and for the answer to travel.
	return w.queryOpts(ctx, &api.QueryOptions{WaitIndex: index, WaitTime: wait}, wait+wait/16+10*time.Second)
}

// entries asks for the service's instances (only the passing ones, or all)
// within timeout.
func (w *Watcher) entries(ctx context.Context, opts *api.QueryOptions, timeout time.Duration, passing bool) ([]*api.ServiceEntry, *api.QueryMeta, error) {
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	w.queries.Add(1)
	query := w.client.Health().ServiceMultipleTags
	if w.Connect {
		query = w.client.Health().ConnectMultipleTags
	}
	entries, meta, err := query(w.service, w.tags, passing, opts.WithContext(rctx))
	if err != nil {
		states := ""
		if !passing {
			states = " (all states)"
		}
		return nil, nil, discovery.TruncateError(fmt.Errorf("consul: health of %q%s: %w", w.service, states, scrub(err, "")))
	}
	return entries, meta, nil
}

func (w *Watcher) queryOpts(ctx context.Context, opts *api.QueryOptions, timeout time.Duration) (discovery.Snapshot, uint64, error) {
	entries, meta, err := w.entries(ctx, opts, timeout, true)
	if err != nil {
		return discovery.Snapshot{}, 0, err
	}
	if meta.ResultsFilteredByACLs {
		// Some instances were hidden from this token: routing over the rest
		// would silently shrink the pool, so keep the last good set.
		return discovery.Snapshot{}, 0, fmt.Errorf("consul: health of %q: results filtered by ACLs (the token lacks service:read or node:read)", w.service)
	}
	ins := make([]discovery.Instance, 0, len(entries))
	var warns []discovery.Warning
	for _, e := range entries {
		in, err := instance(e)
		if err != nil {
			id := ""
			if e != nil && e.Service != nil {
				id = e.Service.ID
			}
			warns = append(warns, discovery.Warning{Key: discovery.Truncate(id), Reason: discovery.Truncate(err.Error())})
			continue
		}
		ins = append(ins, in)
	}
	return discovery.Snapshot{Instances: discovery.SortInstances(ins), Warnings: discovery.SortWarnings(warns)}, meta.LastIndex, nil
}

// MetaBackup is the service meta key that makes an instance a backup
// ("true").
const MetaBackup = "rota_backup"

// instance is an entry's address (Service.Address, else Node.Address, with
// Service.Port) and weight (Service.Weights.Passing).
func instance(e *api.ServiceEntry) (discovery.Instance, error) {
	if e == nil || e.Service == nil {
		return discovery.Instance{}, errors.New("no service")
	}
	if e.Service.Port <= 0 || e.Service.Port > 65535 {
		return discovery.Instance{}, fmt.Errorf("port %d", e.Service.Port)
	}
	host := e.Service.Address
	if host == "" && e.Node != nil {
		host = e.Node.Address
	}
	if host == "" {
		return discovery.Instance{}, errors.New("no address (neither the service's nor its node's)")
	}
	in := discovery.Instance{Addr: net.JoinHostPort(host, strconv.Itoa(e.Service.Port))}
	// Consul defaults Passing to 1 and allows no 0; weights above the
	// proxy's range are capped rather than refused.
	if w := e.Service.Weights.Passing; w > 0 {
		in.Weight = min(w, 1000)
	}
	in.Backup = e.Service.Meta[MetaBackup] == "true"
	return in, nil
}

// scrub removes a token from an error's text, in case a transport error ever
// quotes a request carrying it.
func scrub(err error, token string) error {
	if token == "" {
		token = os.Getenv(api.HTTPTokenEnvName)
	}
	if token == "" || !strings.Contains(err.Error(), token) {
		return err
	}
	return errors.New(strings.ReplaceAll(err.Error(), token, "[redacted]"))
}
