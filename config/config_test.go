package config

import (
	"encoding"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/rota-proxy/rota/discovery/dns"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/proxy"
)

// parseErr parses src as "rota.yaml" and returns the error lines.
func parseErr(t *testing.T, src string) []string {
	t.Helper()
	cfg, err := Parse([]byte(src), "rota.yaml")
	if err == nil {
		t.Fatalf("Parse succeeded, want an error; config: %+v", cfg)
	}
	if cfg != nil {
		t.Errorf("Parse returned a config with its error")
	}
	return strings.Split(err.Error(), "\n")
}

// static is a valid listener body to append fields to; it sits on lines 2-5.
const static = `listeners:
  - name: web
    listen: ":8080"
    discovery: static
    static: [127.0.0.1:9001]
`

// TestParseErrors covers each kind of mistake with the exact message, so
// that file:line:column and the field path are pinned down.
func TestParseErrors(t *testing.T) {
	tests := []struct {
		name string
		src  string
		want []string
	}{
		{"empty file", "", []string{"rota.yaml: listeners: no listeners defined"}},
		{"only null", "~\n", []string{"rota.yaml: listeners: no listeners defined"}},
		{"empty listeners", "admin: {listen: ''}\nlisteners: []\n",
			[]string{"rota.yaml:2:12: listeners: no listeners defined"}},
		{"root is a list", "- a\n",
			[]string{"rota.yaml:1:1: expected a mapping (key: value lines), got a list"}},
		{"listeners is a map", "listeners:\n  web: {}\n",
			[]string{"rota.yaml:1:1: listeners: expected a list, got a mapping"}},
		{"listener is a string", "listeners:\n  - web\n",
			[]string{`rota.yaml:2:5: listeners[0]: expected a mapping (key: value lines), got the string "web"`}},
		{"unknown top-level key", "lsteners: []\n" + static,
			[]string{`rota.yaml:1:1: lsteners: unknown key (did you mean "listeners"?)`}},
		{"unknown key without suggestion", static + "    weight: 3\n",
			[]string{"rota.yaml:6:5: listeners[0].weight: unknown key; valid keys: name, listen, service, discovery, tags, connect, connect_service, port, docker, static, health, panic, balance, hash_key, hash_balance_factor, slow_start, max_conns_per_target, queue, target_tls, routes, tls, drain_timeout, dial_timeout, retries, max_conns, idle_timeout, replay_on_reset, proxy_protocol, accept_proxy_protocol, proxy_header_timeout, removed_conn_grace, max_conn_age, allow, deny, max_conns_per_client, max_conn_rate, max_conn_rate_per_client, sni_timeout, access_log"}},
		{"dashes for underscores", static + "    max-conns: 3\n",
			[]string{`rota.yaml:6:5: listeners[0].max-conns: unknown key (did you mean "max_conns"?)`}},
		{"unknown nested key", static + "    health:\n      intervl: 1s\n",
			[]string{`rota.yaml:7:7: listeners[0].health.intervl: unknown key (did you mean "interval"?)`}},
		{"duplicate key", static + "    listen: :9000\n",
			[]string{"rota.yaml:6:5: listeners[0].listen: duplicate key (first set at line 3)"}},
		{"string for int", static + "    retries: two\n",
			[]string{`rota.yaml:6:14: listeners[0].retries: expected an integer, got the string "two"`}},
		{"float for int", static + "    max_conns: 1.5\n",
			[]string{`rota.yaml:6:16: listeners[0].max_conns: expected an integer, got "1.5"`}},
		{"int overflow", static + "    retries: 99999999999999999999\n",
			[]string{"rota.yaml:6:14: listeners[0].retries: integer 99999999999999999999 is out of range"}},
		{"duration without unit", static + "    dial_timeout: 2\n",
			[]string{`rota.yaml:6:19: listeners[0].dial_timeout: expected a duration like 2s or 500ms, got "2"`}},
		{"duration in words", static + "    idle_timeout: 1 hour\n",
			[]string{`rota.yaml:6:19: listeners[0].idle_timeout: expected a duration like 2s or 500ms, got the string "1 hour"`}},
		{"negative duration", static + "    idle_timeout: -1s\n",
			[]string{"rota.yaml:6:19: listeners[0].idle_timeout: must not be negative (0 disables it)"}},
		{"list for map", static + "    health: [tcp]\n",
			[]string{"rota.yaml:6:13: listeners[0].health: expected a mapping (key: value lines), got a list"}},
		{"map for string", static + "    service: {name: web}\n",
			[]string{"rota.yaml:6:14: listeners[0].service: expected a string, got a mapping"}},
		{"string for list", static + "    tags: prod\n",
			[]string{`rota.yaml:6:11: listeners[0].tags: expected a list of strings, like [a, b], got the string "prod"`}},
		{"bool", static + "    panic: on\n",
			[]string{`rota.yaml:6:12: listeners[0].panic: expected true or false, got the string "on"`}},
		{"rise zero", static + "    health:\n      rise: 0\n",
			[]string{"rota.yaml:7:13: listeners[0].health.rise: must be at least 1"}},
		{"fall zero", static + "    health: {fall: 0}\n",
			[]string{"rota.yaml:6:20: listeners[0].health.fall: must be at least 1"}},
		{"interval zero", static + "    health: {interval: 0s}\n",
			[]string{"rota.yaml:6:24: listeners[0].health.interval: must be greater than 0"}},
		{"timeout zero", static + "    health: {timeout: 0s}\n",
			[]string{"rota.yaml:6:23: listeners[0].health.timeout: must be greater than 0"}},
		{"timeout above interval is fine", static + "    health: {timeout: 5s, interval: 1s, rise: 1}\n" + "    retries: -1\n",
			[]string{"rota.yaml:7:14: listeners[0].retries: must be 0 to 100; got -1"}},
		{"backoff_max below interval", static + "    health: {interval: 10s, backoff_max: 5s}\n",
			[]string{"rota.yaml:6:42: listeners[0].health.backoff_max: must be at least interval (10s)"}},
		{"bad check", static + "    health: {check: udp}\n",
			[]string{`rota.yaml:6:21: listeners[0].health.check: must be one of tcp, http, https, send_expect, tls, grpc, none; got "udp"`}},
		{"http path without slash", static + "    health: {check: http, path: healthz}\n",
			[]string{`rota.yaml:6:33: listeners[0].health.path: must start with "/", like "/healthz"; got "healthz"`}},
		{"http path with space", static + "    health: {check: http, path: '/a b'}\n",
			[]string{`rota.yaml:6:33: listeners[0].health.path: must not contain spaces or control characters; got "/a b"`}},
		{"dial_timeout zero", static + "    dial_timeout: 0s\n",
			[]string{"rota.yaml:6:19: listeners[0].dial_timeout: must be greater than 0"}},
		{"max_conns negative", static + "    max_conns: -1\n",
			[]string{"rota.yaml:6:16: listeners[0].max_conns: must not be negative (0 means unlimited)"}},
		{"proxy_protocol", static + "    proxy_protocol: v3\n",
			[]string{`rota.yaml:6:21: listeners[0].proxy_protocol: expected v1, v2 or empty, got the string "v3"`}},
		{"accept_proxy_protocol", static + "    accept_proxy_protocol: [10.0.0.0/8, 10.0.0.0/40, lb.local]\n",
			[]string{
				`rota.yaml:6:41: listeners[0].accept_proxy_protocol[1]: "10.0.0.0/40" is not a CIDR (like 10.0.0.0/8) or an IP address`,
				`rota.yaml:6:54: listeners[0].accept_proxy_protocol[2]: "lb.local" is not a CIDR (like 10.0.0.0/8) or an IP address`,
			}},
		{"proxy_header_timeout", static + "    proxy_header_timeout: 0s\n",
			[]string{"rota.yaml:6:27: listeners[0].proxy_header_timeout: must be greater than 0"}},
		{"listen missing", "listeners:\n  - name: web\n    discovery: static\n    static: [a:1]\n",
			[]string{`rota.yaml:2:5: listeners[0].listen: required: the address to listen on, like ":8080"`}},
		{"listen port only", "listeners:\n  - listen: 8080\n    discovery: static\n    static: [a:1]\n",
			[]string{`rota.yaml:2:13: listeners[0].listen: must be host:port; got "8080" (did you mean ":8080"?)`}},
		{"listen port too big", "listeners:\n  - listen: :65536\n    discovery: static\n    static: [a:1]\n",
			[]string{`rota.yaml:2:13: listeners[0].listen: ":65536": port "65536" must be a number from 0 to 65535`}},
		{"listen bad host", "listeners:\n  - listen: 'my host:80'\n    discovery: static\n    static: [a:1]\n",
			[]string{`rota.yaml:2:13: listeners[0].listen: "my host:80": host "my host" is not a valid IP address or host name`}},
		{"listen conflict", static + "  - listen: 0.0.0.0:8080\n    discovery: static\n    static: [a:1]\n",
			[]string{`rota.yaml:6:13: listeners[1].listen: "0.0.0.0:8080" conflicts with listeners[0].listen ":8080"`}},
		{"listen conflicts with admin", "admin: {listen: ':9090', token_file: /etc/rota/token}\n" +
			"listeners:\n  - {listen: '127.0.0.1:9090', discovery: static, static: [a:1]}\n",
			[]string{`rota.yaml:3:14: listeners[0].listen: "127.0.0.1:9090" conflicts with admin.listen ":9090"`}},
		{"duplicate name", static + "  - name: web\n    listen: :8081\n    discovery: static\n    static: [a:1]\n",
			[]string{`rota.yaml:6:11: listeners[1].name: duplicate name "web" (listeners[0] has it too)`}},
		{"discovery missing", "listeners:\n  - listen: :1\n    static: [a:1]\n",
			[]string{"rota.yaml:2:5: listeners[0].discovery: required: one of consul, etcd, static, dns, docker, kubernetes"}},
		{"discovery unknown", "listeners:\n  - listen: :1\n    discovery: mdns\n",
			[]string{`rota.yaml:3:16: listeners[0].discovery: must be one of consul, etcd, static, dns, docker, kubernetes; got "mdns"`}},
		{"dns without port", "listeners:\n  - listen: :1\n    discovery: dns\n    service: app\n",
			[]string{"rota.yaml:2:5: listeners[0].port: required with discovery: dns and a host name: the port of its addresses"}},
		{"dns srv with port", "listeners:\n  - listen: :1\n    discovery: dns\n    service: _app._tcp.example\n    port: 80\n",
			[]string{"rota.yaml:5:11: listeners[0].port: not used with an SRV name (_app._tcp.example): its records carry the ports"}},
		{"dns bad name", "listeners:\n  - listen: :1\n    discovery: dns\n    service: 'a b'\n    port: 80\n",
			[]string{`rota.yaml:4:14: listeners[0].service: must be a DNS name (dot-separated labels of letters, digits, - and _); got "a b"`}},
		{"port elsewhere", "listeners:\n  - listen: :1\n    discovery: static\n    static: [a:1]\n    port: 70000\n",
			[]string{"rota.yaml:5:11: listeners[0].port: must be 1-65535; got 70000"}},
		{"port on static", "listeners:\n  - listen: :1\n    discovery: static\n    static: [a:1]\n    port: 7\n",
			[]string{"rota.yaml:5:11: listeners[0].port: only valid with discovery: dns, docker or kubernetes"}},
		{"kubernetes without service", "listeners:\n  - listen: :1\n    discovery: kubernetes\n",
			[]string{"rota.yaml:2:5: listeners[0].service: required with discovery: kubernetes: a Service's name, or namespace/name"}},
		{"kubernetes bad service", "listeners:\n  - listen: :1\n    discovery: kubernetes\n    service: Shop/web\n",
			[]string{`rota.yaml:4:14: listeners[0].service: must be name or namespace/name of a Kubernetes Service: namespace "Shop": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')`}},
		{"kubernetes bad port name", "listeners:\n  - listen: :1\n    discovery: kubernetes\n    service: web\n    port: Web_1\n",
			[]string{`rota.yaml:5:11: listeners[0].port: expected a port number or a Service port's name (discovery: kubernetes), which must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-), got the string "Web_1"`}},
		{"tls on a routed listener", "listeners:\n  - listen: :1\n    tls: {certs: [{cert_file: a.pem, key_file: a-key.pem}]}\n    routes:\n      - {sni: [\"*\"], discovery: static, static: [a:1]}\n",
			[]string{"rota.yaml:3:10: listeners[0].tls: on a routed listener, set tls on the routes that terminate (the others pass TLS through)"}},
		{"route tls without certs", "listeners:\n  - listen: :1\n    routes:\n      - {sni: [\"*\"], discovery: static, static: [a:1], tls: {client_auth: maybe}}\n",
			[]string{"rota.yaml:4:61: listeners[0].routes[0].tls.certs: required: at least one {cert_file, key_file}", `rota.yaml:4:75: listeners[0].routes[0].tls.client_auth: must be none, request or require; got "maybe"`}},
		{"port name with dns", "listeners:\n  - listen: :1\n    discovery: dns\n    service: app\n    port: http\n",
			[]string{`rota.yaml:5:11: listeners[0].port: a port name ("http") is only valid with discovery: kubernetes; dns and docker take a number`}},
		{"docker match", "listeners:\n  - listen: :1\n    discovery: docker\n    service: app\n    docker: {match: swarm}\n",
			[]string{`rota.yaml:5:21: listeners[0].docker.match: must be label or compose; got "swarm"`}},
		{"docker keys elsewhere", "listeners:\n  - listen: :1\n    discovery: dns\n    service: app\n    port: 80\n    docker: {network: x}\n",
			[]string{"rota.yaml:6:13: listeners[0].docker: only valid with discovery: docker"}},
		{"docker without service", "listeners:\n  - listen: :1\n    discovery: docker\n",
			[]string{"rota.yaml:2:5: listeners[0].service: required with discovery: docker: the rota.service label's value (or, with docker.match: compose, the compose service)"}},
		{"dns registry", "registries:\n  dns: {resolvers: [127.0.0.1, '[::1]:53'], refresh: 1s, min_refresh: 2s}\nlisteners:\n  - {listen: ':1', discovery: static, static: [a:1]}\n",
			[]string{"rota.yaml:2:21: registries.dns.resolvers[0]: must be an IP address and port, like 127.0.0.53:53 or [::1]:53; got \"127.0.0.1\"",
				"rota.yaml:2:71: registries.dns.min_refresh: must not be above refresh (1s); got 2s"}},
		{"docker registry", "registries:\n  docker: {host: 'ssh://x', tls: {cert_file: c}}\nlisteners:\n  - {listen: ':1', discovery: static, static: [a:1]}\n",
			[]string{`rota.yaml:2:18: registries.docker.host: must be unix:///path/to/docker.sock, tcp://host:port or http(s)://host:port; got "ssh://x"`,
				"rota.yaml:2:34: registries.docker.tls.key_file: required when cert_file is set"}},
		{"etcd not configured", "listeners:\n  - listen: :1\n    discovery: etcd\n    service: web\n",
			[]string{"rota.yaml:3:16: listeners[0].discovery: etcd needs registries.etcd, which is not configured"}},
		{"consul not configured", "listeners:\n  - {listen: ':1', discovery: consul, service: web}\n",
			[]string{"rota.yaml:2:31: listeners[0].discovery: consul needs registries.consul (or CONSUL_HTTP_ADDR in the environment), which is not configured"}},
		{"service missing", "registries: {etcd: {endpoints: [e:2379]}}\nlisteners:\n  - listen: :1\n    discovery: etcd\n",
			[]string{"rota.yaml:3:5: listeners[0].service: required with discovery: etcd"}},
		{"etcd service with slash", "registries: {etcd: {endpoints: [e:2379]}}\nlisteners:\n  - {listen: ':1', discovery: etcd, service: a/b}\n",
			[]string{`rota.yaml:3:46: listeners[0].service: must not contain "/" with discovery: etcd; got "a/b"`}},
		{"static empty", "listeners:\n  - listen: :1\n    discovery: static\n    static: []\n",
			[]string{"rota.yaml:4:13: listeners[0].static: at least one host:port is required with discovery: static"}},
		{"static target without host", static + "  - {listen: ':1', discovery: static, static: [':80']}\n",
			[]string{`rota.yaml:6:48: listeners[1].static[0]: must name a host, like "10.0.0.5:9000" or "web-1:9000"; got ":80"`}},
		{"static target port zero", static + "  - {listen: ':1', discovery: static, static: [a:1, 'b:0']}\n",
			[]string{`rota.yaml:6:53: listeners[1].static[1]: "b:0": port must be from 1 to 65535`}},
		{"static duplicate target", static + "  - {listen: ':1', discovery: static, static: [a:1, a:1]}\n",
			[]string{`rota.yaml:6:53: listeners[1].static[1]: duplicate target "a:1" (static[0] has it too)`}},
		{"static with tags", static + "    tags: [prod]\n",
			[]string{"rota.yaml:6:11: listeners[0].tags: only valid with discovery: consul"}},
		{"static list with consul", "registries: {consul: {}}\nlisteners:\n  - {listen: ':1', discovery: consul, service: a, static: [b:1]}\n",
			[]string{"rota.yaml:3:59: listeners[0].static: only valid with discovery: static"}},
		{"empty tag", "registries: {consul: {}}\nlisteners:\n  - {listen: ':1', discovery: consul, service: a, tags: [x, '']}\n",
			[]string{"rota.yaml:3:61: listeners[0].tags[1]: must not be empty"}},
		{"admin listen", "admin: {listen: localhost}\n" + static,
			[]string{`rota.yaml:1:17: admin.listen: must be host:port, like ":8080" or "127.0.0.1:8080"; got "localhost" (missing port in address)`}},
		{"consul address", "registries:\n  consul: {address: 'ftp://c:1'}\n" + static,
			[]string{`rota.yaml:2:21: registries.consul.address: must be a URL like "http://127.0.0.1:2379"; got "ftp://c:1" (scheme must be http or https)`}},
		{"etcd without endpoints", "registries:\n  etcd: {prefix: /s/}\n" + static,
			[]string{"rota.yaml:2:9: registries.etcd.endpoints: at least one endpoint is required (or configure embedded)"}},
		{"etcd prefix", "registries:\n  etcd: {endpoints: [e:1], prefix: services}\n" + static,
			[]string{`rota.yaml:2:36: registries.etcd.prefix: must end with "/" and name something, like "services/" or "/services/"; got "services"`}},
		{"etcd prefix only slashes", "registries:\n  etcd: {endpoints: [e:1], prefix: /}\n" + static,
			[]string{`rota.yaml:2:36: registries.etcd.prefix: must end with "/" and name something, like "services/" or "/services/"; got "/"`}},
		{"negative empty hold", "registries:\n  empty_hold: -1s\n" + static,
			[]string{"rota.yaml:2:15: registries.empty_hold: must not be negative (0 disables it)"}},
		{"etcd tls half", "registries:\n  etcd:\n    endpoints: [e:1]\n    tls: {key_file: k.pem}\n" + static,
			[]string{"rota.yaml:4:10: registries.etcd.tls.cert_file: required when key_file is set"}},
		{"etcd password without user", "registries:\n  etcd:\n    endpoints: [e:1]\n    password_file: /p\n" + static,
			[]string{"rota.yaml:2:3: registries.etcd.username: required when password_file is set"}},
		{"embedded client_url", "registries:\n  etcd:\n    embedded: {client_url: '127.0.0.1:2379'}\n" + static,
			[]string{`rota.yaml:3:28: registries.etcd.embedded.client_url: must be a URL like "http://127.0.0.1:2379"; got "127.0.0.1:2379" (not a URL)`}},
		{"retries near the int's limit", static + "    retries: 9223372036854775807\n",
			[]string{"rota.yaml:6:14: listeners[0].retries: must be 0 to 100; got 9223372036854775807"}},
		{"durations near the type's limit", static + "    idle_timeout: 2540400h\n    health: {backoff_max: 2562047h}\n    removed_conn_grace: 100000h\n" +
			"registries: {empty_hold: 87601h}\n",
			[]string{
				"rota.yaml:6:19: listeners[0].idle_timeout: must be at most 87600h0m0s (ten years); got 2540400h0m0s",
				"rota.yaml:7:27: listeners[0].health.backoff_max: must be at most 87600h0m0s (ten years); got 2562047h0m0s",
				"rota.yaml:8:25: listeners[0].removed_conn_grace: must be at most 87600h0m0s (ten years); got 100000h0m0s",
				"rota.yaml:9:26: registries.empty_hold: must be at most 87600h0m0s (ten years); got 87601h0m0s",
			}},
		{"embedded data_dir", "registries:\n  etcd:\n    embedded: {data_dir: ''}\n" + static,
			[]string{"rota.yaml:3:26: registries.etcd.embedded.data_dir: must not be empty"}},
		{"registries is a list", "registries: [etcd]\n" + static,
			[]string{"rota.yaml:1:13: registries: expected a mapping (key: value lines), got a list"}},
		{"etcd is a string (no follow-up errors)", "registries:\n  etcd: yes\nlisteners:\n  - {listen: ':1', discovery: etcd, service: a}\n",
			[]string{`rota.yaml:2:9: registries.etcd: expected a mapping (key: value lines), got the string "yes"`}},
		{"complex key", static + "    ? [a]\n    : b\n",
			[]string{"rota.yaml:6:7: listeners[0]: keys must be plain names, got a list"}},
		{"merge of a scalar", static + "    <<: 5\n",
			[]string{`rota.yaml:6:9: listeners[0]: merge key (<<) needs a mapping or a list of mappings, got "5"`}},
		{"merge cycle", "x-a: &a {<<: *a}\nlisteners:\n  - <<: *a\n    listen: \":1\"\n    discovery: static\n    static: [a:1]\n",
			[]string{"rota.yaml:1:6: listeners[0]: merge key (<<) includes the mapping that contains it"}},
		{"unknown anchor", "x-a: *nope\n" + static,
			[]string{"rota.yaml: invalid YAML: unknown anchor 'nope' referenced"}},
		{"syntax", "listeners:\n  - listen: :1\n  discovery\n",
			[]string{"rota.yaml:3: invalid YAML: could not find expected ':'"}},
		{"tab indentation", "listeners:\n\t- listen: :1\n",
			[]string{"rota.yaml:2: invalid YAML: found character that cannot start any token"}},
		{"second document", static + "---\nadmin: {}\n",
			[]string{"rota.yaml:7:1: only one YAML document is allowed (found another after ---)"}},
		{"several problems, sorted by line", "listeners:\n  - listen: :1\n    discovery: static\n    static: [a:1]\n    retries: -1\n    health: {rise: 0}\n  - listen: :1\n",
			[]string{
				"rota.yaml:5:14: listeners[0].retries: must be 0 to 100; got -1",
				"rota.yaml:6:20: listeners[0].health.rise: must be at least 1",
				"rota.yaml:7:5: listeners[1].discovery: required: one of consul, etcd, static, dns, docker, kubernetes",
				`rota.yaml:7:13: listeners[1].listen: ":1" conflicts with listeners[0].listen ":1"`,
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := parseErr(t, tt.src)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("errors for\n%s\ngot:\n  %s\nwant:\n  %s", tt.src,
					strings.Join(got, "\n  "), strings.Join(tt.want, "\n  "))
			}
		})
	}
}

