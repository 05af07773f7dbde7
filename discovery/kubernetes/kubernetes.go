// Package kubernetes discovers a Service's instances from the Kubernetes API
// server's EndpointSlices (discovery.k8s.io/v1), which already say which
// pods are ready, which are on their way out, and in which zone.
//
// Every address of every slice labelled kubernetes.io/service-name=<name>
// is an instance: a ready endpoint is a candidate (rota's own checks still
// decide whether it is live), a serving endpoint that is terminating is
// drained (no new connections; open ones finish, within removed_conn_grace
// once it is gone), any other is out. The slices of one Service (one per
// address family, one per hundred endpoints) are merged into one snapshot.
//
// The Watcher runs client-go's Reflector, the list-then-watch loop inside
// every informer (its resource-version bookkeeping, relist on an expired
// watch; the backoff after failures is rota's pacer, which starts over
// once a call succeeds), over a store of its own rather than an informer's: an
// informer delivers a relist object by object, whereas the Reflector hands
// its store each relist whole (Replace), so a relist is one snapshot, and
// the first one after an outage or an expired watch is marked Resync so
// that an empty one is held (empty_hold) instead of emptying the pool.
//
// Ownership: Watch owns the Reflector's goroutine, which it starts and waits
// for; the store and the list-watch only pass what they see to Watch's
// goroutine over a channel, and Watch alone keeps the slices and talks to
// the sink.
package kubernetes

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"go.uber.org/zap"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/rota-proxy/rota/discovery"
)

// Config is how rota reaches the API server: registries.kubernetes.
type Config struct {
	// Kubeconfig is a kubeconfig file; "": in-cluster configuration when
	// rota runs in a pod, else KUBECONFIG, else ~/.kube/config, as kubectl.
	Kubeconfig string
	// Context is the kubeconfig context to use; "": its current one.
	Context string
	// UserAgent names rota to the API server (its audit log).
	UserAgent string
}

// Client is a clientset and the namespace a bare service name is in.
type Client struct {
	Set kubernetes.Interface
	// Namespace is the pod's own (in a cluster), else the kubeconfig
	// context's, else "default".
	Namespace string
}

// NewClient reads the configuration cfg names and returns a client of it.
func NewClient(cfg Config) (*Client, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if cfg.Kubeconfig != "" {
		rules.ExplicitPath = cfg.Kubeconfig
	}
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: cfg.Context})
	rc, err := cc.ClientConfig()
	if err != nil {
		if clientcmd.IsEmptyConfig(err) {
			return nil, errors.New("kubernetes: no configuration: rota does not run in a pod, and there is no kubeconfig (set registries.kubernetes.kubeconfig or KUBECONFIG)")
		}
		return nil, fmt.Errorf("kubernetes: %w", err)
	}
	rc = rest.CopyConfig(rc)
	rc.UserAgent = cmp.Or(cfg.UserAgent, "rota")
	// EndpointSlices have a protobuf encoding: smaller and cheaper to
	// decode than JSON on a busy cluster.
	rc.ContentType = "application/vnd.kubernetes.protobuf"
	rc.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	set, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: %w", err)
	}
	ns, _, err := cc.Namespace()
	if err != nil || ns == "" {
		ns = metav1.NamespaceDefault
	}
	return &Client{Set: set, Namespace: ns}, nil
}

// Port says which port of the endpoints to dial.
type Port struct {
	// Number is the endpoints' port (a Service's targetPort); Name the
	// Service port's name, which its EndpointSlices carry. Neither: the
	// only TCP port the slices list.
	Number int
	Name   string
}

func (p Port) String() string {
	if p.Name != "" {
		return p.Name
	}
	return strconv.Itoa(p.Number)
}

// Watcher follows one Service's EndpointSlices.
type Watcher struct {
	cl   *Client
	svc  Name // the namespace filled in
	port Port
	log  *zap.Logger
	// BackoffMax caps the wait between calls after failures (the pacer's;
	// 15 s, as against informers' 30 s); tests may shorten it.
	BackoffMax time.Duration
}

