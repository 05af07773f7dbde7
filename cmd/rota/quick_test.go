package main

import (
	"context"
	"io"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rota-proxy/rota/discovery/etcd"
	"github.com/rota-proxy/rota/internal/testenv"
)

// nameServer answers every connection with name.
func nameServer(t *testing.T, name string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, name)
			c.Close()
		}
	}()
	return ln.Addr().String()
}

// runServe starts `rota serve` with args and waits until a connection
// through the proxy is answered by want.
func runServe(t *testing.T, want string, args ...string) {
	t.Helper()
	listen := testenv.FreeAddr(t)
	cmd := exec.Command(rotaBin, append([]string{"serve", "--listen", listen, "--admin", "", "--health-interval", "100ms"}, args...)...)
	var stderr syncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("tcp", listen); err == nil {
			c.SetDeadline(time.Now().Add(2 * time.Second))
			b, _ := io.ReadAll(c)
			c.Close()
			if string(b) == want {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("rota serve %s never routed to %s; stderr:\n%s", strings.Join(args, " "), want, stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestQuickFormStatic(t *testing.T) {
	runServe(t, "s1", "--backend", nameServer(t, "s1"))
}

func TestQuickFormEtcd(t *testing.T) {
	e := testenv.StartEtcd(t)
	c := e.Client(t)
	addr := nameServer(t, "e1")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- etcd.Register(ctx, c, "", "web", addr, 5*time.Second, nil) }()
	defer func() { cancel(); <-done }()
	runServe(t, "e1", "--service", "web", "--etcd", strings.TrimPrefix(e.Endpoints()[0], "http://"))
}

func TestQuickFormConsul(t *testing.T) {
	agent := testenv.StartConsul(t)
	addr := nameServer(t, "c1")
	host, port, _ := net.SplitHostPort(addr)
	p, _ := strconv.Atoi(port)
	err := agent.Client(t).Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "c1", Name: "web", Address: host, Port: p})
	if err != nil {
		t.Fatal(err)
	}
	runServe(t, "c1", "--service", "web", "--consul", agent.Addr())
}
