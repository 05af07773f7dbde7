package etcd

import (
	"context"
	"net"
	"slices"
	"testing"
	"time"

	"go.etcd.io/etcd/client/v3/naming/endpoints"
	"go.etcd.io/etcd/client/v3/naming/resolver"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// rota and gRPC share one registry: what etcd's own endpoints.Manager
// registers (any id) rota routes, and what `rota register` writes a real
// gRPC client resolves through etcd's naming resolver, with no flags on
// either side.
func TestOneRegistryWithGRPC(t *testing.T) {
	env := startEtcd(t)
	c := newClient(t, env.Endpoints())

	// gRPC's way in, rota reads it.
	em, err := endpoints.NewManager(c, "services/web")
	if err != nil {
		t.Fatal(err)
	}
	if err := em.AddEndpoint(ctxT(t), "services/web/instance-1", endpoints.Endpoint{Addr: "127.0.0.1:9501", Metadata: map[string]any{"weight": 4}}); err != nil {
		t.Fatal(err)
	}
	w := newWatcher(t, c, "web", nil)
	rec := startWatch(t, w)
	rec.waitSnap(t, wait, "127.0.0.1:9501")
	if u, _ := rec.last(); u.snap.Instances[0].Weight != 4 {
		t.Fatalf("instance %+v, want weight 4 from endpoints.Manager's metadata", u.snap.Instances[0])
	}

	// rota's way in (a real gRPC server registered by Register), a real
	// gRPC client resolves it through etcd:///services/web.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go srv.Serve(ln)
	defer srv.Stop()
	if err := em.DeleteEndpoint(ctxT(t), "services/web/instance-1"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	regDone := make(chan error, 1)
	go func() {
		regDone <- Register(ctx, c, "", "web", ln.Addr().String(), 5*time.Second, zaptest.NewLogger(t))
	}()
	defer func() {
		cancel()
		if err := <-regDone; err != nil {
			t.Error(err)
		}
	}()
	rec.waitSnap(t, wait, ln.Addr().String())

	b, err := resolver.NewBuilder(c)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("etcd:///services/web", grpc.WithResolvers(b), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer ccancel()
	resp, err := healthpb.NewHealthClient(conn).Check(cctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("a gRPC client resolving etcd:///services/web reached %v, %v; want the instance rota register wrote", resp, err)
	}
	// And etcd's own endpoint listing agrees with rota's.
	eps, err := em.List(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	var addrs []string
	for _, ep := range eps {
		addrs = append(addrs, ep.Addr)
	}
	if !slices.Equal(addrs, []string{ln.Addr().String()}) {
		t.Fatalf("endpoints.Manager lists %v", addrs)
	}
}
