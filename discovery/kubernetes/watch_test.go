package kubernetes_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	appsv1 "k8s.io/api/apps/v1"
	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8s "k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/discovery/kubernetes"
	"github.com/rota-proxy/rota/internal/testenv"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// client-go's process-wide workers, started once on first use.
		goleak.IgnoreTopFunction("k8s.io/apimachinery/pkg/util/wait.BackoffUntilWithContext.func1"),
		goleak.IgnoreTopFunction("k8s.io/klog/v2.(*flushDaemon).run.func1"),
		goleak.IgnoreAnyFunction("k8s.io/client-go/util/workqueue.(*Type).updateUnfinishedWorkLoop"),
		goleak.IgnoreAnyFunction("k8s.io/client-go/util/workqueue.(*delayingType).waitingLoop"),
	)
}

// cluster is a real API server on a real etcd, and an admin client.
func cluster(t *testing.T) (*testenv.KubeAPI, k8s.Interface) {
	t.Helper()
	etcd := testenv.StartEtcd(t)
	api := testenv.StartKubeAPI(t, etcd.Endpoints()[0], nil)
	return api, api.Client(t)
}

func namespace(t *testing.T, cs k8s.Interface, name string) {
	t.Helper()
	_, err := cs.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("namespace %s: %v", name, err)
	}
}

func ptr[T any](v T) *T { return &v }

func endpoint(addr, state string) testenv.Endpoint {
	return testenv.Endpoint{Addr: addr, State: state}
}

func putSlice(t testing.TB, cs k8s.Interface, ns, svc, name string, family discoveryv1.AddressType, eps ...testenv.Endpoint) {
	t.Helper()
	testenv.PutEndpointSlice(t, cs, ns, svc, name, family, eps...)
}

func deleteSlice(t testing.TB, cs k8s.Interface, ns, name string) {
	t.Helper()
	testenv.DeleteEndpointSlice(t, cs, ns, name)
}