// TestInvalidFiles parses each file of testdata/invalid and compares the
// error with its "# want:" comment lines (positions without the file name).
func TestInvalidFiles(t *testing.T) {
	files, err := filepath.Glob("testdata/invalid/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no testdata: %v", err)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			var want []string
			for _, line := range strings.Split(string(data), "\n") {
				if w, ok := strings.CutPrefix(line, "# want: "); ok {
					if w[0] >= '0' && w[0] <= '9' {
						want = append(want, file+":"+w)
					} else {
						want = append(want, file+": "+w)
					}
				}
			}
			cfg, err := Load(file)
			if err == nil {
				t.Fatalf("Load succeeded: %+v", cfg)
			}
			got := strings.Split(err.Error(), "\n")
			if !reflect.DeepEqual(got, want) {
				t.Errorf("got:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
			}
		})
	}
}

// TestValidFiles loads each example of testdata/valid; what Parse returns
// must pass Validate unchanged.
func TestValidFiles(t *testing.T) {
	files, err := filepath.Glob("testdata/valid/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no testdata: %v", err)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			cfg, err := Load(file)
			if err != nil {
				t.Fatal(err)
			}
			if cfg.File != file {
				t.Errorf("File = %q, want %q", cfg.File, file)
			}
			if err := cfg.Validate(); err != nil {
				t.Errorf("Validate after Load: %v", err)
			}
		})
	}
}

