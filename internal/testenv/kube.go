package testenv

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// KubeAPIServerBinary returns the path of the kube-apiserver the
// Kubernetes tests run, built on first use by scripts/kube-apiserver-bin.
func KubeAPIServerBinary(t T) string {
	t.Helper()
	return scriptPath(t, "kube-apiserver-bin")
}

// KubeAPI is a real kube-apiserver process on a loopback port, backed by
// an etcd the caller gives, with RBAC authorization: the admin token is in
// system:masters (allowed everything), any other identity (a
// ServiceAccount's token) gets what RBAC grants it. It creates no
// EndpointSlices of its own (no controller manager, no endpoint
// reconciler): tests write them, as the EndpointSlice controller would.
// It can be stopped and started again on the same port; the test's
// cleanup stops it.
type KubeAPI struct {
	t    T
	bin  string
	dir  string
	args []string
	// URL is https://127.0.0.1:<port>; CAFile verifies its certificate.
	URL, CAFile string
	// Token is the admin's bearer token.
	Token string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	logs *bytes.Buffer
}

// StartKubeAPI starts an API server on etcd (a client URL) and returns
// once it answers /readyz. Several may share one etcd (each with its own
// prefix unless shareWith names another's, to see the same objects).
func StartKubeAPI(t T, etcd string, shareWith *KubeAPI) *KubeAPI {
	t.Helper()
	k := &KubeAPI{t: t, bin: KubeAPIServerBinary(t), dir: t.TempDir(), Token: rand.Text()}
	ports, err := freePorts(1)
	if err != nil {
		t.Fatalf("testenv: a port for kube-apiserver: %v", err)
	}
	ca := NewCA(t, "kube")
	cert, key := ca.Issue("kube-apiserver", "127.0.0.1", "localhost")
	prefix := "/registry-" + strings.ToLower(rand.Text()[:8])
	var saKey, saPub string
	if shareWith != nil {
		saKey, saPub = shareWith.flag("--service-account-signing-key-file"), shareWith.flag("--service-account-key-file")
		prefix = shareWith.flag("--etcd-prefix")
		k.Token = shareWith.Token
	} else {
		saKey, saPub = k.serviceAccountKeys()
	}
	k.CAFile = ca.File
	tokens := filepath.Join(k.dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(k.Token+`,admin,admin-uid,"system:masters"`+"\n"), 0o600); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	_, port, _ := strings.Cut(ports[0], ":")
	k.URL = "https://127.0.0.1:" + port
	k.args = []string{
		"--etcd-servers=" + etcd,
		"--etcd-prefix=" + prefix,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + port,
		"--tls-cert-file=" + cert,
		"--tls-private-key-file=" + key,
		"--cert-dir=" + filepath.Join(k.dir, "certs"),
		"--token-auth-file=" + tokens,
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + saPub,
		"--service-account-signing-key-file=" + saKey,
		"--service-cluster-ip-range=10.96.0.0/16",
		"--endpoint-reconciler-type=none",
		"--disable-admission-plugins=ServiceAccount",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
	}
	t.Cleanup(k.Stop)
	k.Start()
	return k
}

func (k *KubeAPI) flag(name string) string {
	for _, a := range k.args {
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
	}
	return ""
}

// serviceAccountKeys writes the key pair that signs and verifies
// ServiceAccount tokens.
func (k *KubeAPI) serviceAccountKeys() (private, public string) {
	k.t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		k.t.Fatalf("testenv: %v", err)
	}
	priv, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		k.t.Fatalf("testenv: %v", err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		k.t.Fatalf("testenv: %v", err)
	}
	private, public = filepath.Join(k.dir, "sa.key"), filepath.Join(k.dir, "sa.pub")
	for path, b := range map[string]*pem.Block{private: {Type: "PRIVATE KEY", Bytes: priv}, public: {Type: "PUBLIC KEY", Bytes: pub}} {
		if err := os.WriteFile(path, pem.EncodeToMemory(b), 0o600); err != nil {
			k.t.Fatalf("testenv: %v", err)
		}
	}
	return private, public
}

// Start starts the server (stopped, or not yet started) and waits until
// it is ready.
func (k *KubeAPI) Start() {
	k.t.Helper()
	k.mu.Lock()
	if k.cmd != nil {
		k.mu.Unlock()
		return
	}
	cmd := exec.Command(k.bin, k.args...)
	logs := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		k.mu.Unlock()
		k.t.Fatalf("testenv: start kube-apiserver: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	k.cmd, k.done, k.logs = cmd, done, logs
	k.mu.Unlock()

	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	defer hc.CloseIdleConnections()
	ready := func() bool {
		req, _ := http.NewRequest("GET", k.URL+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+k.Token)
		resp, err := hc.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	}
	if _, ok := Poll(90*time.Second, func() bool {
		select {
		case <-done:
			return true
		default:
		}
		return ready()
	}); !ok || !ready() {
		k.t.Fatalf("testenv: kube-apiserver not ready:\n%s", k.Logs())
	}
}

// Stop kills the server (SIGKILL: an API server that vanishes) and waits
// for it to exit; a no-op when stopped.
func (k *KubeAPI) Stop() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.cmd == nil {
		return
	}
	_ = k.cmd.Process.Kill()
	<-k.done
	k.cmd = nil
}

