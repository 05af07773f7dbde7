package config

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestRoutesAndAccessErrors(t *testing.T) {
	const head = "admin: {listen: ''}\nlisteners:\n  - listen: :8443\n"
	for _, tt := range []struct {
		name, src string
		want      []string
	}{
		{"both service and routes", head + "    discovery: static\n    static: [a:1]\n    routes:\n      - {sni: ['*'], discovery: static, static: [b:1]}\n",
			[]string{"rota.yaml:6:5: listeners[0].routes: a listener has either routes or its own service/discovery/static, not both: move them into a route"}},
		{"route without sni", head + "    routes:\n      - {discovery: static, static: [b:1]}\n",
			[]string{`rota.yaml:5:9: listeners[0].routes[0].sni: required: the server names this route serves, like [api.example.com, "*.example.com"], or ["*"] for anything else`}},
		{"route without discovery", head + "    routes:\n      - {sni: [a.example.com]}\n",
			[]string{"rota.yaml:5:9: listeners[0].routes[0].discovery: required: one of consul, etcd, static, dns, docker, kubernetes"}},
		{"duplicate names across routes", head + "    routes:\n      - {sni: [a.example.com, '*.example.com'], discovery: static, static: [b:1]}\n      - {sni: [A.Example.com.], discovery: static, static: [c:1]}\n",
			[]string{`rota.yaml:6:16: listeners[0].routes[1].sni[0]: "A.Example.com." is matched by routes[0].sni[0] already`}},
		{"bad patterns", head + "    routes:\n      - {sni: ['a.*.com', 'bad name', '', '-x.com'], discovery: static, static: [b:1]}\n",
			[]string{
				`rota.yaml:5:16: listeners[0].routes[0].sni[0]: "a.*.com": a wildcard is "*" or a "*." prefix, like "*.example.com"`,
				`rota.yaml:5:27: listeners[0].routes[0].sni[1]: "bad name" is not a host name (' ')`,
				`rota.yaml:5:39: listeners[0].routes[0].sni[2]: "" is not a host name`,
				`rota.yaml:5:43: listeners[0].routes[0].sni[3]: "-x.com" is not a host name`,
			}},
		{"duplicate route names", head + "    routes:\n      - {name: x, sni: [a.b], discovery: static, static: [b:1]}\n      - {name: x, sni: [c.d], discovery: static, static: [c:1]}\n",
			[]string{`rota.yaml:6:16: listeners[0].routes[1].name: duplicate route name "x" (routes[0] has it too)`}},
		{"route pool keys are checked", head + "    routes:\n      - {sni: ['*'], discovery: static, static: [b:1], balance: fastest, health: {rise: 0}}\n",
			[]string{
				"rota.yaml:5:65: listeners[0].routes[0].balance: must be round_robin, least_conn, random_two or hash; got \"fastest\"",
				"rota.yaml:5:89: listeners[0].routes[0].health.rise: must be at least 1",
			}},
		{"unknown route key", head + "    routes:\n      - {sni: ['*'], discovery: static, static: [b:1], dial_timeout: 1s}\n",
			[]string{`rota.yaml:5:56: listeners[0].routes[0].dial_timeout: unknown key; valid keys: name, sni, service, discovery, tags, connect, connect_service, port, docker, static, health, panic, balance, hash_key, hash_balance_factor, slow_start, max_conns_per_target, queue, target_tls, access_log, tls`}},
		{"allow, deny, per client", head + "    discovery: static\n    static: [a:1]\n    allow: [10.0.0.0/33]\n    deny: [nope]\n    max_conns_per_client: -1\n",
			[]string{
				`rota.yaml:6:13: listeners[0].allow[0]: "10.0.0.0/33" is not a CIDR (like 10.0.0.0/8) or an IP address`,
				`rota.yaml:7:12: listeners[0].deny[0]: "nope" is not a CIDR (like 10.0.0.0/8) or an IP address`,
				"rota.yaml:8:27: listeners[0].max_conns_per_client: must not be negative (0 means unlimited)",
			}},
		{"sni_timeout", head + "    sni_timeout: 0s\n    routes:\n      - {sni: ['*'], discovery: static, static: [b:1]}\n",
			[]string{"rota.yaml:4:18: listeners[0].sni_timeout: must be greater than 0"}},
		{"admin without a token off loopback", "admin: {listen: '0.0.0.0:9090'}\nlisteners:\n  - {listen: ':1', discovery: static, static: [a:1]}\n",
			[]string{`rota.yaml:1:8: admin.token_file: required when admin.listen ("0.0.0.0:9090") is not a loopback address: anyone who reaches it could reload the configuration and drain targets`}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := parseErr(t, tt.src)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("errors for\n%s\ngot:\n  %s\nwant:\n  %s", tt.src, strings.Join(got, "\n  "), strings.Join(tt.want, "\n  "))
			}
		})
	}
}