// designConfig is what the DESIGN.md example means, written out in Go.
func designConfig(file string) *Config {
	web := DefaultListener()
	web.Name, web.Listen, web.Service, web.Discovery = "web", ":8080", "web", "etcd"
	return &Config{
		Admin: Admin{Listen: "127.0.0.1:9090"},
		Registries: Registries{
			EmptyHold: DefaultEmptyHold,
			DNS:       dns.DefaultConfig(),
			Consul:    &Consul{Address: "127.0.0.1:8500"},
			Etcd: &Etcd{
				Endpoints: []string{"127.0.0.1:2379"},
				Prefix:    "/services/",
				Embedded:  &Embedded{DataDir: "./rota-data", ClientURL: "http://127.0.0.1:2379"},
			},
		},
		Listeners: []Listener{web},
		File:      file,
	}
}

// TestDesignExample checks that the example of DESIGN.md decodes to exactly
// what it says, and that it survives a round trip: encoding the decoded
// config back to YAML and parsing that gives the same config.
func TestDesignExample(t *testing.T) {
	const file = "testdata/valid/design.yaml"
	cfg, err := Load(file)
	if err != nil {
		t.Fatal(err)
	}
	if want := designConfig(file); !reflect.DeepEqual(cfg, want) {
		t.Fatalf("design example:\ngot  %s\nwant %s", dump(cfg), dump(want))
	}

	out, err := yaml.Marshal(encode(reflect.ValueOf(cfg).Elem()))
	if err != nil {
		t.Fatal(err)
	}
	again, err := Parse(out, "roundtrip.yaml")
	if err != nil {
		t.Fatalf("re-parse of\n%s: %v", out, err)
	}
	again.File = cfg.File
	if !reflect.DeepEqual(again, cfg) {
		t.Errorf("round trip through\n%s\ngot  %s\nwant %s", out, dump(again), dump(cfg))
	}
}

