// Package docker discovers a service's instances among the containers of a
// Docker engine, so that a plain app in docker-compose needs no
// registration: a container is an instance while it runs, carries the
// label rota.service=<service> (or is the compose service <service> of
// rota's own compose project), and, if it has a healthcheck, is healthy.
//
// It follows the engine's event stream (no polling): an event about a
// container or a network connection makes the watcher list the service's
// containers again, once for a burst of events. A container that is sent
// SIGTERM, SIGINT, SIGQUIT or SIGKILL (docker stop, compose scale-in) leaves
// at once, before it exits, so that no new connection is sent to a process
// on its way out; one that dies, stops or turns unhealthy leaves with that
// event; a restarted one comes back with its new address.
//
// When the engine goes away (restarted, its socket gone) the last set
// stays and the watcher reconnects on backoff; the first list after it is
// marked Resync, so an empty one is held (empty_hold).
package docker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/events"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/client"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/internal/retry"
)

// Labels rota reads from a container.
const (
	LabelService = "rota.service" // the service it is an instance of
	LabelPort    = "rota.port"    // the port to dial
	LabelWeight  = "rota.weight"  // 1-1000
	LabelBackup  = "rota.backup"  // "true": only while no other instance is live

	labelComposeService = "com.docker.compose.service"
	labelComposeProject = "com.docker.compose.project"
	labelComposeOneOff  = "com.docker.compose.oneoff"
)

// Config is the engine to ask: registries.docker.
type Config struct {
	// Host is unix:///path, tcp://host:port or http(s)://host:port; ""
	// takes DOCKER_HOST, else the local socket.
	Host string
	// CAFile, CertFile and KeyFile are PEM files for a TLS engine; empty:
	// DOCKER_CERT_PATH and DOCKER_TLS_VERIFY, as the docker CLI reads them.
	CAFile, CertFile, KeyFile string
}

// NewClient returns a client of the engine cfg names that negotiates the
// API version with it (20.10 speaks 1.41; newer engines more).
func NewClient(cfg Config) (*client.Client, error) {
	opts := []client.Opt{client.FromEnv, client.WithAPIVersionNegotiation()}
	if cfg.Host != "" {
		opts = append(opts, client.WithHost(cfg.Host))
	}
	if cfg.CAFile != "" || cfg.CertFile != "" {
		opts = append(opts, client.WithTLSClientConfig(cfg.CAFile, cfg.CertFile, cfg.KeyFile))
	}
	c, err := client.NewClientWithOpts(opts...)
	if err != nil {
		return nil, fmt.Errorf("docker: %w", err)
	}
	return c, nil
}

// Match says which containers are a service's instances and how to reach
// them.
type Match struct {
	// Service is the rota.service label's value, or with Compose the
	// compose service's name.
	Service string
	// Compose matches the compose service Service of rota's own compose
	// project (or COMPOSE_PROJECT_NAME when rota runs outside one).
	Compose bool
	// Network names the network whose address is dialled; "": one the
	// container shares with rota, else the first by name.
	Network string
	// Port is the port when the container has no rota.port label.
	Port int
}

// Watcher follows one service's containers. It owns its client and
// closes it when Watch returns.
type Watcher struct {
	cl  *client.Client
	m   Match
	log *zap.Logger
	// hostname names rota's own container (Docker sets it to the short
	// ID); tests set it.
	hostname string
}

// NewWatcher watches the containers m selects on the engine cfg names.
func NewWatcher(cfg Config, m Match, log *zap.Logger) (*Watcher, error) {
	if m.Service == "" {
		return nil, errors.New("docker: no service")
	}
	if m.Port < 0 || m.Port > 65535 {
		return nil, fmt.Errorf("docker: port %d is not 0-65535", m.Port)
	}
	cl, err := NewClient(cfg)
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	host, _ := os.Hostname()
	return &Watcher{cl: cl, m: m, log: log, hostname: host}, nil
}

// self is what rota knows of its own container, if it runs in one.
type self struct {
	project  string   // its compose project
	networks []string // its networks, sorted
}

// Watch implements discovery.Watcher: it lists the service's containers,
// then again after every burst of events about containers or network
// connections, until ctx ends.
func (w *Watcher) Watch(ctx context.Context, sink discovery.Sink) error {
	defer w.cl.Close()
	bo := retry.New(250*time.Millisecond, 10*time.Second)
	pub := discovery.Publisher{Sink: sink}
	leaving := map[string]bool{} // containers sent a stop signal, by ID
	for ctx.Err() == nil {
		err := w.follow(ctx, func(snap discovery.Snapshot) {
			pub.Publish(snap)
			bo.Reset()
		}, leaving)
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, os.ErrPermission) || strings.Contains(err.Error(), "permission denied") {
			// The engine's socket is root:docker 0660 on most hosts.
			err = fmt.Errorf("%w (rota's user needs the socket's group: docker-compose group_add, see the README)", err)
		}
		pub.Fail(fmt.Errorf("docker: %w", err))
		if !retry.Sleep(ctx, bo.Next()) {
			return nil
		}
	}
	return nil
}

