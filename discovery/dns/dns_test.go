package dns_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/rota-proxy/rota/discovery"
	"github.com/rota-proxy/rota/discovery/dns"
	"github.com/rota-proxy/rota/internal/testenv"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func quick(z *testenv.Zone) dns.Config {
	return dns.Config{Resolvers: []string{z.Addr()}, Refresh: 5 * time.Second, MinRefresh: 50 * time.Millisecond, Timeout: 200 * time.Millisecond}
}

// A and AAAA records: every address an instance on the port; a change is
// seen once the answer's TTL runs out.
func TestHostRecordsFollowTheirTTL(t *testing.T) {
	z := testenv.StartZone(t)
	z.Set("app.test", "app.test. 1 IN A 10.0.0.1", "app.test. 1 IN A 10.0.0.2", "app.test. 1 IN AAAA fd00::3")
	w, err := dns.NewWatcher("app.test", 8080, quick(z), nil)
	if err != nil {
		t.Fatal(err)
	}
	r := testenv.Watch(t, w)
	r.WaitAddrs(t, "the three addresses", "10.0.0.1:8080", "10.0.0.2:8080", "[fd00::3]:8080")
	changed := time.Now()
	z.Set("app.test", "app.test. 1 IN A 10.0.0.1", "app.test. 1 IN A 10.0.0.9")
	r.WaitAddrs(t, "the change", "10.0.0.1:8080", "10.0.0.9:8080")
	if took := time.Since(changed); took > 2*time.Second {
		t.Fatalf("a change with a 1 s TTL seen after %v", took)
	}
}

// A resolver that fails (SERVFAIL) or stops answering keeps the last set
// and says why; NXDOMAIN right after failures is marked Resync (the pool
// holds it); NXDOMAIN on a healthy watch empties the set at once.
func TestFailuresKeepTheLastSet(t *testing.T) {
	z := testenv.StartZone(t)
	z.Set("app.test", "app.test. 1 IN A 10.0.0.1")
	w, err := dns.NewWatcher("app.test", 80, quick(z), nil)
	if err != nil {
		t.Fatal(err)
	}
	r := testenv.Watch(t, w)
	r.WaitAddrs(t, "the set", "10.0.0.1:80")
	for _, mode := range []string{"servfail", "silent"} {
		_, n0, e0 := r.Last()
		z.SetMode(mode)
		testenv.Eventually(t, mode+" reported", 10*time.Second, func() bool { _, _, e := r.Last(); return e > e0 })
		if s, n, _ := r.Last(); n != n0 || len(s.Instances) != 1 {
			t.Fatalf("%s: %d updates (was %d), set %v: the last set must stay", mode, n, n0, s.Addrs())
		}
		msg := r.LastError().Error()
		want := map[string]string{"servfail": "SERVFAIL", "silent": "timeout"}[mode]
		if !strings.Contains(msg, want) {
			t.Errorf("%s: error %q does not say %s", mode, msg, want)
		}
		z.SetMode("")
		testenv.Eventually(t, "recovered from "+mode, 10*time.Second, func() bool { s, n, _ := r.Last(); return n > n0 && s.Resync })
	}
	// NXDOMAIN after a failure: held, as a registry that lost its data.
	z.SetMode("servfail")
	_, _, e0 := r.Last()
	testenv.Eventually(t, "a failure", 10*time.Second, func() bool { _, _, e := r.Last(); return e > e0 })
	z.Del("app.test")
	z.SetMode("")
	s := r.WaitAddrs(t, "the empty answer")
	if !s.Resync {
		t.Fatal("an empty answer right after failures was not marked Resync")
	}
	// On a healthy watch: believed at once.
	z.Set("app.test", "app.test. 1 IN A 10.0.0.5")
	r.WaitAddrs(t, "the name back", "10.0.0.5:80")
	z.Del("app.test")
	if s := r.WaitAddrs(t, "the name gone"); s.Resync {
		t.Fatal("an NXDOMAIN on a healthy watch was marked Resync")
	}
}

