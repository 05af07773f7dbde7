package etcd

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/naming/endpoints"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/discovery"
)

func TestParseInstance(t *testing.T) {
	const kp = "services/web/"
	cases := []struct {
		key, val string
		want     string // "" means malformed
		weight   int
		backup   bool
	}{
		{key: kp + "127.0.0.1:9000", val: `{"Op":0,"Addr":"127.0.0.1:9000","Metadata":null}`, want: "127.0.0.1:9000"},
		{key: kp + "127.0.0.1:9000", val: `{"Addr":"127.0.0.1:9000"}`, want: "127.0.0.1:9000"}, // Op omitted is Add
		{key: kp + "[::1]:9000", val: `{"Op":0,"Addr":"[::1]:9000","Metadata":{"w":1}}`, want: "[::1]:9000"},
		{key: kp + "web-1.internal:80", val: `{"Op":0,"Addr":"web-1.internal:80","Extra":true}`, want: "web-1.internal:80"},
		// Any id: endpoints.Manager users name their own; Addr is the instance.
		{key: kp + "instance-1", val: `{"Op":0,"Addr":"127.0.0.1:9000"}`, want: "127.0.0.1:9000"},
		{key: kp + "127.0.0.1:9000", val: `{"Op":0,"Addr":"127.0.0.1:9001"}`, want: "127.0.0.1:9001"},
		{key: kp + "a/b", val: `{"Op":0,"Addr":"127.0.0.1:9000"}`, want: "127.0.0.1:9000"},
		// Weights.
		{key: kp + "w3", val: `{"Op":0,"Addr":"127.0.0.1:9000","Metadata":{"weight":3}}`, want: "127.0.0.1:9000", weight: 3},
		{key: kp + "w1000", val: `{"Op":0,"Addr":"127.0.0.1:9000","Metadata":{"weight":1000,"zone":"a"}}`, want: "127.0.0.1:9000", weight: 1000},
		{key: kp + "md-string", val: `{"Op":0,"Addr":"127.0.0.1:9000","Metadata":"blue"}`, want: "127.0.0.1:9000"},
		{key: kp + "w0", val: `{"Op":0,"Addr":"127.0.0.1:9000","Metadata":{"weight":0}}`},
		{key: kp + "w1001", val: `{"Op":0,"Addr":"127.0.0.1:9000","Metadata":{"weight":1001}}`},
		{key: kp + "w-half", val: `{"Op":0,"Addr":"127.0.0.1:9000","Metadata":{"weight":1.5}}`},
		{key: kp + "w-text", val: `{"Op":0,"Addr":"127.0.0.1:9000","Metadata":{"weight":"3"}}`},
		// Backups.
		{key: kp + "b", val: `{"Op":0,"Addr":"127.0.0.1:9000","Metadata":{"backup":true,"weight":2}}`, want: "127.0.0.1:9000", weight: 2, backup: true},
		{key: kp + "b-false", val: `{"Op":0,"Addr":"127.0.0.1:9000","Metadata":{"backup":false}}`, want: "127.0.0.1:9000"},
		{key: kp + "b-text", val: `{"Op":0,"Addr":"127.0.0.1:9000","Metadata":{"backup":"yes"}}`},
		// Malformed.
		{key: kp + "127.0.0.1:9000", val: `not json`},
		{key: kp + "127.0.0.1:9000", val: `{"Op":1,"Addr":"127.0.0.1:9000"}`},
		{key: kp + "127.0.0.1:9000", val: `{"Op":0,"Addr":""}`},
		{key: kp + "127.0.0.1", val: `{"Op":0,"Addr":"127.0.0.1"}`},
		{key: kp + ":9000", val: `{"Op":0,"Addr":":9000"}`},
		{key: kp + "127.0.0.1:0", val: `{"Op":0,"Addr":"127.0.0.1:0"}`},
		{key: kp + "127.0.0.1:70000", val: `{"Op":0,"Addr":"127.0.0.1:70000"}`},
		{key: kp, val: `{"Op":0,"Addr":"127.0.0.1:9000"}`}, // no id
		{key: "services/web2/127.0.0.1:9000", val: `{"Op":0,"Addr":"127.0.0.1:9000"}`},
	}
	for _, c := range cases {
		got, err := parseInstance(kp, []byte(c.key), []byte(c.val))
		if got.Addr != c.want || got.Weight != c.weight || got.Backup != c.backup || (err == nil) != (c.want != "") {
			t.Errorf("parseInstance(%s, %s) = %+v, %v; want %q weight %d backup %v", c.key, c.val, got, err, c.want, c.weight, c.backup)
		}
	}
}