// Logs is what the running (or last) server printed, its tail.
func (k *KubeAPI) Logs() string {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.logs == nil {
		return ""
	}
	s := k.logs.String()
	return s[max(0, len(s)-8000):]
}

// Config is a client configuration for the admin, or for token.
func (k *KubeAPI) Config(token string) *rest.Config {
	if token == "" {
		token = k.Token
	}
	return &rest.Config{Host: k.URL, BearerToken: token, TLSClientConfig: rest.TLSClientConfig{CAFile: k.CAFile}, QPS: 1000, Burst: 1000}
}

// Client is an admin clientset.
func (k *KubeAPI) Client(t T) kubernetes.Interface {
	t.Helper()
	c, err := kubernetes.NewForConfig(k.Config(""))
	if err != nil {
		t.Fatalf("testenv: kubernetes client: %v", err)
	}
	return c
}

// Kubeconfig writes a kubeconfig file for token ("" for the admin) with
// namespace as its context's default, and returns its path.
func (k *KubeAPI) Kubeconfig(t T, token, namespace string) string {
	t.Helper()
	if token == "" {
		token = k.Token
	}
	path := filepath.Join(t.TempDir(), "kubeconfig")
	body := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: %q, certificate-authority: %q}
users:
- name: test
  user: {token: %q}
contexts:
- name: test
  context: {cluster: test, user: test, namespace: %q}
current-context: test
`, k.URL, k.CAFile, token, namespace)
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return path
}

func kptr[V any](v V) *V { return &v }

// Endpoint is an address with its conditions: "ready", "not-ready",
// "terminating" (serving), "gone" (terminating, not serving).
type Endpoint struct{ Addr, State string }

// PutEndpointSlice creates or replaces the EndpointSlice name of service
// svc, as the EndpointSlice controller would write it (ports http=8080
// and metrics=9090; each endpoint a pod named after its address).
func PutEndpointSlice(t T, cs kubernetes.Interface, ns, svc, name string, family discoveryv1.AddressType, eps ...Endpoint) {
	t.Helper()
	sl := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: family,
		Ports: []discoveryv1.EndpointPort{
			{Name: kptr("http"), Port: kptr(int32(8080)), Protocol: kptr(corev1.ProtocolTCP)},
			{Name: kptr("metrics"), Port: kptr(int32(9090)), Protocol: kptr(corev1.ProtocolTCP)},
		},
	}
	for _, e := range eps {
		c := discoveryv1.EndpointConditions{}
		switch e.State {
		case "ready":
			c = discoveryv1.EndpointConditions{Ready: kptr(true), Serving: kptr(true), Terminating: kptr(false)}
		case "not-ready":
			c = discoveryv1.EndpointConditions{Ready: kptr(false), Serving: kptr(false), Terminating: kptr(false)}
		case "terminating":
			c = discoveryv1.EndpointConditions{Ready: kptr(false), Serving: kptr(true), Terminating: kptr(true)}
		case "gone":
			c = discoveryv1.EndpointConditions{Ready: kptr(false), Serving: kptr(false), Terminating: kptr(true)}
		default:
			t.Fatalf("endpoint state %q", e.State)
		}
		sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{Addresses: []string{e.Addr}, Conditions: c,
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: "pod-" + strings.NewReplacer(".", "-", ":", "-").Replace(e.Addr)}})
	}
	api := cs.DiscoveryV1().EndpointSlices(ns)
	ctx := context.Background()
	old, err := api.Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = api.Create(ctx, sl, metav1.CreateOptions{})
	case err == nil:
		sl.ResourceVersion = old.ResourceVersion
		_, err = api.Update(ctx, sl, metav1.UpdateOptions{})
	}
	if err != nil {
		t.Fatalf("write slice %s/%s: %v", ns, name, err)
	}
}

// DeleteEndpointSlice deletes it.
func DeleteEndpointSlice(t T, cs kubernetes.Interface, ns, name string) {
	t.Helper()
	if err := cs.DiscoveryV1().EndpointSlices(ns).Delete(context.Background(), name, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete slice %s/%s: %v", ns, name, err)
	}
}