// watcher watches svc through a kubeconfig (token "" for the admin) whose
// context's namespace is ns, quick to retry.
func watcher(t *testing.T, api *testenv.KubeAPI, token, ns, svc string, port kubernetes.Port, tune ...func(*kubernetes.Watcher)) (*kubernetes.Watcher, *testenv.Sink) {
	t.Helper()
	cl, err := kubernetes.NewClient(kubernetes.Config{Kubeconfig: api.Kubeconfig(t, token, ns)})
	if err != nil {
		t.Fatal(err)
	}
	name, err := kubernetes.ParseName(svc)
	if err != nil {
		t.Fatal(err)
	}
	w, err := kubernetes.NewWatcher(cl, name, port, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range tune {
		f(w)
	}
	return w, testenv.Watch(t, w)
}

func draining(s discovery.Snapshot) []string {
	var out []string
	for _, in := range s.Instances {
		if in.Draining {
			out = append(out, in.Addr)
		}
	}
	return out
}

// A Service's two slices merged; readiness, termination and a slice's
// deletion followed; the port chosen by its name; the namespace taken
// from the kubeconfig's context; another Service's slices ignored.
func TestWatchEndpointSlices(t *testing.T) {
	api, cs := cluster(t)
	namespace(t, cs, "shop")
	v4 := discoveryv1.AddressTypeIPv4
	putSlice(t, cs, "shop", "web", "web-a", v4, endpoint("10.1.0.1", "ready"), endpoint("10.1.0.2", "ready"), endpoint("10.1.0.3", "ready"))
	putSlice(t, cs, "shop", "web", "web-b", v4, endpoint("10.1.0.4", "ready"), endpoint("10.1.0.5", "ready"))
	putSlice(t, cs, "shop", "api", "api-a", v4, endpoint("10.1.9.9", "ready"))

	w, sink := watcher(t, api, "", "shop", "web", kubernetes.Port{Name: "metrics"})
	if got := w.Service().String(); got != "shop/web" {
		t.Fatalf("service %s, want shop/web (the kubeconfig context's namespace)", got)
	}
	snap := sink.WaitAddrs(t, "two slices, five targets", "10.1.0.1:9090", "10.1.0.2:9090", "10.1.0.3:9090", "10.1.0.4:9090", "10.1.0.5:9090")
	if snap.Resync || len(snap.Warnings) > 0 || draining(snap) != nil {
		t.Fatalf("first snapshot %+v", snap)
	}
	if want := `{"pod":"pod-10-1-0-1"}`; snap.Instances[0].Metadata != want {
		t.Errorf("metadata %q, want %q", snap.Instances[0].Metadata, want)
	}

	putSlice(t, cs, "shop", "web", "web-a", v4, endpoint("10.1.0.1", "ready"), endpoint("10.1.0.2", "not-ready"), endpoint("10.1.0.3", "ready"))
	sink.WaitAddrs(t, "a not-ready endpoint out", "10.1.0.1:9090", "10.1.0.3:9090", "10.1.0.4:9090", "10.1.0.5:9090")

	putSlice(t, cs, "shop", "web", "web-a", v4, endpoint("10.1.0.1", "ready"), endpoint("10.1.0.2", "not-ready"), endpoint("10.1.0.3", "terminating"))
	testenv.Eventually(t, "a terminating endpoint drained", 20*time.Second, func() bool {
		snap, _, _ = sink.Last()
		d := draining(snap)
		return len(d) == 1 && d[0] == "10.1.0.3:9090"
	})
	if got := strings.Join(snap.Addrs(), " "); got != "10.1.0.1:9090 10.1.0.3:9090 10.1.0.4:9090 10.1.0.5:9090" {
		t.Fatalf("targets %s: the terminating endpoint should still be one", got)
	}
	putSlice(t, cs, "shop", "web", "web-a", v4, endpoint("10.1.0.1", "ready"), endpoint("10.1.0.2", "not-ready"), endpoint("10.1.0.3", "gone"))
	sink.WaitAddrs(t, "a terminating endpoint no longer serving: out", "10.1.0.1:9090", "10.1.0.4:9090", "10.1.0.5:9090")

	deleteSlice(t, cs, "shop", "web-b")
	snap = sink.WaitAddrs(t, "a deleted slice's endpoints out", "10.1.0.1:9090")
	if snap.Resync {
		t.Fatal("a change on a healthy watch marked as a resync")
	}
	deleteSlice(t, cs, "shop", "web-a")
	sink.WaitAddrs(t, "the last slice deleted: no instances (a healthy watch is believed)")
	if errs := sink.Errors(); len(errs) > 0 {
		t.Fatalf("errors on a healthy watch: %v", errs)
	}
}

// A port the slices do not have is a warning naming the ports they do.
func TestWatchPortWarning(t *testing.T) {
	api, cs := cluster(t)
	putSlice(t, cs, "default", "web", "web-a", discoveryv1.AddressTypeIPv4, endpoint("10.1.0.1", "ready"))
	_, sink := watcher(t, api, "", "", "default/web", kubernetes.Port{Number: 80})
	testenv.Eventually(t, "a warning", 20*time.Second, func() bool {
		s, n, _ := sink.Last()
		return n > 0 && len(s.Warnings) == 1
	})
	s, _, _ := sink.Last()
	if want := "no TCP port 80 among the endpoints' ports (http=8080, metrics=9090)"; !strings.HasPrefix(s.Warnings[0].Reason, want) || s.Warnings[0].Key != "web-a" {
		t.Fatalf("warning %+v, want %q", s.Warnings[0], want)
	}
}

// The API server rota reads from stopped for 10 s while another, on the
// same etcd, takes writes: the last set stands (errors, no empty
// snapshot, no hot loop); restarted, the changes flow again. Then its
// watch's resource version expires (etcd compacted while it is down): a
// relist, marked Resync, brings the set, and an empty relist is marked
// Resync too, so the pool holds it (empty_hold).
func TestWatchThroughOutages(t *testing.T) {
	etcd := testenv.StartEtcd(t)
	api := testenv.StartKubeAPI(t, etcd.Endpoints()[0], nil)
	writer := testenv.StartKubeAPI(t, etcd.Endpoints()[0], api)
	cs := writer.Client(t)
	v4 := discoveryv1.AddressTypeIPv4
	putSlice(t, cs, "default", "web", "web-a", v4, endpoint("10.1.0.1", "ready"), endpoint("10.1.0.2", "ready"))
	// Retries at most 2 s apart (3 s with jitter; rota's is 15 s): the
	// API server's restarts take 6 s or more, and the waits below are for
	// its next retry after that.
	_, sink := watcher(t, api, "", "default", "web", kubernetes.Port{Name: "http"}, func(w *kubernetes.Watcher) { w.BackoffMax = 2 * time.Second })
	sink.WaitAddrs(t, "two targets", "10.1.0.1:8080", "10.1.0.2:8080")

	updatesBefore := len(sink.Updates())
	api.Stop()
	stopped := time.Now()
	testenv.Eventually(t, "the outage reported", 20*time.Second, func() bool { return len(sink.Errors()) > 0 })
	putSlice(t, cs, "default", "web", "web-a", v4, endpoint("10.1.0.1", "ready"), endpoint("10.1.0.2", "ready"), endpoint("10.1.0.3", "ready"))
	time.Sleep(time.Until(stopped.Add(10 * time.Second))) // the outage's length is the test's subject
	errs := sink.Errors()
	if n := len(sink.Updates()); n != updatesBefore {
		t.Fatalf("%d updates while the API server was down", n-updatesBefore)
	}
	// Backoff from 250 ms growing 1.5x to 2 s, with jitter: 7 to 13 tries
	// in 10 s; a hot loop would be hundreds.
	if len(errs) > 25 {
		t.Fatalf("%d errors in a 10 s outage: a hot loop", len(errs))
	}
	t.Logf("10 s outage: %d failed calls, the last: %v", len(errs), errs[len(errs)-1])
	if !strings.Contains(errs[len(errs)-1].Error(), "kubernetes: ") {
		t.Errorf("error %q does not say where it comes from", errs[len(errs)-1])
	}
	api.Start()
	sink.WaitAddrs(t, "the change made during the outage", "10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080")

	// The watch's resource version expires.
	api.Stop()
	putSlice(t, cs, "default", "web", "web-a", v4, endpoint("10.1.0.1", "ready"))
	putSlice(t, cs, "default", "web", "web-b", v4, endpoint("10.1.0.7", "ready"))
	rev := etcdRevision(t, etcd)
	etcd.Compact(t, rev)
	before := len(sink.Updates())
	api.Start()
	snap := sink.WaitAddrs(t, "the relist after the watch expired", "10.1.0.1:8080", "10.1.0.7:8080")
	if !snap.Resync {
		t.Error("the relist after an expired watch is not marked Resync")
	}
	for _, u := range sink.Updates()[before:] {
		if len(u.Instances) == 0 {
			t.Fatalf("an empty snapshot during the relist: %+v", u)
		}
	}

	// An empty relist right after an outage: Resync, so it is held.
	api.Stop()
	deleteSlice(t, cs, "default", "web-a")
	deleteSlice(t, cs, "default", "web-b")
	api.Start()
	snap = sink.WaitAddrs(t, "the empty relist")
	if !snap.Resync {
		t.Fatal("an empty relist after an outage is not marked Resync: the pool would not hold it")
	}
}

func etcdRevision(t *testing.T, e *testenv.Etcd) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := e.Client(t).Get(ctx, "/")
	if err != nil {
		t.Fatal(err)
	}
	return r.Header.Revision
}

