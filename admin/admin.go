// Package admin serves rota's operator HTTP interface: liveness and
// readiness probes, the JSON state of every listener and target, Prometheus
// metrics, a status page and a reload trigger. It only reads state; the
// server package owns it.
package admin

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/proxy"
	"github.com/rota-proxy/rota/server"
)

// State is what the admin interface reads. *server.Server implements it.
type State interface {
	Status() []server.ListenerStatus
	Ready() bool
	// Drain stops (on) or resumes new connections to a target; an error
	// wrapping server.ErrNotFound names what does not exist.
	Drain(listener, addr string, on bool) error
	// SetWeight overrides a target's registry weight (0 clears it), where
	// Drain keeps its marks; errors as Drain's.
	SetWeight(listener, addr string, weight int) error
}

// Handler serves the admin endpoints. The zero value is not usable: State is
// required.
type Handler struct {
	State State
	// Reload, if set, is run by POST /api/v1/reload; its error is reported
	// to the caller (and the running configuration stays).
	Reload func(ctx context.Context) error
	// Upgrade, if set, is run by POST /api/v1/upgrade: it starts the new
	// process and returns; the takeover follows (202).
	Upgrade func(ctx context.Context) error
	Logger  *zap.Logger
	// Version is shown on the status page and in the rota_build_info metric.
	Version string
	// Pprof serves Go's profiler under /debug/pprof/ (rota serve --pprof).
	Pprof bool
	// MaxConns bounds the admin connections open at once (default 64;
	// at it, the longest idle is closed for a new one: see connGuard);
	// IdleTimeout closes idle keep-alive ones (default 30s).
	MaxConns    int
	IdleTimeout time.Duration
	// TLS, if set, serves the API over TLS (certfile.Reloader's
	// ServerConfig: the certificate follows its files).
	TLS *tls.Config

	token atomic.Pointer[string] // the bearer token; nil: none (loopback only)
}

// Routes returns the admin mux, behind the access checks (see guard).
func (h *Handler) Routes() http.Handler { return h.guard(h.mux()) }

func (h *Handler) mux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", h.readyz)
	mux.HandleFunc("GET /api/v1/targets", h.targets)
	mux.HandleFunc("POST /api/v1/reload", h.reload)
	mux.HandleFunc("POST /api/v1/upgrade", h.upgrade)
	mux.HandleFunc("POST /api/v1/listeners/{listener}/targets/{addr}/drain", h.drain(true))
	mux.HandleFunc("POST /api/v1/listeners/{listener}/targets/{addr}/undrain", h.drain(false))
	mux.HandleFunc("POST /api/v1/listeners/{listener}/targets/{addr}/weight", h.weight(true))
	mux.HandleFunc("DELETE /api/v1/listeners/{listener}/targets/{addr}/weight", h.weight(false))
	mux.Handle("GET /metrics", h.metrics())
	mux.HandleFunc("GET /{$}", h.page)
	if h.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

func (h *Handler) readyz(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if !h.State.Ready() {
		w.WriteHeader(http.StatusServiceUnavailable)
		w.Write([]byte("not ready: waiting for the first discovery sync\n"))
		return
	}
	w.Write([]byte("ok\n"))
}

// TargetsResponse is the body of GET /api/v1/targets.
type TargetsResponse struct {
	Listeners []ListenerJSON `json:"listeners"`
}

// ListenerJSON is one listener in TargetsResponse. Name, listen, service,
// discovery and targets are the documented contract; the rest are extras
// for the status page. A routed listener's own pool is empty and its
// pools are in Routes. The listener's counters (proxy.Counters: their JSON
// fields, a number each, or an object by label) follow the fields below.
type ListenerJSON struct {
	Name   string `json:"name"`
	Listen string `json:"listen"`
	PoolJSON
	Addr string `json:"addr"`
	// Routes are the pools of a listener that routes by TLS server name.
	Routes []RouteJSON `json:"routes,omitempty"`

	// LastConnections are the listener's last connections, as the access
	// log records them.
	LastConnections []json.RawMessage `json:"last_connections,omitempty"`

	Counters []proxy.Reading `json:"-"`
}

