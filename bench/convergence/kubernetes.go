package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"slices"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8s "k8s.io/client-go/kubernetes"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/discovery/kubernetes"
	"github.com/rota-proxy/rota/embedetcd"
	"github.com/rota-proxy/rota/internal/testenv"
)

// netListener is a registry whose instances must listen somewhere of its
// choosing: Kubernetes refuses loopback endpoints, so its backends are in a
// network namespace.
type netListener interface {
	Listen(i int) (net.Listener, error)
}

// kubernetesRegistry is a real kube-apiserver (scripts/kube-apiserver-bin)
// on an embedded etcd, a Service whose one EndpointSlice the benchmark
// writes as the EndpointSlice controller would (an endpoint added ready, or
// removed), and rota's discovery/kubernetes watcher on it.
type kubernetesRegistry struct {
	env     *env
	dir     string
	etcd    *embedetcd.Server
	ns      *testenv.NetNS
	cs      k8s.Interface
	slice   *discoveryv1.EndpointSlice // as last written
	watcher *kubernetes.Watcher
}

func startKubernetes(ctx context.Context, backends int, log *zap.Logger) (*kubernetesRegistry, error) {
	r := &kubernetesRegistry{env: &env{}}
	err := catch(func() error {
		var err error
		if r.dir, err = os.MkdirTemp("", "rota-bench-kube-etcd-"); err != nil {
			return err
		}
		if r.etcd, err = embedetcd.Start(ctx, embedetcd.Config{DataDir: r.dir, ClientURL: "http://127.0.0.1:0", Logger: log}); err != nil {
			return err
		}
		r.ns = testenv.StartNetNS(r.env, backends)
		api := testenv.StartKubeAPI(r.env, r.etcd.Endpoints()[0], nil)
		r.cs = api.Client(r.env)
		r.slice, err = r.cs.DiscoveryV1().EndpointSlices("default").Create(ctx, &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: service + "-a", Labels: map[string]string{discoveryv1.LabelServiceName: service}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080)), Protocol: ptr(corev1.ProtocolTCP)}},
		}, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		cl, err := kubernetes.NewClient(kubernetes.Config{Kubeconfig: api.Kubeconfig(r.env, "", "default")})
		if err != nil {
			return err
		}
		r.watcher, err = kubernetes.NewWatcher(cl, kubernetes.Name{Name: service}, kubernetes.Port{Name: "http"}, log)
		return err
	})
	if err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

func ptr[V any](v V) *V { return &v }

func (r *kubernetesRegistry) Describe() string {
	return "Kubernetes v1.37.2: a real kube-apiserver on loopback (scripts/kube-apiserver-bin) on an embedded etcd; " +
		"a change is the Service's EndpointSlice written with an endpoint added (ready) or removed; " +
		"the backends in a network namespace behind a veth pair"
}

func (r *kubernetesRegistry) Watcher() discovery.Watcher { return r.watcher }

// Listen opens backend i's listener, on the namespace's address i.
func (r *kubernetesRegistry) Listen(i int) (ln net.Listener, err error) {
	err = catch(func() error {
		ln = r.ns.Listen(r.env, net.JoinHostPort(r.ns.Addrs[i], "8080"))
		return nil
	})
	return ln, err
}

// write replaces the slice's endpoints with those in addrs, on the last
// version written (one request, as the controller makes).
func (r *kubernetesRegistry) write(ctx context.Context, change func([]string) []string) error {
	var ips []string
	for _, e := range r.slice.Endpoints {
		ips = append(ips, e.Addresses...)
	}
	ips = change(ips)
	sl := r.slice.DeepCopy()
	sl.Endpoints = nil
	for _, ip := range ips {
		sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{Addresses: []string{ip},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr(true), Serving: ptr(true), Terminating: ptr(false)}})
	}
	out, err := r.cs.DiscoveryV1().EndpointSlices("default").Update(ctx, sl, metav1.UpdateOptions{})
	if err != nil {
		return fmt.Errorf("kubernetes: update the EndpointSlice: %w", err)
	}
	r.slice = out
	return nil
}

func (r *kubernetesRegistry) Register(ctx context.Context, addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	return r.write(ctx, func(ips []string) []string {
		if !slices.Contains(ips, host) {
			ips = append(ips, host)
		}
		return ips
	})
}

func (r *kubernetesRegistry) Deregister(ctx context.Context, addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	return r.write(ctx, func(ips []string) []string {
		return slices.DeleteFunc(ips, func(ip string) bool { return ip == host })
	})
}

// Close is called after every Watch has returned.
func (r *kubernetesRegistry) Close() {
	r.env.close()
	if r.etcd != nil {
		r.etcd.Close()
	}
	if r.dir != "" {
		_ = os.RemoveAll(r.dir)
	}
}