// rota with the shipped ServiceAccount and RBAC (deployments/k8s/rbac.yaml)
// and a token bound to it: it watches its own namespace, and in another it
// is refused with an error that says what to grant.
func TestWatchWithShippedRBAC(t *testing.T) {
	api, cs := cluster(t)
	namespace(t, cs, "shop")
	namespace(t, cs, "other")
	applyRBAC(t, cs, "shop")
	ctx := context.Background()
	tr, err := cs.CoreV1().ServiceAccounts("shop").CreateToken(ctx, "rota",
		&authv1.TokenRequest{Spec: authv1.TokenRequestSpec{ExpirationSeconds: ptr(int64(3600))}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token for the ServiceAccount: %v", err)
	}
	v4 := discoveryv1.AddressTypeIPv4
	putSlice(t, cs, "shop", "web", "web-a", v4, endpoint("10.1.0.1", "ready"))
	putSlice(t, cs, "other", "web", "web-a", v4, endpoint("10.2.0.1", "ready"))

	_, own := watcher(t, api, tr.Status.Token, "shop", "web", kubernetes.Port{Name: "http"})
	if _, ok := testenv.Poll(20*time.Second, func() bool {
		s, _, _ := own.Last()
		return strings.Join(s.Addrs(), " ") == "10.1.0.1:8080"
	}); !ok {
		t.Fatalf("its own namespace's Service not seen; last error: %v", own.LastError())
	}

	_, other := watcher(t, api, tr.Status.Token, "shop", "other/web", kubernetes.Port{Name: "http"})
	testenv.Eventually(t, "refused in another namespace", 20*time.Second, func() bool { return other.LastError() != nil })
	msg := other.LastError().Error()
	for _, want := range []string{"forbidden", `"system:serviceaccount:shop:rota"`, "endpointslices", "namespace other", "deployments/k8s/rbac.yaml"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not say %s", msg, want)
		}
	}
	if _, n, _ := other.Last(); n != 0 {
		t.Fatal("a refused watch delivered a snapshot")
	}
}