// MarshalJSON writes l's fields, then its counters.
func (l ListenerJSON) MarshalJSON() ([]byte, error) {
	type fields ListenerJSON // without this method
	b, err := json.Marshal(fields(l))
	if err != nil {
		return nil, err
	}
	b = b[:len(b)-1] // the closing brace
	for _, r := range l.Counters {
		if r.JSON == "" {
			continue
		}
		var v any
		if r.Label == "" {
			v = r.Samples[0].Value
		} else {
			m := make(map[string]float64, len(r.Samples))
			for _, s := range r.Samples {
				m[s.Key] += s.Value // by route: their sum
			}
			v = m
		}
		val, err := json.Marshal(v)
		if err != nil {
			return nil, err
		}
		b = append(append(append(append(b, ',', '"'), r.JSON...), '"', ':'), val...)
	}
	return append(b, '}'), nil
}

// RouteJSON is one route of a routed listener: the server names it
// serves and its pool.
type RouteJSON struct {
	Name string   `json:"name"`
	SNI  []string `json:"sni"`
	PoolJSON
}

// PoolJSON is one pool, a listener's own or a route's: where its targets
// come from, how discovery fares, and the targets.
type PoolJSON struct {
	Service           string        `json:"service"`
	Discovery         string        `json:"discovery"`
	Targets           []TargetJSON  `json:"targets"`
	Synced            bool          `json:"synced"`
	LastSync          *time.Time    `json:"last_sync"`
	DiscoveryOK       bool          `json:"discovery_ok"`
	DiscoveryStale    bool          `json:"discovery_stale"`
	DiscoveryError    string        `json:"discovery_error"`
	DiscoveryWarnings []WarningJSON `json:"discovery_warnings"`
	DiscoveryUpdates  uint64        `json:"discovery_updates"`
	DiscoveryErrors   uint64        `json:"discovery_errors"`
	Panic             bool          `json:"panic"`
	// Queue is there when max_conns_per_target caps the targets.
	Queue *QueueJSON `json:"queue,omitempty"`
}

// QueueJSON is a pool's cap and queue: the connections waiting now.
type QueueJSON struct {
	MaxConnsPerTarget int `json:"max_conns_per_target"`
	Length            int `json:"length"`
}

// WarningJSON is a registry entry skipped as malformed.
type WarningJSON struct {
	Key    string `json:"key"`
	Reason string `json:"reason"`
}

// TargetJSON is one target in ListenerJSON.
type TargetJSON struct {
	Addr                 string     `json:"addr"`
	State                string     `json:"state"`
	Weight               int        `json:"weight"`
	EffectiveWeight      float64    `json:"effective_weight"`
	Draining             bool       `json:"draining"`
	DrainSource          string     `json:"drain_source,omitempty"` // local, etcd, consul or registry
	WeightSource         string     `json:"weight_source"`          // registry, local, etcd or consul
	Backup               bool       `json:"backup"`                 // new connections only while no primary is live
	ConsecutiveSuccesses int        `json:"consecutive_successes"`
	ConsecutiveFailures  int        `json:"consecutive_failures"`
	LastCheck            *time.Time `json:"last_check"`
	LastError            string     `json:"last_error"`
	ActiveConns          int64      `json:"active_conns"`
	TotalConns           uint64     `json:"total_conns"`

	Since       time.Time `json:"since"`
	DialErrors  uint64    `json:"dial_errors"`
	BytesIn     uint64    `json:"bytes_in"`
	BytesOut    uint64    `json:"bytes_out"`
	NextCheckMS int64     `json:"next_check_ms"`
	// RecentConns is the new connections of the last minute, History the
	// same second by second (oldest first): the status page sets a
	// target's share of them beside its share of the weights.
	RecentConns uint64   `json:"recent_conns"`
	History     []uint32 `json:"history"`
}

// Targets builds the /api/v1/targets document from ls.
func Targets(ls []server.ListenerStatus) TargetsResponse {
	out := TargetsResponse{Listeners: make([]ListenerJSON, 0, len(ls))}
	for _, l := range ls {
		lj := ListenerJSON{
			Name: l.Name, Listen: l.Listen, PoolJSON: poolJSON(l.PoolStatus), Addr: l.Addr,
			Counters: l.Counters,
		}
		for i := range l.LastConnections {
			b := accesslog.AppendJSON(nil, &l.LastConnections[i])
			lj.LastConnections = append(lj.LastConnections, b[:len(b)-1]) // less its newline
		}
		for _, r := range l.Routes {
			lj.Routes = append(lj.Routes, RouteJSON{Name: r.Name, SNI: r.SNI, PoolJSON: poolJSON(r.PoolStatus)})
		}
		out.Listeners = append(out.Listeners, lj)
	}
	return out
}

