package proxy

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
)

// errUntrusted closes a connection from a source that may not send PROXY
// headers to this listener.
var errUntrusted = errors.New("PROXY protocol: source is not in accept_proxy_protocol")

// readProxyHeader reads the PROXY protocol header (v1 or v2) that a load
// balancer in front sends first, within timeout. It returns the client and
// destination the header names (a LOCAL header, a balancer's own health
// check, names none: the socket's addresses stand) and any bytes the client
// sent right after the header, which belong to the stream. A source outside
// trusted, a missing, slow or malformed header is an error; the caller
// closes the connection. It runs in the connection's goroutine, so a slow
// sender delays nobody else.
func readProxyHeader(c net.Conn, trusted []netip.Prefix, timeout time.Duration) (src, dst net.Addr, rest []byte, err error) {
	src, dst = c.RemoteAddr(), c.LocalAddr()
	if !isTrusted(src, trusted) {
		return nil, nil, nil, fmt.Errorf("%w: %s", errUntrusted, src)
	}
	if timeout > 0 {
		c.SetReadDeadline(time.Now().Add(timeout))
		defer c.SetReadDeadline(time.Time{})
	}
	// A v1 header is at most 107 bytes; v2 headers are longer only with
	// large TLVs. bufio grows past its size for them as Read needs.
	br := bufio.NewReaderSize(c, 256)
	h, err := proxyproto.Read(br)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("PROXY protocol header from %s: %w", src, err)
	}
	if n := br.Buffered(); n > 0 {
		b, _ := br.Peek(n)
		rest = append([]byte(nil), b...)
	}
	if !h.Command.IsLocal() && h.SourceAddr != nil && h.DestinationAddr != nil {
		src, dst = h.SourceAddr, h.DestinationAddr
	}
	return src, dst, rest, nil
}

func isTrusted(a net.Addr, trusted []netip.Prefix) bool {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return false
	}
	ip, ok := netip.AddrFromSlice(ta.IP)
	if !ok {
		return false
	}
	ip = ip.Unmap()
	for _, p := range trusted {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// proxyHeader formats the PROXY protocol header (version 1 or 2) that tells
// a target who the client is.
func proxyHeader(version byte, src, dst net.Addr) ([]byte, error) {
	h := proxyproto.HeaderProxyFromAddrs(version, src, dst)
	return h.Format()
}
