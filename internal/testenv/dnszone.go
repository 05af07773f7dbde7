package testenv

import (
	"fmt"
	"net"
	"sync"
	"testing"

	"github.com/miekg/dns"
)

// Zone is a DNS server on loopback (UDP and TCP, one port) whose records
// and behaviour a test changes as it runs. It answers with glue for SRV
// targets and truncates UDP answers as a real server does.
type Zone struct {
	addr string
	stop func()
	wg   sync.WaitGroup

	mu      sync.Mutex
	records map[string][]dns.RR // FQDN -> records, parsed once by Set
	mode    string              // "", "servfail", "silent"
	queries int
}

// StartZone starts a zone with no records; the test's cleanup stops it.
func StartZone(t testing.TB) *Zone {
	t.Helper()
	z, err := NewZone()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(z.Close)
	return z
}

// NewZone starts a zone with no records, for programs that are not tests
// (the bench); Close stops it.
func NewZone() (*Zone, error) {
	z := &Zone{records: map[string][]dns.RR{}}
	// One port for both: a UDP port's twin may be taken over TCP; take
	// another then.
	var pc net.PacketConn
	var ln net.Listener
	for try := 0; ln == nil; try++ {
		var err error
		if pc, err = net.ListenPacket("udp", "127.0.0.1:0"); err != nil {
			return nil, err
		}
		if ln, err = net.Listen("tcp", pc.LocalAddr().String()); err != nil {
			pc.Close()
			if try == 20 {
				return nil, err
			}
		}
	}
	z.addr = pc.LocalAddr().String()
	h := dns.HandlerFunc(z.serve)
	udp := &dns.Server{PacketConn: pc, Handler: h}
	tcp := &dns.Server{Listener: ln, Handler: h}
	z.wg.Go(func() { udp.ActivateAndServe() })
	z.wg.Go(func() { tcp.ActivateAndServe() })
	z.stop = func() { udp.Shutdown(); tcp.Shutdown() }
	return z, nil
}

// Close stops the zone's servers and waits for them.
func (z *Zone) Close() {
	z.stop()
	z.wg.Wait()
}

func (z *Zone) serve(w dns.ResponseWriter, q *dns.Msg) {
	z.mu.Lock()
	mode := z.mode
	z.queries++
	var rrs []dns.RR
	name, qt := q.Question[0].Name, q.Question[0].Qtype
	_, exists := z.records[name]
	for _, rr := range z.records[name] {
		if rr.Header().Rrtype == qt {
			rrs = append(rrs, rr)
		}
	}
	z.mu.Unlock()
	switch mode {
	case "silent":
		return // a resolver that stopped answering: the client times out
	case "servfail":
		m := new(dns.Msg)
		m.SetRcode(q, dns.RcodeServerFailure)
		w.WriteMsg(m)
		return
	}
	m := new(dns.Msg)
	m.SetReply(q)
	if !exists {
		m.SetRcode(q, dns.RcodeNameError)
	}
	m.Answer = rrs
	// Glue, as real servers send it: the addresses of SRV targets.
	z.mu.Lock()
	for _, rr := range rrs {
		if srv, ok := rr.(*dns.SRV); ok {
			m.Extra = append(m.Extra, z.records[srv.Target]...)
		}
	}
	z.mu.Unlock()
	if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
		size := 512 // as a server does without EDNS0: big answers go over TCP
		if o := q.IsEdns0(); o != nil {
			size = int(o.UDPSize())
		}
		m.Truncate(size)
	} else {
		m.Truncate(dns.MaxMsgSize) // over TCP, what fits in a message (glue first to go)
	}
	w.WriteMsg(m)
}

// Addr is the zone's address (UDP and TCP).
func (z *Zone) Addr() string { return z.addr }

// Set replaces name's records, each in zone-file form
// ("app.test. 5 IN A 10.0.0.1"); one that does not parse panics (a test's
// own mistake).
func (z *Zone) Set(name string, records ...string) {
	rrs := make([]dns.RR, 0, len(records))
	for _, r := range records {
		rr, err := dns.NewRR(r)
		if err != nil || rr == nil {
			panic(fmt.Sprintf("testenv: zone record %q: %v", r, err))
		}
		rrs = append(rrs, rr)
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	z.records[dns.Fqdn(name)] = rrs
}

// Del removes name: it is NXDOMAIN.
func (z *Zone) Del(name string) {
	z.mu.Lock()
	defer z.mu.Unlock()
	delete(z.records, dns.Fqdn(name))
}

// SetMode makes the zone answer normally (""), SERVFAIL ("servfail") or
// not at all ("silent").
func (z *Zone) SetMode(m string) {
	z.mu.Lock()
	defer z.mu.Unlock()
	z.mode = m
}

// Queries is how many queries the zone has been asked (UDP and TCP).
func (z *Zone) Queries() int {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.queries
}