// follow subscribes to the engine's events, lists the containers and
// publishes, then lists again after each burst of relevant events, until
// the stream or a list fails (the error) or ctx ends.
func (w *Watcher) follow(ctx context.Context, publish func(discovery.Snapshot), leaving map[string]bool) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the client's event goroutine
	// Subscribe before the first list, so that no change falls between.
	msgs, errs := w.cl.Events(ctx, events.ListOptions{Filters: filters.NewArgs(
		filters.Arg("type", string(events.ContainerEventType)),
		filters.Arg("type", string(events.NetworkEventType)),
		filters.Arg("event", "start"), filters.Arg("event", "restart"),
		filters.Arg("event", "die"), filters.Arg("event", "stop"), filters.Arg("event", "kill"),
		filters.Arg("event", "pause"), filters.Arg("event", "unpause"),
		filters.Arg("event", "health_status"), filters.Arg("event", "destroy"),
		filters.Arg("event", "connect"), filters.Arg("event", "disconnect"),
	)})
	me, err := w.self(ctx)
	if err != nil {
		return err
	}
	for {
		snap, err := w.list(ctx, me, leaving)
		if err != nil {
			return err
		}
		publish(snap)
		// Wait for an event that matters, then take the rest of the
		// burst before listing once.
		relevant := false
		for !relevant {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case err := <-errs:
				if err == nil {
					err = errors.New("event stream ended")
				}
				return fmt.Errorf("events: %w", err)
			case m := <-msgs:
				relevant = w.note(m, leaving)
			}
		}
	drain:
		for {
			select {
			case m := <-msgs:
				w.note(m, leaving)
			default:
				break drain
			}
		}
	}
}

// stopSignals are the kill event signals that mean the container is on its
// way out (docker stop, compose down and scale-in send the first; the
// others are what users and orchestrators send to end a process).
var stopSignals = []string{"15", "2", "3", "9", "SIGTERM", "SIGINT", "SIGQUIT", "SIGKILL"}

// note records what event m says of a container and reports whether the
// service's containers may have changed.
func (w *Watcher) note(m events.Message, leaving map[string]bool) bool {
	if m.Type == events.NetworkEventType {
		return true // a container joined or left a network: maybe ours
	}
	if !w.ours(m.Actor.Attributes) {
		return false
	}
	id := m.Actor.ID
	switch {
	case m.Action == events.ActionKill && slices.Contains(stopSignals, m.Actor.Attributes["signal"]):
		leaving[id] = true
	case m.Action == events.ActionStart || m.Action == events.ActionRestart || m.Action == events.ActionUnPause:
		delete(leaving, id)
	case m.Action == events.ActionDestroy:
		delete(leaving, id)
	}
	return true
}

// ours reports whether labels (a container's, or an event's attributes,
// which carry them) select the container.
func (w *Watcher) ours(labels map[string]string) bool {
	if w.m.Compose {
		return labels[labelComposeService] == w.m.Service && labels[labelComposeOneOff] != "True"
	}
	return labels[LabelService] == w.m.Service
}

// self inspects rota's own container, when it runs in one; nil when not.
func (w *Watcher) self(ctx context.Context) (*self, error) {
	me := &self{project: os.Getenv("COMPOSE_PROJECT_NAME")}
	c, err := w.cl.ContainerInspect(ctx, w.hostname)
	switch {
	case err == nil && c.Config != nil && c.NetworkSettings != nil:
		if p := c.Config.Labels[labelComposeProject]; p != "" {
			me.project = p
		}
		for name := range c.NetworkSettings.Networks {
			me.networks = append(me.networks, name)
		}
		slices.Sort(me.networks)
	case err != nil && !isNotFound(err):
		return nil, fmt.Errorf("inspect rota's own container %q: %w", w.hostname, err)
	}
	if w.m.Compose && me.project == "" {
		return nil, errors.New("docker.match: compose: rota does not run in a compose project (and COMPOSE_PROJECT_NAME is not set)")
	}
	return me, nil
}

func isNotFound(err error) bool {
	var nf interface{ NotFound() }
	return errors.As(err, &nf) || strings.Contains(err.Error(), "No such container")
}