// encode turns a config value into plain maps, lists and strings keyed by
// the yaml tags, durations as Go duration strings: the YAML a user would
// write for it.
func encode(v reflect.Value) any {
	if v.Type() == reflect.TypeFor[time.Duration]() {
		return time.Duration(v.Int()).String()
	}
	if m, ok := v.Interface().(encoding.TextMarshaler); ok {
		b, _ := m.MarshalText() // a grace, a PROXY version, a prefix
		return string(b)
	}
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			return nil
		}
		return encode(v.Elem())
	case reflect.Struct:
		m := make(map[string]any)
		for i := range v.NumField() {
			if isInline(v.Type().Field(i)) {
				for k, e := range encode(v.Field(i)).(map[string]any) {
					m[k] = e
				}
			} else if k := yamlKey(v.Type().Field(i)); k != "" {
				if e := encode(v.Field(i)); e != nil {
					m[k] = e
				}
			}
		}
		return m
	case reflect.Slice:
		l := make([]any, v.Len())
		for i := range l {
			l[i] = encode(v.Index(i))
		}
		return l
	}
	return v.Interface()
}

// dump prints a config with its pointers followed.
func dump(c *Config) string {
	out, _ := yaml.Marshal(encode(reflect.ValueOf(c).Elem()))
	return "\n" + string(out)
}