func TestAdminLoopbackNeedsNoToken(t *testing.T) {
	for _, addr := range []string{"127.0.0.1:9090", "127.0.0.2:9090", "[::1]:9090", "localhost:9090"} {
		src := "admin: {listen: '" + addr + "'}\nlisteners:\n  - {listen: ':1', discovery: static, static: [a:1]}\n"
		if _, err := Parse([]byte(src), "rota.yaml"); err != nil {
			t.Errorf("admin %s: %v", addr, err)
		}
	}
	src := "admin: {listen: ':9090', token_file: /run/secrets/rota}\nlisteners:\n  - {listen: ':1', discovery: static, static: [a:1]}\n"
	cfg, err := Parse([]byte(src), "rota.yaml")
	if err != nil || cfg.Admin.TokenFile != "/run/secrets/rota" {
		t.Fatalf("admin with a token: %v, %+v", err, cfg)
	}
}

func TestRoutesInheritAndName(t *testing.T) {
	src := `admin: {listen: ""}
listeners:
  - listen: :8443
    health: {interval: 7s, check: none}
    balance: least_conn
    max_conns_per_target: 10
    queue: {size: 500}
    routes:
      - {sni: [a.example.com], service: api, discovery: static, static: [a:1]}
      - {sni: ["*.example.com"], discovery: static, static: [b:1], health: {interval: 1s}, balance: random_two, max_conns_per_target: 3, queue: {size: 7, timeout: 1s}}
      - {sni: ["*"], discovery: static, static: [c:1], slow_start: 10s}
    allow: [127.0.0.0/8, "::1"]
    deny: [127.0.0.9]
    max_conns_per_client: 4
`
	cfg, err := Parse([]byte(src), "rota.yaml")
	if err != nil {
		t.Fatal(err)
	}
	l := cfg.Listeners[0]
	if l.Name != "listener-0" || l.SNITimeout != DefaultSNITimeout || l.MaxConnsPerClient != 4 {
		t.Fatalf("listener = %+v", l)
	}
	r := l.Routes
	if r[0].Name != "api" || r[1].Name != "route-1" || r[2].Name != "route-2" {
		t.Errorf("route names %q %q %q", r[0].Name, r[1].Name, r[2].Name)
	}
	if r[0].MaxConnsPerTarget != 10 || r[0].Queue != (Queue{Size: 500, Timeout: DefaultQueueTimeout}) {
		t.Errorf("route 0 did not inherit the cap and queue: %+v", r[0].Pool)
	}
	if r[1].MaxConnsPerTarget != 3 || r[1].Queue != (Queue{Size: 7, Timeout: time.Second}) {
		t.Errorf("route 1 should keep its own cap and queue: %+v", r[1].Pool)
	}
	if r[0].Health.Interval != 7*time.Second || r[0].Health.Check != "none" || r[0].Balance != BalanceLeastConn {
		t.Errorf("route 0 did not inherit: %+v", r[0].Pool)
	}
	if r[1].Health.Interval != time.Second || r[1].Health.Check != "tcp" || r[1].Balance != BalanceRandomTwo {
		t.Errorf("route 1 should keep its own health and balance: %+v", r[1].Pool)
	}
	if r[2].SlowStart != 10*time.Second || r[2].Balance != BalanceLeastConn {
		t.Errorf("route 2: %+v", r[2].Pool)
	}
	want := []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}
	if !reflect.DeepEqual(l.Allow, want) || !reflect.DeepEqual(l.Deny, []netip.Prefix{netip.MustParsePrefix("127.0.0.9/32")}) {
		t.Errorf("allow %v, deny %v", l.Allow, l.Deny)
	}
}
