package server_test

import (
	"bufio"
	"io"
	"net"
	"testing"
	"time"

	"github.com/rota-proxy/rota/internal/testenv"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/rota-proxy/rota/config"
)

// TestProxyProtocolFromConfig checks the config keys reach the data path:
// a balancer's header is accepted from a trusted range and the client it
// names is passed on to the target in a v1 header.
func TestProxyProtocolFromConfig(t *testing.T) {
	be, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	seen := make(chan string, 1)
	go func() {
		for {
			c, err := be.Accept()
			if err != nil {
				return
			}
			br := bufio.NewReader(c)
			if h, err := proxyproto.Read(br); err == nil && h.Version == 1 {
				select {
				case seen <- h.SourceAddr.String():
				default:
				}
			}
			c.Close()
		}
	}()
	l := fastListener("web", be.Addr().String())
	l.ProxyProtocol = 1
	l.AcceptProxyProtocol = prefixes(t, "127.0.0.0/8")
	l.ProxyHeaderTimeout = time.Second
	cfg := config.Default()
	cfg.Listeners = []config.Listener{l}
	srv := startServer(t, cfg)
	testenv.Eventually(t, "target up", 5*time.Second, func() bool { return liveCount(srv, "web") == 1 })

	c, err := net.Dial("tcp", proxyAddr(t, srv, "web"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	client := &net.TCPAddr{IP: net.ParseIP("198.51.100.9"), Port: 4242}
	hdr, _ := proxyproto.HeaderProxyFromAddrs(2, client, c.RemoteAddr()).Format()
	c.Write(append(hdr, "x"...))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.ReadAll(c)
	select {
	case got := <-seen:
		if got != "198.51.100.9:4242" {
			t.Fatalf("target saw client %s, want the balancer's client", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("target never got a v1 header")
	}

	// A header-less client is closed and counted.
	c2, err := net.Dial("tcp", proxyAddr(t, srv, "web"))
	if err != nil {
		t.Fatal(err)
	}
	c2.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.ReadAll(c2)
	c2.Close()
	testenv.Eventually(t, "header error counted", 5*time.Second, func() bool { return srv.Status()[0].Count("rota_proxy_protocol_errors_total", "") == 1 })
}
