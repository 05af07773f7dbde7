package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/server"
)

// rota drain and undrain write the fleet-wide mark a running rota with
// registries.state: etcd applies.
func TestDrainCommand(t *testing.T) {
	e := testenv.StartEtcd(t)
	b1, b2 := testenv.StartBackend(t, "b1"), testenv.StartBackend(t, "b2")
	cfg := config.Default()
	cfg.Admin.Listen = ""
	ec := config.DefaultEtcd()
	ec.Endpoints = e.Endpoints()
	cfg.Registries.Etcd, cfg.Registries.State = &ec, config.StateEtcd
	l := config.DefaultListener()
	l.Name, l.Listen, l.Discovery, l.Static = "web", "127.0.0.1:0", "static", config.Statics(b1.Addr, b2.Addr)
	cfg.Listeners = []config.Listener{l}
	srv, err := server.Start(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Shutdown(context.Background()) })
	draining := func() bool {
		for _, ls := range srv.Status() {
			for _, tg := range ls.Targets {
				if tg.Addr == b1.Addr {
					return tg.Draining && tg.DrainSource == "etcd"
				}
			}
		}
		return false
	}
	ep := strings.TrimPrefix(e.Endpoints()[0], "http://")
	for _, on := range []bool{true, false} {
		cmd := map[bool]string{true: "drain", false: "undrain"}[on]
		code, out, errOut := runCLI(cmd, "--etcd", ep, "web", b1.Addr)
		if code != 0 {
			t.Fatalf("rota %s: exit %d: %s", cmd, code, errOut)
		}
		if !strings.Contains(out, "rota/state/web/"+b1.Addr) {
			t.Errorf("rota %s printed %q, want the key it wrote", cmd, out)
		}
		testenv.Eventually(t, "the running rota applies rota "+cmd, 5*time.Second, func() bool { return draining() == on })
	}
	if code, _, errOut := runCLI("drain", "--etcd", ep, "web"); code != 2 || !strings.Contains(errOut, "LISTENER TARGET") {
		t.Errorf("one argument: exit %d, %q", code, errOut)
	}
}
