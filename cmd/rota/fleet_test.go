package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rota-proxy/rota/internal/testenv"
)

// A fleet of two rota processes, one on etcd and Consul alike, with
// balance: hash: 10,000 client keys (PROXY headers naming 10.x.y.z) map
// to the same target through either process and either registry; a target
// registered in both moves about its share of the keys (1/N, asserted
// within 1.2x), all of them to it, and deregistered gives them back
// exactly. Then bounded load on one process: a skewed key set (four
// connections in five from one client) spreads within 1.25x of the mean.
func TestHashFleetOfTwoProcesses(t *testing.T) {
	e := testenv.StartEtcd(t)
	consul := testenv.StartConsul(t)
	etcd := e.Client(t)
	capi := consul.Client(t)
	var bs []string
	for i := range 4 {
		bs = append(bs, holdServer(t, fmt.Sprintf("b%d", i+1)))
	}
	register := func(addr string) {
		t.Helper()
		if _, err := etcd.Put(context.Background(), "services/web/"+addr, `{"Op":0,"Addr":"`+addr+`"}`); err != nil {
			t.Fatal(err)
		}
		host, p, _ := net.SplitHostPort(addr)
		port, _ := strconv.Atoi(p)
		if err := capi.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: addr, Name: "web", Address: host, Port: port}); err != nil {
			t.Fatal(err)
		}
	}
	deregister := func(addr string) {
		t.Helper()
		if _, err := etcd.Delete(context.Background(), "services/web/"+addr); err != nil {
			t.Fatal(err)
		}
		if err := capi.Agent().ServiceDeregister(addr); err != nil {
			t.Fatal(err)
		}
	}
	for _, b := range bs[:3] {
		register(b)
	}
	holders := []string{holdServer(t, "h1"), holdServer(t, "h2"), holdServer(t, "h3")}

	type proc struct {
		admin, etcd, consul, bounded string
		*rotaProc
	}
	addrs := testenv.FreeAddrs(t, 8) // both processes' listeners, all different
	start := func(name string) proc {
		p := proc{admin: addrs[0], etcd: addrs[1], consul: addrs[2], bounded: addrs[3]}
		addrs = addrs[4:]
		listener := func(lname, addr, discovery string) string {
			return fmt.Sprintf(`  - name: %s
    listen: %s
    service: web
    discovery: %s
    balance: hash
    hash_balance_factor: 0     # unbounded: the mapping alone
    accept_proxy_protocol: [127.0.0.1/32]
    health: {interval: 100ms, rise: 1}
`, lname, addr, discovery)
		}
		cfg := fmt.Sprintf(`admin: {listen: %s}
registries:
  etcd: {endpoints: [%s]}
  consul: {address: %s}
listeners:
%s%s  - name: bounded
    listen: %s
    discovery: static
    static: [%s]
    balance: hash
    hash_balance_factor: 1.25
    accept_proxy_protocol: [127.0.0.1/32]
    health: {interval: 100ms, rise: 1}
`, p.admin, e.Endpoints()[0], consul.Addr(), listener("hash-etcd", p.etcd, "etcd"), listener("hash-consul", p.consul, "consul"),
			p.bounded, strings.Join(holders, ", "))
		file := filepath.Join(t.TempDir(), name+".yaml")
		if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		p.rotaProc = startRota(t, "serve", "--config", file, "--log-level", "warn")
		return p
	}
	a, b := start("a"), start("b")
	live := func(n int) {
		t.Helper()
		all := func() bool {
			for _, p := range []proc{a, b} {
				for _, l := range []string{"hash-etcd", "hash-consul"} {
					if upTargets(p.admin, l) != n {
						return false
					}
				}
			}
			return true
		}
		if _, ok := testenv.Poll(20*time.Second, all); !ok {
			var got []string
			for i, p := range []proc{a, b} {
				exited := "running"
				if err, done := p.wait(0); done {
					exited = fmt.Sprintf("exited: %v", err)
				}
				got = append(got, fmt.Sprintf("process %d (%s): hash-etcd %d up, hash-consul %d up; its log:\n%s",
					i, exited, upTargets(p.admin, "hash-etcd"), upTargets(p.admin, "hash-consul"), p.stderr.String()))
			}
			t.Fatalf("timed out after 20s waiting for %d targets up in both registries on both processes:\n%s", n, strings.Join(got, "\n"))
		}
	}
	live(3)

	const keys = 10000
	key := func(i int) string { return fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255) }
	mapping := func(addr string) []string {
		out := make([]string, keys)
		var wg sync.WaitGroup
		for w := range 8 {
			wg.Go(func() {
				for i := w; i < keys; i += 8 {
					name, err := viaProxyHeader(addr, key(i))
					if err != nil {
						t.Errorf("key %s through %s: %v", key(i), addr, err)
						return
					}
					out[i] = name
				}
			})
		}
		wg.Wait()
		if t.Failed() {
			t.FailNow()
		}
		return out
	}
	// all maps the keys through every process and registry and checks
	// they agree.
	all := func(phase string) []string {
		first := mapping(a.etcd)
		for _, addr := range []string{b.etcd, a.consul, b.consul} {
			other := mapping(addr)
			for i := range first {
				if other[i] != first[i] {
					t.Fatalf("%s: key %s: %s through %s, %s through %s", phase, key(i), first[i], a.etcd, other[i], addr)
				}
			}
		}
		return first
	}
	before := all("3 targets")

	register(bs[3])
	live(4)
	after := all("4 targets")
	moved := 0
	for i := range before {
		if after[i] != before[i] {
			moved++
			if after[i] != "b4" {
				t.Fatalf("key %s moved from %s to %s, not to the new target", key(i), before[i], after[i])
			}
		}
	}
	ideal := float64(keys) / 4
	ratio := float64(moved) / ideal
	t.Logf("a 4th target took %d of %d keys: %.2fx the ideal 1/4", moved, keys, ratio)
	if ratio > 1.2 || ratio < 1/1.2 {
		t.Errorf("a 4th target took %d keys, %.2fx the ideal %.0f; want within 1.2x", moved, ratio, ideal)
	}

	deregister(bs[3])
	live(3)
	back := all("the 4th removed")
	for i := range before {
		if back[i] != before[i] {
			t.Fatalf("key %s: %s before the 4th target came, %s after it left", key(i), before[i], back[i])
		}
	}

	// Bounded load, one process (each counts its own connections): 60
	// connections held open, 48 from one client, 12 from others.
	testenv.Eventually(t, "bounded's targets up", 10*time.Second, func() bool { return upTargets(a.admin, "bounded") == 3 })
	per := map[string]int{}
	for i := range 60 {
		src := "10.9.9.9"
		if i%5 == 4 {
			src = key(1000 + i)
		}
		c, name, err := holdViaProxyHeader(a.bounded, src)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		per[name]++
	}
	t.Logf("60 connections, 48 from one client: %v", per)
	if len(per) != 3 {
		t.Errorf("spread over %d targets, want 3: %v", len(per), per)
	}
	for name, n := range per {
		if n > 25 { // ceil(1.25 x 60/3)
			t.Errorf("%s holds %d of 60 connections; the bound is 1.25x the mean of 20", name, n)
		}
	}
}

