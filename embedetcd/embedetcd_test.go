package embedetcd

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func newClient(t *testing.T, s *Server) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{Endpoints: s.Endpoints(), DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	return c
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestDataSurvivesRestart: a key written before Close is there after Start
// on the same data dir, and the second start uses the same client port.
func TestDataSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	core, logs := observer.New(zap.InfoLevel)
	cfg := Config{DataDir: dir, ClientURL: "http://127.0.0.1:0", Logger: zap.New(core)}

	s, err := Start(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	c := newClient(t, s)
	if _, err := c.Put(ctxT(t), "/k", "v1"); err != nil {
		t.Fatal(err)
	}
	c.Close()
	s.Close()
	s.Close() // idempotent
	for _, e := range logs.All() {
		if e.Level >= zap.ErrorLevel {
			t.Errorf("etcd logged an error during a clean start and close: %s %v", e.Message, e.ContextMap())
		}
	}

	cfg.ClientURL = s.Endpoints()[0]
	s2, err := Start(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	c2 := newClient(t, s2)
	defer c2.Close()
	resp, err := c2.Get(ctxT(t), "/k")
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "v1" {
		t.Fatalf("after restart: got %v, want /k=v1", resp.Kvs)
	}
	for _, e := range logs.All() {
		if e.Level < zap.WarnLevel {
			t.Errorf("etcd logged below warn: %s", e.Message)
		}
		if strings.Contains(e.Message, "single port") || strings.Contains(e.Message, "simple token") {
			t.Errorf("start-up noise not filtered: %s", e.Message)
		}
	}
}

// TestTwoInstancesAndFastClose: two servers with default (ephemeral) peer
// URLs run side by side, and Close returns promptly although a client holds
// an open watch stream (etcd alone would wait its request timeout, > 7 s).
func TestTwoInstancesAndFastClose(t *testing.T) {
	var servers []*Server
	for range 2 {
		s, err := Start(t.Context(), Config{DataDir: t.TempDir(), ClientURL: "http://127.0.0.1:0"})
		if err != nil {
			t.Fatal(err)
		}
		servers = append(servers, s)
	}
	if servers[0].Endpoints()[0] == servers[1].Endpoints()[0] {
		t.Fatalf("same endpoint twice: %v", servers[0].Endpoints())
	}
	for _, s := range servers {
		c := newClient(t, s)
		wctx, cancel := context.WithCancel(t.Context())
		wch := c.Watch(wctx, "/w", clientv3.WithPrefix())
		if _, err := c.Put(ctxT(t), "/w/x", "1"); err != nil {
			t.Fatal(err)
		}
		<-wch // the watch stream is established
		start := time.Now()
		s.Close()
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("Close with an open watch took %s", d)
		} else {
			t.Logf("Close with an open watch took %s", d)
		}
		cancel()
		c.Close()
	}
}

func TestStartErrors(t *testing.T) {
	cases := map[string]Config{
		"no data dir":  {},
		"https client": {DataDir: t.TempDir(), ClientURL: "https://127.0.0.1:0"},
		"no port":      {DataDir: t.TempDir(), ClientURL: "http://127.0.0.1"},
		"bad peer":     {DataDir: t.TempDir(), ClientURL: "http://127.0.0.1:0", PeerURL: "tcp://x"},
	}
	for name, cfg := range cases {
		if s, err := Start(t.Context(), cfg); err == nil {
			s.Close()
			t.Errorf("%s: Start succeeded", name)
		}
	}

	// A busy client port is reported with its cause.
	s, err := Start(t.Context(), Config{DataDir: t.TempDir(), ClientURL: "http://127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_, err = Start(t.Context(), Config{DataDir: t.TempDir(), ClientURL: s.Endpoints()[0]})
	if err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("second server on a busy port: err = %v", err)
	}

	// A data dir that cannot be created.
	f := t.TempDir() + "/file"
	if err := os.WriteFile(f, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Start(t.Context(), Config{DataDir: f + "/sub"}); err == nil {
		t.Fatal("data dir under a file: Start succeeded")
	}
}
