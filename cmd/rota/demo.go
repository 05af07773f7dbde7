package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/demo"
	"github.com/rota-proxy/rota/discovery/etcd"
	"github.com/rota-proxy/rota/server"
	"github.com/rota-proxy/rota/supervisor"
)

func cmdDemo(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("demo", stderr, "rota demo [--listen :8080] [--admin 127.0.0.1:9090] [--backends 3]")
	var (
		listen, adminAt, etcdURL, dataDir string
		n                                 int
		lf                                logFlags
	)
	fs.StringVar(&listen, "listen", ":8080", "proxy address")
	fs.StringVar(&adminAt, "admin", config.DefaultAdminListen, "admin HTTP address")
	fs.StringVar(&etcdURL, "etcd-url", config.DefaultEmbeddedClientURL, "client URL of the embedded etcd server")
	fs.StringVar(&dataDir, "data-dir", "", "embedded etcd data directory (default: a temporary directory, removed on exit)")
	fs.IntVar(&n, "backends", demo.DefaultFleetSize, "number of demo backends")
	lf.register(fs, "console")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if n < 1 {
		return usagef("--backends must be at least 1")
	}
	logger, err := lf.logger(stderr)
	if err != nil {
		return err
	}
	defer logger.Sync()
	if dataDir == "" {
		if dataDir, err = os.MkdirTemp("", "rota-demo-"); err != nil {
			return err
		}
		defer os.RemoveAll(dataDir)
	}

	cfg := config.Default()
	cfg.Admin.Listen = adminAt
	e := config.DefaultEtcd()
	e.Embedded = &config.Embedded{DataDir: dataDir, ClientURL: etcdURL}
	cfg.Registries.Etcd = &e
	l := config.DefaultListener()
	l.Name, l.Listen, l.Service, l.Discovery = "web", listen, "web", "etcd"
	l.Health.Interval = time.Second
	l.DrainTimeout = 5 * time.Second
	cfg.Listeners = []config.Listener{l}

	var (
		fleet  *demo.Fleet
		client io.Closer
	)
	o := supervisor.Options{Config: cfg, Logger: logger,
		Ready: func(srv *server.Server) error {
			endpoints := e.ClientEndpoints()
			c, err := etcd.NewClient(etcd.Config{Endpoints: endpoints, Logger: logger.Named("etcd-client")})
			if err != nil {
				return err
			}
			client = c
			fleet, err = demo.StartFleet(context.Background(), demo.FleetOptions{
				N:        n,
				Register: demo.EtcdRegistrar(c, e.Prefix, "web", etcd.DefaultTTL, logger.Named("register")),
				Logger:   logger,
			})
			if err != nil {
				return fmt.Errorf("demo backends: %w", err)
			}
			printDemoBanner(stdout, srv, n, endpoints[0], adminAt)
			return nil
		},
		Stopping: func() {
			if fleet != nil {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				fleet.Shutdown(ctx) // deregister first, so rota stops routing to them
				cancel()
			}
			if client != nil {
				client.Close()
			}
		},
	}
	if err := serve(o); err != nil {
		if isAddrInUse(err) {
			return fmt.Errorf("%w (is another rota demo, etcd or proxy running? pick other ports with --listen, --admin, --etcd-url)", err)
		}
		return err
	}
	return nil
}

func isAddrInUse(err error) bool {
	return err != nil && strings.Contains(err.Error(), "address already in use")
}

// printDemoBanner waits until the backends are routed, shows round-robin at
// work with a few requests, and says what to try next.
func printDemoBanner(w io.Writer, srv *server.Server, n int, etcdAddr, adminAt string) {
	addr := srv.Addr("web")
	if addr == nil {
		return
	}
	port := addr.(*net.TCPAddr).Port
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		st := srv.Status()
		up := 0
		for _, t := range st[0].Targets {
			if t.Health.State.String() == "up" {
				up++
			}
		}
		if up >= n {
			break
		}
		time.Sleep(50 * time.Millisecond) // polling a condition with a deadline
	}
	fmt.Fprintf(w, "\nrota demo: %d backends registered in the embedded etcd at %s, proxied on :%d\n\n", n, etcdAddr, port)
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for i := range 2 * n {
		answer := "error"
		if resp, err := hc.Get(url); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			answer = strings.TrimSpace(string(b))
		} else {
			answer = err.Error()
		}
		fmt.Fprintf(w, "  curl %s   # %d -> %s\n", url, i+1, answer)
	}
	fmt.Fprintf(w, `
Each new connection goes to the next live backend. Try:

  for i in $(seq 6); do curl -s %[1]s; done
  open http://%[2]s/                      status page (also /api/v1/targets, /metrics)

Add a backend (in another terminal; it registers itself and is routed within a second):

  go run ./cmd/rota demo-backend --name backend-%[3]d --listen 127.0.0.1:9%03[3]d --etcd %[4]s

or register any host:port by hand:  go run ./cmd/rota register --etcd %[4]s --service web --addr 127.0.0.1:9%03[3]d

Stop one with Ctrl-C and watch it leave the rotation. Ctrl-C here stops everything.

`, url, adminAt, n+1, etcdAddr)
}