// upTargets counts listener's targets in state up, from a rota's admin
// API (-1 when it does not answer).
func upTargets(admin, listener string) int {
	resp, err := http.Get("http://" + admin + "/api/v1/targets")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	var doc struct {
		Listeners []struct {
			Name    string
			Targets []struct{ State string }
		}
	}
	if json.NewDecoder(resp.Body).Decode(&doc) != nil {
		return -1
	}
	for _, l := range doc.Listeners {
		if l.Name == listener {
			n := 0
			for _, tg := range l.Targets {
				if tg.State == "up" {
					n++
				}
			}
			return n
		}
	}
	return -1
}

// viaProxyHeader asks addr (a rota accepting PROXY headers) as client src
// and returns the first line of the backend's answer. It closes with a
// reset once it has it, and the backend waits for rota to close first, so
// that no socket of the client's leg, nor a listener's end of rota's, is
// left in TIME_WAIT: 120,000 connections would leave as many, and on a
// machine that had just run a benchmark, dials then timed out.
func viaProxyHeader(addr, src string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.(*net.TCPConn).SetLinger(0)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c, "PROXY TCP4 %s 127.0.0.1 40000 80\r\nhello\n", src); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSuffix(line, "\n"), err
}

// holdViaProxyHeader opens a connection through addr as client src that
// stays open; it returns it and the name its target answered with.
func holdViaProxyHeader(addr, src string) (net.Conn, string, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, "", err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c, "PROXY TCP4 %s 127.0.0.1 40000 80\r\nhello\n", src); err != nil {
		c.Close()
		return nil, "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		c.Close()
		return nil, "", err
	}
	return c, strings.TrimSuffix(line, "\n"), nil
}

// holdServer answers each client that sends something with its name and a
// newline and keeps the connection until the client closes it.
func holdServer(t *testing.T, name string) string {
	return testenv.Serve(t, func(c net.Conn) {
		defer c.Close()
		buf := make([]byte, 64)
		if _, err := c.Read(buf); err != nil {
			return // a health check
		}
		io.WriteString(c, name+"\n")
		io.Copy(io.Discard, c)
	})
}