func poolJSON(p server.PoolStatus) PoolJSON {
	return PoolJSON{
		Service: p.Service, Discovery: p.Discovery,
		Targets: targetsJSON(p.Targets), Synced: p.Synced, LastSync: timePtr(p.LastSync),
		DiscoveryOK: p.DiscoveryOK, DiscoveryStale: p.DiscoveryStale, DiscoveryError: p.LastError,
		DiscoveryWarnings: warningsJSON(p.Warnings),
		DiscoveryUpdates:  p.DiscoveryUpdates, DiscoveryErrors: p.DiscoveryErrors, Panic: p.Panic,
		Queue: queueJSON(p),
	}
}

func queueJSON(p server.PoolStatus) *QueueJSON {
	if p.Queue == nil {
		return nil
	}
	return &QueueJSON{MaxConnsPerTarget: p.Queue.Cap(), Length: p.Queue.Length()}
}

func warningsJSON(ws []discovery.Warning) []WarningJSON {
	out := make([]WarningJSON, 0, len(ws))
	for _, w := range ws {
		out = append(out, WarningJSON{Key: w.Key, Reason: w.Reason})
	}
	return out
}

func targetsJSON(ts []server.TargetStatus) []TargetJSON {
	out := make([]TargetJSON, 0, len(ts))
	for _, t := range ts {
		h := t.Health
		history := t.History.Samples()
		out = append(out, TargetJSON{
			Addr: t.Addr, State: h.State.String(), Weight: max(t.Weight, 1),
			EffectiveWeight: t.EffectiveWeight, Draining: t.Draining, Backup: t.Backup,
			DrainSource: t.DrainSource, WeightSource: t.WeightSource,
			RecentConns: sum(history), History: nonNil(history),
			ConsecutiveSuccesses: h.ConsecutiveSuccesses, ConsecutiveFailures: h.ConsecutiveFailures,
			LastCheck: timePtr(h.LastCheck), LastError: h.LastError,
			ActiveConns: t.Active.Load(), TotalConns: t.Total.Load(),
			Since: h.Since.UTC(), DialErrors: t.DialErrors.Load(), BytesIn: t.BytesIn.Load(), BytesOut: t.BytesOut.Load(),
			NextCheckMS: h.NextCheckIn.Milliseconds(),
		})
	}
	return out
}

func sum(xs []uint32) uint64 {
	var s uint64
	for _, x := range xs {
		s += uint64(x)
	}
	return s
}

func nonNil(xs []uint32) []uint32 {
	if xs == nil {
		return []uint32{}
	}
	return xs
}

func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	u := t.UTC()
	return &u
}

func (h *Handler) targets(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, Targets(h.State.Status()))
}

func (h *Handler) reload(w http.ResponseWriter, r *http.Request) {
	if h.Reload == nil {
		writeJSON(w, http.StatusNotImplemented, map[string]string{"error": "reload needs rota serve --config"})
		return
	}
	if err := h.Reload(r.Context()); err != nil {
		writeJSON(w, http.StatusUnprocessableEntity, map[string]string{"error": err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "reloaded"})
}

func (h *Handler) upgrade(w http.ResponseWriter, r *http.Request) {
	if h.Upgrade == nil {
		writeJSON(w, http.StatusNotImplemented, map[string]string{"error": "upgrade needs rota serve on Linux or another Unix"})
		return
	}
	if err := h.Upgrade(r.Context()); err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": err.Error()})
		return
	}
	writeJSON(w, http.StatusAccepted, map[string]string{"status": "upgrading: the new process takes over once ready"})
}

// drain serves POST .../targets/{addr}/drain and .../undrain.
func (h *Handler) drain(on bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		name, addr := r.PathValue("listener"), r.PathValue("addr")
		if writeStateErr(w, h.State.Drain(name, addr, on)) {
			return
		}
		verb := "undrained"
		if on {
			verb = "drained"
		}
		if h.Logger != nil {
			h.Logger.Info("target "+verb+" through the admin API", zap.String("listener", name),
				zap.String("target", addr), zap.String("remote", r.RemoteAddr))
		}
		writeJSON(w, http.StatusOK, map[string]any{"listener": name, "target": addr, "draining": on})
	}
}

// maxWeight is the largest weight override, as a static target's.
const maxWeight = 1000