// TestDefaults checks that every key left out takes the documented
// default, and the derived defaults: names, etcd endpoints and backoff_max.
func TestDefaults(t *testing.T) {
	cfg, err := Load("testdata/valid/minimal.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want := DefaultListener()
	want.Name, want.Listen, want.Discovery = "listener-0", ":8080", "static"
	want.Static = Statics("127.0.0.1:9001", "127.0.0.1:9002")
	if !reflect.DeepEqual(cfg.Listeners, []Listener{want}) {
		t.Errorf("listener:\n got %+v\nwant %+v", cfg.Listeners, []Listener{want})
	}
	if cfg.Admin.Listen != "127.0.0.1:9090" {
		t.Errorf("admin.listen = %q", cfg.Admin.Listen)
	}
	if cfg.Registries.Consul != nil || cfg.Registries.Etcd != nil {
		t.Errorf("registries not asked for: %+v", cfg.Registries)
	}

	l := DefaultListener()
	h := l.Health
	got := []any{h.Check, h.Path, h.Interval, h.Timeout, h.Rise, h.Fall, h.BackoffMax,
		l.DialTimeout, l.Retries, l.MaxConns, l.IdleTimeout, l.DrainTimeout,
		l.ProxyProtocol, len(l.AcceptProxyProtocol), l.ProxyHeaderTimeout, l.Panic}
	wantVals := []any{"tcp", "/healthz", 2 * time.Second, time.Second, 2, 3, 30 * time.Second,
		2 * time.Second, 2, 0, time.Hour, 30 * time.Second,
		proxy.ProxyVersion(0), 0, 5 * time.Second, false}
	if !reflect.DeepEqual(got, wantVals) {
		t.Errorf("DefaultListener values\n got %v\nwant %v", got, wantVals)
	}
	if d := Default(); d.Admin.Listen != "127.0.0.1:9090" || len(d.Listeners) != 0 {
		t.Errorf("Default() = %+v", d)
	}
}

func TestDefaultNames(t *testing.T) {
	cfg, err := Parse([]byte(`
registries: {etcd: {endpoints: [e:2379]}}
listeners:
  - {listen: ":1", discovery: etcd, service: web}
  - {listen: ":2", discovery: etcd, service: web}
  - {listen: ":3", discovery: static, static: [a:1]}
  - {listen: ":4", discovery: static, static: [a:1], name: api}
  - {listen: ":5", discovery: etcd, service: api}
`), "rota.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, l := range cfg.Listeners {
		names = append(names, l.Name)
	}
	want := []string{"web", "web-1", "listener-2", "api", "api-4"}
	if !reflect.DeepEqual(names, want) {
		t.Errorf("names = %q, want %q", names, want)
	}
}

func TestBackoffMaxFollowsInterval(t *testing.T) {
	cfg, err := Parse([]byte(static+"    health: {interval: 1m}\n"), "rota.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.Listeners[0].Health.BackoffMax; got != time.Minute {
		t.Errorf("backoff_max = %s, want it raised to the interval 1m", got)
	}
}

func TestEmbeddedEndpoints(t *testing.T) {
	// Off loopback the server needs TLS with client certificates, and
	// rota's own client a certificate.
	const mtls = ", tls: {cert_file: s.pem, key_file: s-key.pem, client_ca_file: ca.pem}}\n    tls: {cert_file: c.pem, key_file: c-key.pem"
	tests := []struct{ embedded, want string }{
		{"{}", "127.0.0.1:2379"},
		{"{client_url: 'https://0.0.0.0:23790'" + mtls + "}", "127.0.0.1:23790"},
		{"{client_url: 'https://[::]:2379'" + mtls + "}", "[::1]:2379"},
		{"{client_url: 'https://etcd.local:2379/'" + mtls + "}", "etcd.local:2379"},
		{"{client_url: 'https://localhost:2379', tls: {cert_file: s.pem, key_file: s-key.pem}}", "localhost:2379"},
		{"", "127.0.0.1:2379"}, // "embedded:" with no value is present
	}
	for _, tt := range tests {
		src := "registries:\n  etcd:\n    embedded: " + tt.embedded + "\n" + static
		cfg, err := Parse([]byte(src), "rota.yaml")
		if err != nil {
			t.Errorf("%s: %v", tt.embedded, err)
			continue
		}
		e := cfg.Registries.Etcd
		if !reflect.DeepEqual(e.Endpoints, []string{tt.want}) || e.Prefix != DefaultEtcdPrefix || e.Embedded.DataDir != "./rota-data" {
			t.Errorf("embedded %s: etcd = %+v, embedded = %+v; want endpoints [%s]", tt.embedded, e, e.Embedded, tt.want)
		}
	}
}

// TestNulls pins down what "key:" with no value means.
func TestNulls(t *testing.T) {
	cfg, err := Parse([]byte(`
admin:
  listen:
registries:
  consul:
listeners:
  - listen: :1
    discovery: consul
    service: web
    tags:
    health:
`), "rota.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Admin.Listen != "" {
		t.Errorf("admin.listen: null should disable admin, got %q", cfg.Admin.Listen)
	}
	if cfg.Registries.Consul == nil {
		t.Errorf("consul: null should configure consul with defaults")
	}
	if l := cfg.Listeners[0]; l.Tags != nil || !reflect.DeepEqual(l.Health, DefaultListener().Health) {
		t.Errorf("listener = %+v", l)
	}
	got := parseErr(t, static+"    retries:\n    health: {interval: }\n")
	want := []string{"rota.yaml:7:24: listeners[0].health.interval: must be greater than 0"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("null scalars: got %q, want %q", got, want)
	}
}

func TestAnchorsAndMerge(t *testing.T) {
	cfg, err := Load("testdata/valid/anchors.yaml")
	if err != nil {
		t.Fatal(err)
	}
	a, b := cfg.Listeners[0], cfg.Listeners[1]
	if a.Name != "a" || b.Name != "b" || b.Listen != ":9002" || b.Service != "b" {
		t.Errorf("merge: a=%+v b=%+v", a, b)
	}
	for _, l := range cfg.Listeners {
		if l.Health.Check != "http" || l.Health.Interval != time.Second || l.Health.Path != "/a" || l.Discovery != "etcd" {
			t.Errorf("%s: health = %+v", l.Name, l.Health)
		}
	}
	if cfg.Admin.Listen != "" {
		t.Errorf("admin.listen = %q, want disabled", cfg.Admin.Listen)
	}
}

// TestAliasBomb checks that a file whose aliases expand exponentially is
// refused quickly instead of eating the machine.
func TestAliasBomb(t *testing.T) {
	var b strings.Builder
	b.WriteString("x-0: &a0 {check: tcp}\n")
	for i := 1; i <= 30; i++ {
		fmt.Fprintf(&b, "x-%d: &a%d {<<: [*a%d, *a%d, *a%d, *a%d]}\n", i, i, i-1, i-1, i-1, i-1)
	}
	b.WriteString("listeners:\n  - {listen: ':1', discovery: static, static: [a:1], health: *a30}\n")
	start := time.Now()
	got := parseErr(t, b.String())
	want := []string{"rota.yaml: document too complex: aliases and merge keys expand to too many nodes"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("took %s", d)
	}
}

// TestValidateInMemory checks configs built the way the quick flags of
// `rota serve` build them.
func TestValidateInMemory(t *testing.T) {
	c := Default()
	if err := c.Validate(); err == nil || err.Error() != "listeners: no listeners defined" {
		t.Errorf("Default().Validate() = %v", err)
	}

	l := DefaultListener()
	l.Name, l.Listen, l.Discovery = "static", ":8080", "static"
	l.Static = Statics("h1:9001", "h2:9002")
	c.Listeners = append(c.Listeners, l)
	if err := c.Validate(); err != nil {
		t.Errorf("static quick form: %v", err)
	}

	e := DefaultEtcd()
	e.Endpoints = []string{"127.0.0.1:2379"}
	c.Registries.Etcd = &e
	l2 := DefaultListener()
	l2.Name, l2.Listen, l2.Service, l2.Discovery = "web", ":8081", "web", "etcd"
	c.Listeners = append(c.Listeners, l2)
	if err := c.Validate(); err != nil {
		t.Errorf("etcd quick form: %v", err)
	}

	emb := DefaultEmbedded()
	c.Registries.Etcd = &Etcd{Prefix: "/services/", Embedded: &emb}
	if err := c.Validate(); err != nil {
		t.Errorf("embedded without endpoints: %v", err)
	}
	if got := c.Registries.Etcd.ClientEndpoints(); !reflect.DeepEqual(got, []string{"127.0.0.1:2379"}) {
		t.Errorf("ClientEndpoints = %q", got)
	}

	bad := *c
	bad.Listeners = append([]Listener(nil), c.Listeners...)
	bad.Listeners[0].Name = ""
	bad.Listeners[1].Health.Rise = 0
	bad.Admin.Listen = ":8080"
	bad.Admin.TokenFile = "/etc/rota/token"
	err := bad.Validate()
	want := strings.Join([]string{
		`listeners[0].name: must not be empty`,
		`listeners[0].listen: ":8080" conflicts with admin.listen ":8080"`,
		`listeners[1].health.rise: must be at least 1`,
	}, "\n")
	if err == nil || err.Error() != want {
		t.Errorf("Validate() =\n%v\nwant\n%s", err, want)
	}
	var first *Error
	if !errors.As(err, &first) || first.Field != "listeners[0].name" || first.Line != 0 {
		t.Errorf("errors.As first = %+v", first)
	}
	if c.Listeners[0].Name != "static" {
		t.Errorf("Validate changed the config")
	}
	if err := (*Config)(nil).Validate(); err == nil {
		t.Errorf("nil config validated")
	}
}

func TestErrorFormat(t *testing.T) {
	tests := []struct {
		e    Error
		want string
	}{
		{Error{File: "rota.yaml", Line: 14, Column: 7, Field: "listeners[0].health.rise", Msg: "must be at least 1"},
			"rota.yaml:14:7: listeners[0].health.rise: must be at least 1"},
		{Error{File: "rota.yaml", Line: 3, Msg: "invalid YAML: x"}, "rota.yaml:3: invalid YAML: x"},
		{Error{File: "rota.yaml", Field: "listeners", Msg: "no listeners defined"}, "rota.yaml: listeners: no listeners defined"},
		{Error{Field: "admin.listen", Msg: "bad"}, "admin.listen: bad"},
		{Error{Line: 2, Column: 1, Msg: "m"}, "2:1: m"},
	}
	for _, tt := range tests {
		if got := tt.e.Error(); got != tt.want {
			t.Errorf("%+v: got %q, want %q", tt.e, got, tt.want)
		}
	}
}

// TestErrorsAs checks the shape promised to callers: errors.As finds the
// first problem as an *Error with its position; the message lists all.
func TestErrorsAs(t *testing.T) {
	_, err := Parse([]byte(static+"    retries: -1\n    health: {rise: 0}\n"), "rota.yaml")
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("errors.As(%v) failed", err)
	}
	want := Error{File: "rota.yaml", Line: 6, Column: 14, Field: "listeners[0].retries", Msg: "must be 0 to 100; got -1"}
	if *e != want {
		t.Errorf("first = %+v, want %+v", *e, want)
	}
	if n := len(strings.Split(err.Error(), "\n")); n != 2 {
		t.Errorf("%d lines in %q, want 2", n, err)
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"))
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load of a missing file: %v, want fs.ErrNotExist", err)
	}
}

