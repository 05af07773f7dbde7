//go:build linux

package testenv

import (
	"crypto/rand"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// NetNS is a network namespace of the test's own behind a veth pair: the
// host's end has 10.<a>.<b>.1/24, the namespace's end n addresses from
// 10.<a>.<b>.2 up. Servers listen inside it (Listen) and the test's
// process reaches them through the pair, from addresses that are not
// loopback: for registries that refuse loopback endpoints (Kubernetes).
// It needs root and iproute2's ip; the test's cleanup deletes it (and the
// pair with it).
type NetNS struct {
	Name string
	// Addrs are the namespace's addresses, 10.<a>.<b>.2 and up.
	Addrs []string
}

// StartNetNS makes a namespace with n addresses.
func StartNetNS(t T, n int) *NetNS {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("testenv: a network namespace needs root")
	}
	id := strings.ToLower(rand.Text()[:6])
	ns := &NetNS{Name: "rota-" + id}
	var b [2]byte
	_, _ = rand.Read(b[:])
	// 10.200.0.0-10.239.255.0: clear of the usual Docker and Kubernetes
	// ranges, and random, so that parallel test processes rarely meet.
	subnet := fmt.Sprintf("10.%d.%d", 200+int(b[0])%40, b[1])
	host, peer := "rh"+id, "rn"+id
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("testenv: ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("netns", "add", ns.Name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns.Name).Run() })
	run("link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns.Name)
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", host).Run() })
	run("addr", "add", subnet+".1/24", "dev", host)
	run("link", "set", host, "up")
	run("-n", ns.Name, "link", "set", "lo", "up")
	for i := range n {
		a := fmt.Sprintf("%s.%d", subnet, i+2)
		run("-n", ns.Name, "addr", "add", a+"/24", "dev", peer)
		ns.Addrs = append(ns.Addrs, a)
	}
	run("-n", ns.Name, "link", "set", peer, "up")
	run("-n", ns.Name, "route", "add", "default", "via", subnet+".1")
	return ns
}

// Listen opens a TCP listener on addr inside the namespace. The socket
// belongs to the namespace for its life, whichever thread later uses it.
func (ns *NetNS) Listen(t T, addr string) net.Listener {
	t.Helper()
	type result struct {
		ln  net.Listener
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// This thread enters the namespace for the listen and goes back
		// (a thread left in it is ended with the goroutine instead).
		runtime.LockOSThread()
		home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			ch <- result{err: err}
			return // locked: the runtime ends the thread
		}
		defer unix.Close(home)
		fd, err := unix.Open("/run/netns/"+ns.Name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			ch <- result{err: err}
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			ch <- result{err: fmt.Errorf("setns: %w", err)}
			return
		}
		ln, err := net.Listen("tcp", addr)
		ch <- result{ln, err}
		if unix.Setns(home, unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatalf("testenv: listen on %s in %s: %v", addr, ns.Name, r.err)
	}
	return r.ln
}