// TestRegisterValueFormat: what Register writes (through
// endpoints.Manager) is what the watcher reads and what etcd's own
// endpoints package lists.
func TestRegisterValueFormat(t *testing.T) {
	env := startEtcd(t)
	c := env.Client(t)
	em, err := endpoints.NewManager(c, "/services/web")
	if err != nil {
		t.Fatal(err)
	}
	if err := em.AddEndpoint(ctxT(t), "/services/web/127.0.0.1:9000", endpoints.Endpoint{Addr: "127.0.0.1:9000"}); err != nil {
		t.Fatal(err)
	}
	resp, err := c.Get(ctxT(t), "/services/web/127.0.0.1:9000")
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("get: %v %v", resp, err)
	}
	var v map[string]any
	if err := json.Unmarshal(resp.Kvs[0].Value, &v); err != nil {
		t.Fatal(err)
	}
	if len(v) != 3 || v["Op"] != 0.0 || v["Addr"] != "127.0.0.1:9000" || v["Metadata"] != nil {
		t.Fatalf("value %s, want {\"Op\":0,\"Addr\":\"127.0.0.1:9000\",\"Metadata\":null}", resp.Kvs[0].Value)
	}
	if in, err := parseInstance("/services/web/", resp.Kvs[0].Key, resp.Kvs[0].Value); err != nil || in.Addr != "127.0.0.1:9000" {
		t.Fatalf("parseInstance of endpoints.Manager's value: %+v %v", in, err)
	}
}

func TestKeysAndArguments(t *testing.T) {
	for _, c := range []struct{ prefix, service, addr, want string }{
		{"", "web", "127.0.0.1:1", "services/web/127.0.0.1:1"},
		{"services", "web", "127.0.0.1:1", "services/web/127.0.0.1:1"},
		{"/services", "web", "127.0.0.1:1", "/services/web/127.0.0.1:1"},
		{"/x/", "api", "[::1]:2", "/x/api/[::1]:2"},
	} {
		got, err := InstanceKey(c.prefix, c.service, c.addr)
		if err != nil || got != c.want {
			t.Errorf("InstanceKey(%q, %q, %q) = %q, %v; want %q", c.prefix, c.service, c.addr, got, err, c.want)
		}
	}
	for _, c := range []struct{ service, addr string }{{"", "127.0.0.1:1"}, {"a/b", "127.0.0.1:1"}, {"web", "nope"}} {
		if _, err := InstanceKey("", c.service, c.addr); err == nil {
			t.Errorf("InstanceKey(%q, %q) accepted", c.service, c.addr)
		}
		if err := Register(t.Context(), &clientv3.Client{}, "", c.service, c.addr, time.Second, nil); err == nil {
			t.Errorf("Register(%q, %q) accepted", c.service, c.addr)
		}
	}
	if _, err := NewWatcher(nil, "", "web", nil); err == nil {
		t.Error("NewWatcher(nil client) accepted")
	}
	if _, err := NewWatcher(&clientv3.Client{}, "", "", nil); err == nil {
		t.Error("NewWatcher(empty service) accepted")
	}
	if err := Register(t.Context(), nil, "", "web", "127.0.0.1:1", time.Second, nil); err == nil {
		t.Error("Register(nil client) accepted")
	}
}