// SRV: each record's target with the record's port and weight; the
// target's addresses from the additional section, else asked for; only
// the lowest priority's records.
func TestSRVRecords(t *testing.T) {
	z := testenv.StartZone(t)
	z.Set("_web._tcp.test",
		"_web._tcp.test. 5 IN SRV 10 3 9001 a.test.",
		"_web._tcp.test. 5 IN SRV 10 1 9002 b.test.",
		"_web._tcp.test. 5 IN SRV 20 1 9003 c.test.") // a backup priority
	z.Set("a.test", "a.test. 5 IN A 10.0.1.1")
	z.Set("b.test", "b.test. 5 IN A 10.0.1.2", "b.test. 5 IN AAAA fd00::12")
	z.Set("c.test", "c.test. 5 IN A 10.0.1.3")
	w, err := dns.NewWatcher("_web._tcp.test", 0, quick(z), nil)
	if err != nil {
		t.Fatal(err)
	}
	r := testenv.Watch(t, w)
	s := r.WaitAddrs(t, "the SRV set", "10.0.1.1:9001", "10.0.1.2:9002", "10.0.1.3:9003", "[fd00::12]:9002")
	weights := map[string]int{}
	var backups []string
	for _, in := range s.Instances {
		weights[in.Addr] = in.Weight
		if in.Backup {
			backups = append(backups, in.Addr)
		}
	}
	if weights["10.0.1.1:9001"] != 3 || weights["10.0.1.2:9002"] != 1 {
		t.Fatalf("weights %v", weights)
	}
	if len(backups) != 1 || backups[0] != "10.0.1.3:9003" {
		t.Fatalf("backups %v, want the priority 20 record's 10.0.1.3:9003", backups)
	}
}

// 1,000 A records (over TCP: the UDP answer is truncated) and 1,000 SRV
// records are all instances.
func TestThousandRecords(t *testing.T) {
	z := testenv.StartZone(t)
	var as, srvs []string
	for i := range 1000 {
		as = append(as, fmt.Sprintf("big.test. 30 IN A 10.2.%d.%d", i/250, i%250+1))
		srvs = append(srvs, fmt.Sprintf("_big._tcp.test. 30 IN SRV 0 1 %d t%d.test.", 10000+i, i))
		z.Set(fmt.Sprintf("t%d.test", i), fmt.Sprintf("t%d.test. 30 IN A 10.3.%d.%d", i, i/250, i%250+1))
	}
	z.Set("big.test", as...)
	z.Set("_big._tcp.test", srvs...)
	for _, name := range []string{"big.test", "_big._tcp.test"} {
		w, err := dns.NewWatcher(name, 80, quick(z), nil)
		if err != nil {
			t.Fatal(err)
		}
		r := testenv.Watch(t, w)
		testenv.Eventually(t, name+" resolved", 30*time.Second, func() bool { s, _, _ := r.Last(); return len(s.Instances) == 1000 })
	}
}

// A name that is not a DNS name, or a host name without a port, is
// refused at once.
func TestBadNames(t *testing.T) {
	for _, tc := range []struct {
		name string
		port int
	}{{"bad name!", 80}, {"", 80}, {"app.test", 0}} {
		if _, err := dns.NewWatcher(tc.name, tc.port, dns.Config{Resolvers: []string{"127.0.0.1:1"}}, nil); err == nil {
			t.Errorf("%q port %d accepted", tc.name, tc.port)
		}
	}
}

// A static list's names go through the system's resolver, which reads the
// hosts file: "localhost" is every loopback address it names, each a
// target with the entry's port and weight; IP literals stay as written.
func TestStaticNames(t *testing.T) {
	w, err := dns.NewStatic([]dns.Target{{Addr: "localhost:7001", Weight: 3}, {Addr: "10.1.2.3:7002"}, {Addr: "[::1]:7003"}},
		dns.Config{Refresh: time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := testenv.Watch(t, w)
	var s discovery.Snapshot
	testenv.Eventually(t, "a snapshot", 5*time.Second, func() bool { s, _, _ = r.Last(); return len(s.Instances) > 0 })
	var loop int
	for _, in := range s.Instances {
		switch {
		case in.Addr == "10.1.2.3:7002", in.Addr == "[::1]:7003":
		case in.Addr == "127.0.0.1:7001" || in.Addr == "[::1]:7001":
			loop++
			if in.Weight != 3 {
				t.Errorf("%s: weight %d, want the entry's 3", in.Addr, in.Weight)
			}
		default:
			t.Errorf("unexpected instance %s", in.Addr)
		}
	}
	if loop == 0 {
		t.Errorf("localhost gave no target: %v", s.Addrs())
	}
	for _, bad := range []string{"no-port", "a b:80", "host:0", "host:99999"} {
		if _, err := dns.NewStatic([]dns.Target{{Addr: bad}}, dns.Config{}, nil); err == nil {
			t.Errorf("NewStatic(%q) took it", bad)
		}
	}
}
