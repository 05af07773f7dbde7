package proxy_test

import (
	"net"
	"net/netip"
	"runtime"
	"testing"

	"github.com/rota-proxy/rota/proxy"
)

func TestZZMem(t *testing.T) {
	const n = 3000
	target, _ := net.Listen("tcp", "127.0.0.1:0")
	defer target.Close()
	s := startProxy(t, proxy.Settings{}, target.Addr().String())
	pa := netip.MustParseAddrPort(s.addr)
	warm := rawClients(t, pa, 50)
	defer closeAll(warm)
	eventually(t, "warm", func() bool { return s.p.Stats.BytesOut.Load() == 50 })
	runtime.GC()
	var a, b runtime.MemStats
	runtime.ReadMemStats(&a)
	fds := rawClients(t, pa, n)
	defer closeAll(fds)
	eventually(t, "relayed", func() bool { return s.p.Stats.BytesOut.Load() == 50+n })
	runtime.ReadMemStats(&b)
	t.Logf("alloc/conn %d B, mallocs/conn %.2f", (b.TotalAlloc-a.TotalAlloc)/n, float64(b.Mallocs-a.Mallocs)/n)
	runtime.GC()
	runtime.ReadMemStats(&b)
	t.Logf("live/conn %d B", (int64(b.HeapAlloc+b.StackInuse)-int64(a.HeapAlloc+a.StackInuse))/n)
}