// Prefixes (accept_proxy_protocol, allow, deny) are parsed as the file is
// read: a bare IP is a single host, a prefix is masked, IPv4-mapped entries
// name the IPv4 clients they are matched as.
func TestPrefixesParsedAtLoad(t *testing.T) {
	cfg, err := Parse([]byte(static+`    accept_proxy_protocol: [10.1.2.3/8, 192.168.0.7, "fd00::1", "2001:db8::/32",
      "::ffff:10.9.0.5", "::ffff:172.16.0.0/108", "::ffff:0:0/96", "::/80"]
`), "rota.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("192.168.0.7/32"),
		netip.MustParsePrefix("fd00::1/128"),
		netip.MustParsePrefix("2001:db8::/32"),
		// IPv4-mapped entries name IPv4 clients, which are matched unmapped.
		netip.MustParsePrefix("10.9.0.5/32"),
		netip.MustParsePrefix("172.16.0.0/12"),
		netip.MustParsePrefix("0.0.0.0/0"),
		netip.MustParsePrefix("::/80"),
	}
	if got := cfg.Listeners[0].AcceptProxyProtocol; !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	if _, err := Parse([]byte(static+"    deny: [\"fe80::1%eth0\"]\n"), "rota.yaml"); err == nil {
		t.Errorf("zoned address accepted")
	}
}