// applyRBAC creates deployments/k8s/rbac.yaml's objects in ns.
func applyRBAC(t *testing.T, cs k8s.Interface, ns string) {
	t.Helper()
	apply(t, cs, ns, "../../deployments/k8s/rbac.yaml")
}

// apply creates the objects of a manifest file in ns, as kubectl apply -n
// (and kustomize's namespace) would: the API server validates them.
func apply(t *testing.T, cs k8s.Interface, ns, file string) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, doc := range strings.Split(string(b), "\n---\n") {
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode([]byte(doc), nil, nil)
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		create := metav1.CreateOptions{}
		switch o := obj.(type) {
		case *corev1.ServiceAccount:
			_, err = cs.CoreV1().ServiceAccounts(ns).Create(ctx, o, create)
		case *rbacv1.Role:
			_, err = cs.RbacV1().Roles(ns).Create(ctx, o, create)
		case *rbacv1.RoleBinding:
			for i := range o.Subjects {
				o.Subjects[i].Namespace = ns // as kustomize's namespace does
			}
			_, err = cs.RbacV1().RoleBindings(ns).Create(ctx, o, create)
		case *corev1.ConfigMap:
			_, err = cs.CoreV1().ConfigMaps(ns).Create(ctx, o, create)
		case *corev1.Service:
			_, err = cs.CoreV1().Services(ns).Create(ctx, o, create)
		case *appsv1.Deployment:
			_, err = cs.AppsV1().Deployments(ns).Create(ctx, o, create)
		case *policyv1.PodDisruptionBudget:
			_, err = cs.PolicyV1().PodDisruptionBudgets(ns).Create(ctx, o, create)
		default:
			err = fmt.Errorf("unexpected %T", obj)
		}
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
	}
}

// The shipped manifests are valid to a real API server, and the
// Deployment runs as the ServiceAccount rbac.yaml grants.
func TestShippedManifestsApply(t *testing.T) {
	_, cs := cluster(t)
	namespace(t, cs, "rota")
	for _, f := range []string{"rbac.yaml", "configmap.yaml", "service.yaml", "pdb.yaml", "deployment.yaml"} {
		apply(t, cs, "rota", "../../deployments/k8s/"+f)
	}
	d, err := cs.AppsV1().Deployments("rota").Get(context.Background(), "rota", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if sa := d.Spec.Template.Spec.ServiceAccountName; sa != "rota" {
		t.Fatalf("the Deployment runs as %q, not rbac.yaml's ServiceAccount", sa)
	}
}

// NewClient without any configuration says what to set.
func TestNoConfiguration(t *testing.T) {
	t.Setenv("KUBECONFIG", "")
	t.Setenv("HOME", t.TempDir())
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	_, err := kubernetes.NewClient(kubernetes.Config{})
	if err == nil || !strings.Contains(err.Error(), "no configuration") {
		t.Fatalf("err %v", err)
	}
	_, err = kubernetes.NewClient(kubernetes.Config{Kubeconfig: "/nonexistent/kubeconfig"})
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/kubeconfig") {
		t.Fatalf("err %v", err)
	}
}