// list asks the engine for the service's running containers and turns
// them into a snapshot.
func (w *Watcher) list(ctx context.Context, me *self, leaving map[string]bool) (discovery.Snapshot, error) {
	f := filters.NewArgs(filters.Arg("status", "running"))
	if w.m.Compose {
		f.Add("label", labelComposeService+"="+w.m.Service)
		f.Add("label", labelComposeProject+"="+me.project)
	} else {
		f.Add("label", LabelService+"="+w.m.Service)
	}
	cs, err := w.cl.ContainerList(ctx, container.ListOptions{Filters: f})
	if err != nil {
		return discovery.Snapshot{}, fmt.Errorf("list containers: %w", err)
	}
	var snap discovery.Snapshot
	running := map[string]bool{}
	for _, c := range cs {
		running[c.ID] = true
		if !w.ours(c.Labels) || leaving[c.ID] || !healthy(c.Status) {
			continue
		}
		in, reason := w.instance(c, me)
		if reason != "" {
			snap.Warnings = append(snap.Warnings, discovery.Warning{Key: discovery.Truncate(name(c)), Reason: discovery.Truncate(reason)})
			continue
		}
		snap.Instances = append(snap.Instances, in)
	}
	for id := range leaving {
		if !running[id] {
			delete(leaving, id) // gone: a later start is a new life
		}
	}
	snap.Instances = discovery.SortInstances(snap.Instances)
	discovery.SortWarnings(snap.Warnings)
	return snap, nil
}

// healthy reads a listed container's health from its status ("Up 2
// minutes (healthy)"): the list gives it no other way on API 1.41. A
// container without a healthcheck has no parenthesis and counts as
// healthy; "(health: starting)" and "(unhealthy)" do not.
func healthy(status string) bool {
	if !strings.Contains(status, "(") {
		return true
	}
	return strings.Contains(status, "(healthy)")
}

func name(c container.Summary) string {
	if len(c.Names) > 0 {
		return strings.TrimPrefix(c.Names[0], "/")
	}
	return c.ID[:min(12, len(c.ID))]
}

// instance is the container's address, port and weight, or why it has
// none.
func (w *Watcher) instance(c container.Summary, me *self) (discovery.Instance, string) {
	port := w.m.Port
	if p, ok := c.Labels[LabelPort]; ok {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return discovery.Instance{}, fmt.Sprintf("label %s=%q is not a port (1-65535)", LabelPort, p)
		}
		port = n
	}
	if port == 0 {
		return discovery.Instance{}, fmt.Sprintf("no port: label the container %s=<port> or set the listener's port", LabelPort)
	}
	weight := 0
	if v, ok := c.Labels[LabelWeight]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1000 {
			return discovery.Instance{}, fmt.Sprintf("label %s=%q is not a weight (1-1000)", LabelWeight, v)
		}
		weight = n
	}
	backup := false
	if v, ok := c.Labels[LabelBackup]; ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return discovery.Instance{}, fmt.Sprintf("label %s=%q is not true or false", LabelBackup, v)
		}
		backup = b
	}
	ip, reason := w.address(c, me)
	if reason != "" {
		return discovery.Instance{}, reason
	}
	return discovery.Instance{Addr: net.JoinHostPort(ip.String(), strconv.Itoa(port)), Weight: weight, Backup: backup}, ""
}

// address picks the container's IP: on the configured network, else on a
// network rota's container shares, else (rota not in a container, or on the
// host's network) on its first network by name.
func (w *Watcher) address(c container.Summary, me *self) (netip.Addr, string) {
	if c.NetworkSettings == nil || len(c.NetworkSettings.Networks) == 0 {
		return netip.Addr{}, "on no network (network mode " + c.HostConfig.NetworkMode + ")"
	}
	nets := c.NetworkSettings.Networks
	names := make([]string, 0, len(nets))
	for n := range nets {
		names = append(names, n)
	}
	slices.Sort(names)
	var pick string
	switch {
	case w.m.Network != "":
		if _, ok := nets[w.m.Network]; !ok {
			return netip.Addr{}, fmt.Sprintf("not on network %q (on %s)", w.m.Network, strings.Join(names, ", "))
		}
		pick = w.m.Network
	default:
		for _, n := range names {
			if slices.Contains(me.networks, n) {
				pick = n
				break
			}
		}
		if pick == "" && len(me.networks) > 0 && !slices.Contains(me.networks, "host") {
			// rota runs in a container that cannot reach this one: a
			// label-matched container of another project, most likely.
			return netip.Addr{}, fmt.Sprintf("shares no network with rota (on %s; rota on %s): connect them or set docker.network",
				strings.Join(names, ", "), strings.Join(me.networks, ", "))
		}
		if pick == "" {
			pick = names[0]
		}
	}
	es := nets[pick]
	for _, s := range []string{es.IPAddress, es.GlobalIPv6Address} {
		if a, err := netip.ParseAddr(s); err == nil {
			return a.Unmap(), ""
		}
	}
	return netip.Addr{}, fmt.Sprintf("no address on network %q", pick)
}