// weight serves POST .../targets/{addr}/weight ({"weight": n}) and DELETE.
func (h *Handler) weight(set bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		name, addr := r.PathValue("listener"), r.PathValue("addr")
		n := 0
		if set {
			var body struct {
				Weight *int `json:"weight"`
			}
			dec := json.NewDecoder(io.LimitReader(r.Body, 4096))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&body); err != nil || body.Weight == nil || *body.Weight < 1 || *body.Weight > maxWeight {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": `the body must be {"weight": n} with n from 1 to 1000 (DELETE clears the override)`})
				return
			}
			n = *body.Weight
		}
		if writeStateErr(w, h.State.SetWeight(name, addr, n)) {
			return
		}
		if h.Logger != nil {
			h.Logger.Info("target weight set through the admin API", zap.String("listener", name),
				zap.String("target", addr), zap.Int("weight", n), zap.String("remote", r.RemoteAddr))
		}
		resp := map[string]any{"listener": name, "target": addr, "weight": n}
		if n == 0 {
			resp["weight"] = nil
		}
		writeJSON(w, http.StatusOK, resp)
	}
}

// writeStateErr answers a State change's error, if any: 404 for what does
// not exist, else 500. It reports whether it answered.
func writeStateErr(w http.ResponseWriter, err error) bool {
	switch {
	case err == nil:
		return false
	case errors.Is(err, server.ErrNotFound):
		writeJSON(w, http.StatusNotFound, map[string]string{"error": err.Error()})
	default:
		writeJSON(w, http.StatusInternalServerError, map[string]string{"error": err.Error()})
	}
	return true
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// Server is a running admin HTTP server.
type Server struct {
	srv  *http.Server
	ln   net.Listener
	g    *connGuard
	done chan error
}

// Listen binds addr and serves h on it until Shutdown.
func Listen(addr string, h *Handler) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	return Serve(ln, h), nil
}

// Serve serves h on ln (an inherited socket, say) until Shutdown; it takes
// ownership of ln.
func Serve(ln net.Listener, h *Handler) *Server {
	maxConns, idle := h.MaxConns, h.IdleTimeout
	if maxConns <= 0 {
		maxConns = 64
	}
	if idle <= 0 {
		idle = 30 * time.Second
	}
	// At the cap, room is made for new connections (see connGuard): the
	// admin port cannot take the proxy's descriptors and memory, and its
	// probes are never starved.
	g := newConnGuard(maxConns)
	ln = guardedListener{Listener: ln, g: g}
	s := &Server{
		srv: &http.Server{
			Handler:           g.serve(h.Routes()),
			ReadHeaderTimeout: 5 * time.Second,
			ReadTimeout:       10 * time.Second,
			WriteTimeout:      time.Minute, // a CPU profile takes 30 s
			IdleTimeout:       idle,
			MaxHeaderBytes:    16 << 10,
			ErrorLog:          log.New(io.Discard, "", 0),
			ConnState:         g.connState,
			ConnContext:       g.connContext,
		},
		ln:   ln,
		g:    g,
		done: make(chan error, 1),
	}
	if h.TLS != nil {
		s.srv.TLSConfig = h.TLS
		go func() { s.done <- s.srv.ServeTLS(ln, "", "") }()
		return s
	}
	go func() { s.done <- s.srv.Serve(ln) }()
	return s
}

// Addr is the bound address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Handoff stops accepting, another process serving the socket now (an
// upgrade), and waits up to d for the connections accepted here but not yet
// read to begin their requests, so that Shutdown serves them rather than
// closing them as silent: a client connecting as the upgrade takes over
// gets its answer from one process or the other.
func (s *Server) Handoff(d time.Duration) {
	s.ln.Close()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	deadline := time.Now().Add(d)
	for s.g.fresh() > 0 && time.Now().Before(deadline) {
		<-tick.C
	}
}

// File returns a duplicate of the listening socket, for a new process to
// inherit (an upgrade); the caller owns it.
func (s *Server) File() (*os.File, error) {
	tl, ok := s.ln.(guardedListener).Listener.(*net.TCPListener)
	if !ok {
		return nil, fmt.Errorf("admin listener is a %T", s.ln)
	}
	return tl.File()
}

// Shutdown stops the server, waiting for requests in flight until ctx ends.
func (s *Server) Shutdown(ctx context.Context) error {
	s.g.close()
	err := s.srv.Shutdown(ctx)
	if serr := <-s.done; serr != nil && !errors.Is(serr, http.ErrServerClosed) {
		return serr
	}
	return err
}