// TestApplySkipsAppliedRevisions: events at or below the applied revision
// are ignored; all events of one newer revision (a transaction) apply.
func TestApplySkipsAppliedRevisions(t *testing.T) {
	w := &Watcher{keyPrefix: "/services/web/", log: zap.NewNop()}
	st := &watchState{rev: 10, keys: map[string]discovery.Instance{"/services/web/127.0.0.1:1": {Addr: "127.0.0.1:1"}}, bad: map[string]badValue{}}
	ev := func(typ mvccpb.Event_EventType, addr string, rev int64) *clientv3.Event {
		return &clientv3.Event{Type: typ, Kv: &mvccpb.KeyValue{
			Key: []byte("/services/web/" + addr), Value: []byte(instanceValue(addr)), ModRevision: rev}}
	}
	if w.apply(st, []*clientv3.Event{ev(mvccpb.DELETE, "127.0.0.1:1", 9), ev(mvccpb.PUT, "127.0.0.1:2", 10)}) {
		t.Fatal("events at applied revisions changed the state")
	}
	if !w.apply(st, []*clientv3.Event{ev(mvccpb.PUT, "127.0.0.1:3", 11), ev(mvccpb.DELETE, "127.0.0.1:1", 11)}) {
		t.Fatal("a new transaction did not change the state")
	}
	if len(st.keys) != 1 || st.keys["/services/web/127.0.0.1:3"].Addr == "" || st.rev != 11 {
		t.Fatalf("state %v at revision %d, want only 127.0.0.1:3 at 11", st.keys, st.rev)
	}
}

// TestNewClientAuth: username and a password file (trailing newline
// trimmed) reach an etcd with authentication enabled.
func TestNewClientAuth(t *testing.T) {
	env := startEtcd(t)
	admin := env.Client(t)
	ctx := ctxT(t)
	for _, step := range []func() error{
		func() error { _, err := admin.RoleAdd(ctx, "root"); return err },
		func() error { _, err := admin.UserAdd(ctx, "root", "s3cret"); return err },
		func() error { _, err := admin.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := admin.AuthEnable(ctx); return err },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	bad := filepath.Join(dir, "bad")
	if err := os.WriteFile(good, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bad, []byte("wrong\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	c, err := NewClient(Config{Endpoints: env.Endpoints(), Username: "root", PasswordFile: good})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Put(ctxT(t), "/services/web/127.0.0.1:1", instanceValue("127.0.0.1:1")); err != nil {
		t.Fatalf("put with the password from the file: %v", err)
	}

	c2, err := NewClient(Config{Endpoints: env.Endpoints(), Username: "root", PasswordFile: bad})
	if err == nil {
		defer c2.Close()
		_, err = c2.Get(ctxT(t), "/services/web/")
	}
	if err == nil {
		t.Fatal("a wrong password was accepted")
	}

	if _, err := NewClient(Config{Endpoints: env.Endpoints(), Username: "root", PasswordFile: filepath.Join(dir, "missing")}); err == nil {
		t.Error("missing password file accepted")
	}
	if _, err := NewClient(Config{Endpoints: env.Endpoints(), PasswordFile: good}); err == nil {
		t.Error("password file without username accepted")
	}
	if _, err := NewClient(Config{}); err == nil {
		t.Error("no endpoints accepted")
	}
}

// TestNewClientTLS: the TLS files are loaded (a CA alone is enough) and
// bad combinations are errors. The embedded server speaks plain HTTP, so
// no handshake is tested here.
func TestNewClientTLS(t *testing.T) {
	dir := t.TempDir()
	caFile, certFile, keyFile := writeSelfSigned(t, dir)
	eps := []string{"127.0.0.1:1"}
	for name, tc := range map[string]TLSConfig{
		"ca only":       {CAFile: caFile},
		"ca and client": {CAFile: caFile, CertFile: certFile, KeyFile: keyFile},
	} {
		c, err := NewClient(Config{Endpoints: eps, TLS: tc})
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		_ = c.Close()
	}
	for name, tc := range map[string]TLSConfig{
		"cert without key": {CertFile: certFile},
		"key without cert": {KeyFile: keyFile},
		"missing ca":       {CAFile: filepath.Join(dir, "nope.pem")},
		"key is not a key": {CertFile: certFile, KeyFile: certFile},
	} {
		if c, err := NewClient(Config{Endpoints: eps, TLS: tc}); err == nil {
			_ = c.Close()
			t.Errorf("%s: accepted", name)
		}
	}
}

func writeSelfSigned(t *testing.T, dir string) (ca, cert, key string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "rota-test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	cert = filepath.Join(dir, "cert.pem")
	key = filepath.Join(dir, "key.pem")
	if err := os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(key, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return cert, cert, key
}