// NewWatcher watches svc (a bare name is in cl's namespace) and dials port.
func NewWatcher(cl *Client, svc Name, port Port, log *zap.Logger) (*Watcher, error) {
	if svc.Name == "" {
		return nil, errors.New("kubernetes: no service")
	}
	if port.Number < 0 || port.Number > 65535 {
		return nil, fmt.Errorf("kubernetes: port %d is not 0-65535", port.Number)
	}
	if svc.Namespace == "" {
		svc.Namespace = cl.Namespace
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &Watcher{cl: cl, svc: svc, port: port, log: log, BackoffMax: 15 * time.Second}, nil
}

// Service is the watched Service, namespace included.
func (w *Watcher) Service() Name { return w.svc }

// event is what the Reflector's side tells Watch: a whole list, one
// slice set or deleted, a failed call, or a watch that started.
type event struct {
	kind  eventKind
	list  []*discoveryv1.EndpointSlice
	slice *discoveryv1.EndpointSlice
	key   string
	err   error
}

type eventKind int

const (
	evReplace eventKind = iota
	evSet
	evDelete
	evFailed
	evWatching
)

// Watch implements discovery.Watcher.
func (w *Watcher) Watch(ctx context.Context, sink discovery.Sink) error {
	ctx, cancel := context.WithCancel(ctx)
	events := make(chan event)
	send := func(ev event) error {
		select {
		case events <- ev:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	selector := discoveryv1.LabelServiceName + "=" + w.svc.Name
	api := w.cl.Set.DiscoveryV1().EndpointSlices(w.svc.Namespace)
	pace := newPacer(w.BackoffMax)
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			if !pace.wait(ctx) {
				return nil, ctx.Err()
			}
			o.LabelSelector = selector
			l, err := api.List(ctx, o)
			pace.done(err)
			if err != nil {
				_ = send(event{kind: evFailed, err: w.explain("list", err)})
			}
			return l, err
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			if !pace.wait(ctx) {
				return nil, ctx.Err()
			}
			o.LabelSelector = selector
			wi, err := api.Watch(ctx, o)
			pace.done(err)
			if err != nil {
				_ = send(event{kind: evFailed, err: w.explain("watch", err)})
			} else {
				_ = send(event{kind: evWatching})
			}
			return wi, err
		},
	}
	st := &store{send: send}
	// The Reflector logs through klog; what it would say reaches the
	// pool as errors instead (discovery_ok, last_error, the log).
	quiet := logr.Discard()
	r := cache.NewReflectorWithOptions(lw, &discoveryv1.EndpointSlice{}, st, cache.ReflectorOptions{
		Name:    "kubernetes " + w.svc.String(),
		Logger:  &quiet,
		Backoff: reflectorPause(),
	})
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.RunWithContext(klog.NewContext(ctx, quiet))
	}()
	defer func() {
		cancel()
		<-done
	}()

	st2 := state{w: w, sink: sink, slices: map[string]*discoveryv1.EndpointSlice{}}
	for {
		var ev event
		select {
		case <-ctx.Done():
			return nil
		case ev = <-events:
		}
		changed := st2.apply(ev)
		// Take the rest of a burst (a rollout touches many slices)
		// before publishing once.
	burst:
		for {
			select {
			case ev = <-events:
				changed = st2.apply(ev) || changed
			default:
				break burst
			}
		}
		if changed {
			st2.publish()
		}
	}
}

// explain adds to an API error what a user can do about it.
func (w *Watcher) explain(verb string, err error) error {
	if apierrors.IsForbidden(err) {
		// What to grant first: the API's own message is long, and
		// errors are cut at discovery.MaxText.
		return discovery.TruncateError(fmt.Errorf("kubernetes: %s endpointslices of service %s: forbidden: grant rota get, list and watch on them in namespace %s (deployments/k8s/rbac.yaml): %w",
			verb, w.svc, w.svc.Namespace, err))
	}
	return discovery.TruncateError(fmt.Errorf("kubernetes: %s endpointslices of service %s: %w", verb, w.svc, err))
}

// state is Watch's own: the slices it knows and what it last told the sink.
type state struct {
	w       *Watcher
	sink    discovery.Sink
	slices  map[string]*discoveryv1.EndpointSlice // by name
	listed  bool                                  // a first list has been applied
	resync  bool                                  // the next snapshot is a relist's
	failing bool
	last    discovery.Snapshot
	sent    bool
}

// apply takes in ev and reports whether a snapshot is due.
func (s *state) apply(ev event) bool {
	switch ev.kind {
	case evFailed:
		s.failing = true
		s.sink.Error(ev.err)
		return false
	case evWatching:
		if s.failing && s.listed {
			// The watch goes on from where it broke: nothing was
			// missed, and the registry answers again.
			s.failing = false
			s.sink.Synced()
		}
		return false
	case evReplace:
		// Every list but the first follows an outage or an expired
		// watch: a resync, whose empty answer the pool doubts.
		s.resync = s.resync || s.listed
		s.listed, s.failing = true, false
		s.slices = make(map[string]*discoveryv1.EndpointSlice, len(ev.list))
		for _, sl := range ev.list {
			s.slices[sl.Name] = sl
		}
		return true
	case evSet:
		s.slices[ev.slice.Name] = ev.slice
	case evDelete:
		delete(s.slices, ev.key)
	}
	return s.listed
}

func (s *state) publish() {
	snap := s.w.snapshot(s.slices)
	snap.Resync = s.resync
	if !s.sent || snap.Resync || !snap.Equal(s.last) {
		s.sink.Update(snap)
	} else {
		s.sink.Synced()
	}
	s.last, s.sent, s.resync = snap, true, false
}