func TestListenConflict(t *testing.T) {
	tests := []struct {
		a, b string
		want bool
	}{
		{":8080", ":8080", true},
		{":8080", "127.0.0.1:8080", true},
		{"0.0.0.0:8080", "10.0.0.1:8080", true},
		{"[::]:8080", "127.0.0.1:8080", true},
		{"127.0.0.1:8080", "127.0.0.1:08080", true},
		{"LocalHost:1", "localhost:1", true},
		{"[::ffff:127.0.0.1]:1", "127.0.0.1:1", true},
		{"127.0.0.1:8080", "127.0.0.2:8080", false},
		{"127.0.0.1:8080", "127.0.0.1:8081", false},
		{":0", ":0", false}, // each gets its own free port
		{"", ":8080", false},
	}
	for _, tt := range tests {
		if got := listenConflict(tt.a, tt.b); got != tt.want {
			t.Errorf("listenConflict(%q, %q) = %v", tt.a, tt.b, got)
		}
	}
}

func TestAddresses(t *testing.T) {
	ok := []string{"web:80", "web_1:80", "a.b.c:1", "10.0.0.1:65535", "[::1]:1", "[fe80::1%eth0]:1", "host.:1"}
	for _, s := range ok {
		if err := checkAddr(s, targetAddr); err != nil {
			t.Errorf("%q: %v", s, err)
		}
	}
	bad := []string{"", "web", ":80", "web:0", "web:65536", "web:-1", "web:http", "-web:1", "a..b:1",
		"300.0.0.1:1", "1.2.3:1", "[::g]:1", "a b:1", strings.Repeat("a", 64) + ":1"}
	for _, s := range bad {
		if err := checkAddr(s, targetAddr); err == nil {
			t.Errorf("%q accepted", s)
		}
	}
}

