package proxy

import (
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"
)

// byteConn is a net.Conn reading from fixed bytes, seen from 127.0.0.1.
type byteConn struct {
	net.Conn
	r *bytes.Reader
}

func (c *byteConn) Read(b []byte) (int, error) { return c.r.Read(b) }
func (c *byteConn) RemoteAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}
}
func (c *byteConn) LocalAddr() net.Addr             { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 8080} }
func (c *byteConn) SetReadDeadline(time.Time) error { return nil }

// FuzzProxyHeader feeds arbitrary connection openings to the PROXY header
// reader: it must not panic or hang, and on success the bytes it hands on
// must be exactly what followed the header.
func FuzzProxyHeader(f *testing.F) {
	f.Add([]byte("PROXY TCP4 192.0.2.1 192.0.2.2 1234 80\r\nGET / HTTP/1.1\r\n"))
	f.Add([]byte("PROXY TCP6 ::1 ::2 1 2\r\n"))
	f.Add([]byte("PROXY UNKNOWN\r\nrest"))
	f.Add([]byte("\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00\x02\x01\xc0\x00\x02\x02\x04\xd2\x00\x50data"))
	f.Add([]byte("\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	trusted := []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	f.Fuzz(func(t *testing.T, data []byte) {
		src, dst, rest, err := readProxyHeader(&byteConn{r: bytes.NewReader(data)}, trusted, time.Second)
		if err != nil {
			return
		}
		if src == nil || dst == nil {
			t.Fatal("success without addresses")
		}
		if !bytes.HasSuffix(data, rest) {
			t.Fatalf("rest %q is not the tail of the input", rest)
		}
	})
}
