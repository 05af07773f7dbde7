package main

import (
	"bytes"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rota-proxy/rota/internal/testenv"
)

func TestDemoBackendFlagErrors(t *testing.T) {
	code, _, errOut := runCLI("demo-backend", "--etcd", "127.0.0.1:2379", "--consul", "127.0.0.1:8500")
	if code != 2 || !strings.Contains(errOut, "exclusive") {
		t.Fatalf("--etcd with --consul: exit %d, stderr %q; want exit 2 saying they are exclusive", code, errOut)
	}
}

// TestDemoBackendConsul runs `rota demo-backend --consul` as the
// backend-consul service of docker-compose.yml does: the backend is a
// passing instance of its service while it runs, and SIGTERM deregisters
// it and exits 0.
func TestDemoBackendConsul(t *testing.T) {
	agent := testenv.StartConsul(t)
	c := agent.Client(t)
	addr := testenv.FreeAddr(t)
	cmd := exec.Command(rotaBin, "demo-backend", "--name", "bc-1", "--listen", addr,
		"--consul", agent.Addr(), "--service", "web-consul", "--log-format", "json")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		exited <- <-exited
	}()

	instances := func() []string {
		entries, _, err := c.Health().Service("web-consul", "", true, nil)
		if err != nil {
			return nil
		}
		var out []string
		for _, e := range entries {
			out = append(out, net.JoinHostPort(e.Service.Address, strconv.Itoa(e.Service.Port)))
		}
		return out
	}
	deadline := time.Now().Add(30 * time.Second)
	for got := instances(); len(got) != 1 || got[0] != addr; got = instances() {
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("demo-backend exited: %v; stderr:\n%s", err, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("passing instances %v, want [%s]; stderr:\n%s", got, addr, stderr.String())
		}
		time.Sleep(20 * time.Millisecond) // polling a condition with a deadline
	}

	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v; stderr:\n%s", err, stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("no exit within 20s of SIGTERM; stderr:\n%s", stderr.String())
	}
	services, err := c.Agent().ServicesWithFilter(`Service == "web-consul"`)
	if err != nil {
		t.Fatal(err)
	}
	if len(services) != 0 {
		t.Errorf("still registered after SIGTERM: %v", services)
	}
	if !strings.Contains(stderr.String(), "deregistered from consul") {
		t.Errorf("no deregistration logged:\n%s", stderr.String())
	}
}