// TestExampleFile keeps the repository's annotated example loadable.
func TestExampleFile(t *testing.T) {
	cfg, err := Load("../rota.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Listeners) != 3 || cfg.Registries.Etcd == nil || cfg.Registries.Consul == nil {
		t.Fatalf("example lost a section: %+v", cfg)
	}
	// The routed listener: names defaulted, the listener's health given
	// to routes that set none.
	edge := cfg.Listeners[1]
	if !edge.Routed() || edge.Routes[0].Name != "api" || edge.Routes[1].Name != "route-1" ||
		edge.Routes[1].Health.Interval != 5*time.Second {
		t.Fatalf("edge listener = %+v", edge)
	}
	// It lists every key, but starts nothing: the embedded etcd block,
	// whose presence starts a server, is there commented out.
	if cfg.Registries.Etcd.Embedded != nil {
		t.Fatal("rota.example.yaml starts an embedded etcd server")
	}
	text, _ := os.ReadFile("../rota.example.yaml")
	for _, typ := range []reflect.Type{
		reflect.TypeFor[Config](), reflect.TypeFor[Admin](), reflect.TypeFor[Registries](),
		reflect.TypeFor[Consul](), reflect.TypeFor[Etcd](), reflect.TypeFor[TLS](), reflect.TypeFor[Embedded](),
		reflect.TypeFor[Listener](), reflect.TypeFor[health.Config](), reflect.TypeFor[Route](), reflect.TypeFor[ServerTLS](),
		reflect.TypeFor[dns.Config](), reflect.TypeFor[Docker](), reflect.TypeFor[DockerMatch](),
	} {
		for _, k := range fieldKeys(typ) {
			if !strings.Contains(string(text), k+":") {
				t.Errorf("rota.example.yaml does not list %s.%s", typ.Name(), k)
			}
		}
	}
}

// CONSUL_HTTP_ADDR alone enables Consul, as consul/api reads it itself.
func TestConsulFromEnvironment(t *testing.T) {
	src := []byte("listeners:\n  - {listen: ':1', discovery: consul, service: web}\n")
	t.Setenv("CONSUL_HTTP_ADDR", "")
	if _, err := Parse(src, "rota.yaml"); err == nil {
		t.Fatal("consul without registries.consul or CONSUL_HTTP_ADDR accepted")
	}
	t.Setenv("CONSUL_HTTP_ADDR", "127.0.0.1:8500")
	cfg, err := Parse(src, "rota.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Registries.Consul == nil || *cfg.Registries.Consul != (Consul{}) {
		t.Fatalf("registries.consul = %+v, want the defaults (consul/api reads the environment)", cfg.Registries.Consul)
	}
}

// registries.dns is always there: absent, its defaults; partly written, the
// rest keep theirs.
func TestDNSDefaults(t *testing.T) {
	cfg, err := Parse([]byte("listeners:\n  - {listen: ':1', discovery: dns, service: app, port: 80}\n"), "rota.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cfg.Registries.DNS, dns.DefaultConfig()) {
		t.Fatalf("dns = %+v, want the defaults", cfg.Registries.DNS)
	}
	cfg, err = Parse([]byte("registries: {dns: {refresh: 30s, resolvers: ['10.0.0.2:53']}}\nlisteners:\n  - {listen: ':1', discovery: dns, service: _app._tcp.x}\n"), "rota.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want := dns.Config{Resolvers: []string{"10.0.0.2:53"}, Refresh: 30 * time.Second, MinRefresh: dns.DefaultMinRefresh, Timeout: dns.DefaultTimeout}
	if !reflect.DeepEqual(cfg.Registries.DNS, want) {
		t.Fatalf("dns = %+v, want %+v", cfg.Registries.DNS, want)
	}
}

// A static entry's backup flag, and a send_expect check's steps, decode as
// written.
func TestStaticBackupAndSteps(t *testing.T) {
	src := "listeners:\n  - name: db\n    listen: ':1'\n    discovery: static\n" +
		"    static: [10.0.0.1:5432, {addr: 10.0.0.2:5432, backup: true}]\n" +
		"    health: {check: send_expect, steps: [{send: 'PING\\r\\n'}, {expect: '+PONG'}]}\n"
	cfg, err := Parse([]byte(src), "rota.yaml")
	if err != nil {
		t.Fatal(err)
	}
	st := cfg.Listeners[0].Static
	if len(st) != 2 || st[0].Backup || !st[1].Backup || st[1].Addr != "10.0.0.2:5432" {
		t.Fatalf("static %+v", st)
	}
	if h := cfg.Listeners[0].Health; len(h.Steps) != 2 || h.Steps[0].Send != `PING\r\n` || h.Steps[1].Expect != "+PONG" {
		t.Fatalf("steps %+v", h.Steps)
	}
}

// TestKubernetesListener: a Service by namespace/name, its port by name,
// and the API server's kubeconfig and context.
func TestKubernetesListener(t *testing.T) {
	cfg, err := Parse([]byte(`
registries:
  kubernetes: {kubeconfig: /etc/rota/kubeconfig, context: prod}
listeners:
  - listen: :1
    discovery: kubernetes
    service: shop/web
    port: http
  - listen: :2
    discovery: kubernetes
    service: api
    port: 8080
`), "rota.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if want := (Kubernetes{Kubeconfig: "/etc/rota/kubeconfig", Context: "prod"}); cfg.Registries.Kubernetes != want {
		t.Errorf("registries.kubernetes = %+v, want %+v", cfg.Registries.Kubernetes, want)
	}
	if p := cfg.Listeners[0].Port; p != (Port{Name: "http"}) || p.String() != "http" {
		t.Errorf("listeners[0].port = %+v", p)
	}
	if p := cfg.Listeners[1].Port; p != (Port{Number: 8080}) || p.String() != "8080" {
		t.Errorf("listeners[1].port = %+v", p)
	}
	if cfg.Listeners[0].Name != "web" {
		t.Errorf("listeners[0].name = %q, want the service's name without its namespace", cfg.Listeners[0].Name)
	}
}