// snapshot merges slices into one snapshot: ready endpoints first, so
// that an address listed twice (an endpoint moving between slices) counts
// as ready when either says so.
func (w *Watcher) snapshot(byName map[string]*discoveryv1.EndpointSlice) discovery.Snapshot {
	names := make([]string, 0, len(byName))
	for n := range byName {
		names = append(names, n)
	}
	slices.Sort(names)
	var ready, draining []discovery.Instance
	var warns []discovery.Warning
	for _, n := range names {
		sl := byName[n]
		if sl.AddressType != discoveryv1.AddressTypeIPv4 && sl.AddressType != discoveryv1.AddressTypeIPv6 {
			warns = append(warns, discovery.Warning{Key: n, Reason: discovery.Truncate(fmt.Sprintf("address type %s: only IPv4 and IPv6 endpoints are dialled", sl.AddressType))})
			continue
		}
		port, why := w.pick(sl)
		if why != "" {
			if len(sl.Endpoints) > 0 {
				warns = append(warns, discovery.Warning{Key: n, Reason: discovery.Truncate(why)})
			}
			continue
		}
		for _, ep := range sl.Endpoints {
			c := ep.Conditions
			isReady := c.Ready == nil || *c.Ready // unknown: ready, as the API says
			serving := isReady
			if c.Serving != nil {
				serving = *c.Serving
			}
			terminating := c.Terminating != nil && *c.Terminating
			drain := terminating && serving
			if !drain && (terminating || !isReady) {
				continue // neither a candidate nor finishing its connections
			}
			meta := metadata(&ep)
			for _, a := range ep.Addresses {
				in := discovery.Instance{Addr: net.JoinHostPort(a, strconv.Itoa(port)), Metadata: meta, Draining: drain}
				if drain {
					draining = append(draining, in)
				} else {
					ready = append(ready, in)
				}
			}
		}
	}
	return discovery.Snapshot{
		Instances: discovery.SortInstances(append(ready, draining...)),
		Warnings:  discovery.SortWarnings(warns),
	}
}

// pick is the port of sl's endpoints to dial, or why there is none.
func (w *Watcher) pick(sl *discoveryv1.EndpointSlice) (int, string) {
	var tcp []discoveryv1.EndpointPort
	for _, p := range sl.Ports {
		if p.Port != nil && (p.Protocol == nil || *p.Protocol == "TCP") {
			tcp = append(tcp, p)
		}
	}
	list := func() string {
		var b strings.Builder
		for i, p := range tcp {
			if i > 0 {
				b.WriteString(", ")
			}
			if p.Name != nil && *p.Name != "" {
				b.WriteString(*p.Name + "=")
			}
			b.WriteString(strconv.Itoa(int(*p.Port)))
		}
		if len(tcp) == 0 {
			return "none"
		}
		return b.String()
	}
	switch {
	case w.port.Name != "":
		for _, p := range tcp {
			if p.Name != nil && *p.Name == w.port.Name {
				return int(*p.Port), ""
			}
		}
		return 0, fmt.Sprintf("no TCP port named %q (ports: %s)", w.port.Name, list())
	case w.port.Number != 0:
		if len(sl.Ports) == 0 {
			return w.port.Number, "" // a slice without ports: every port
		}
		for _, p := range tcp {
			if int(*p.Port) == w.port.Number {
				return w.port.Number, ""
			}
		}
		return 0, fmt.Sprintf("no TCP port %d among the endpoints' ports (%s); a number is the endpoints' (target) port, a name the Service port's", w.port.Number, list())
	case len(tcp) == 1:
		return int(*tcp[0].Port), ""
	case len(tcp) == 0:
		return 0, "no TCP port: set the listener's port"
	}
	return 0, fmt.Sprintf("several TCP ports (%s): set the listener's port to one's name or number", list())
}

// metadata is what an endpoint says of itself beyond its address.
func metadata(ep *discoveryv1.Endpoint) string {
	m := map[string]string{}
	if r := ep.TargetRef; r != nil && r.Name != "" {
		m[strings.ToLower(r.Kind)] = r.Name
	}
	if ep.NodeName != nil {
		m["node"] = *ep.NodeName
	}
	if ep.Zone != nil {
		m["zone"] = *ep.Zone
	}
	if len(m) == 0 {
		return ""
	}
	b, _ := json.Marshal(m)
	return string(b)
}

// store is the Reflector's store: it passes what it is given to Watch.
type store struct {
	send func(event) error
}

func asSlice(obj any) (*discoveryv1.EndpointSlice, error) {
	sl, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil, fmt.Errorf("kubernetes: the watch delivered a %T, not an EndpointSlice", obj)
	}
	return sl, nil
}

func (s *store) Add(obj any) error { return s.Update(obj) }

func (s *store) Update(obj any) error {
	sl, err := asSlice(obj)
	if err != nil {
		return err
	}
	return s.send(event{kind: evSet, slice: sl})
}

func (s *store) Delete(obj any) error {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	sl, err := asSlice(obj)
	if err != nil {
		return err
	}
	return s.send(event{kind: evDelete, key: sl.Name})
}

func (s *store) Replace(list []any, _ string) error {
	out := make([]*discoveryv1.EndpointSlice, 0, len(list))
	for _, obj := range list {
		sl, err := asSlice(obj)
		if err != nil {
			return err
		}
		out = append(out, sl)
	}
	return s.send(event{kind: evReplace, list: out})
}

func (s *store) Resync() error { return nil }
