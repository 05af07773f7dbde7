package kubernetes

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/rota-proxy/rota/discovery"
)

func ptr[T any](v T) *T { return &v }

// ep is an endpoint with the conditions given (nil: unset).
func ep(addr string, ready, serving, terminating *bool) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{Addresses: []string{addr},
		Conditions: discoveryv1.EndpointConditions{Ready: ready, Serving: serving, Terminating: terminating}}
}

func slice(name string, family discoveryv1.AddressType, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Name: name}, AddressType: family, Ports: ports, Endpoints: eps}
}

func port(name string, n int32) discoveryv1.EndpointPort {
	p := discoveryv1.EndpointPort{Port: &n, Protocol: ptr(corev1.ProtocolTCP)}
	if name != "" {
		p.Name = &name
	}
	return p
}

// TestSnapshot: how slices and their endpoints' conditions become
// instances, without an API server.
func TestSnapshot(t *testing.T) {
	yes, no := ptr(true), ptr(false)
	http := []discoveryv1.EndpointPort{port("http", 8080)}
	two := []discoveryv1.EndpointPort{port("http", 8080), port("metrics", 9090)}
	type want struct {
		addr     string
		draining bool
	}
	for _, tc := range []struct {
		name   string
		port   Port
		slices []*discoveryv1.EndpointSlice
		want   []want
		warn   string // a substring of the only warning, if any
	}{
		{"ready, unset conditions count as ready", Port{}, []*discoveryv1.EndpointSlice{
			slice("a", discoveryv1.AddressTypeIPv4, http, ep("10.0.0.1", yes, nil, nil), ep("10.0.0.2", nil, nil, nil)),
		}, []want{{"10.0.0.1:8080", false}, {"10.0.0.2:8080", false}}, ""},
		{"not ready is out; serving and terminating drains; terminating not serving is out", Port{}, []*discoveryv1.EndpointSlice{
			slice("a", discoveryv1.AddressTypeIPv4, http,
				ep("10.0.0.1", no, no, no), ep("10.0.0.2", no, yes, yes), ep("10.0.0.3", no, no, yes), ep("10.0.0.4", yes, yes, no)),
		}, []want{{"10.0.0.2:8080", true}, {"10.0.0.4:8080", false}}, ""},
		{"slices merged, dual-stack", Port{}, []*discoveryv1.EndpointSlice{
			slice("v4-a", discoveryv1.AddressTypeIPv4, http, ep("10.0.0.1", yes, yes, no), ep("10.0.0.2", yes, yes, no), ep("10.0.0.3", yes, yes, no)),
			slice("v4-b", discoveryv1.AddressTypeIPv4, http, ep("10.0.0.4", yes, yes, no), ep("10.0.0.5", yes, yes, no)),
			slice("v6", discoveryv1.AddressTypeIPv6, http, ep("fd00::1", yes, yes, no)),
		}, []want{{"10.0.0.1:8080", false}, {"10.0.0.2:8080", false}, {"10.0.0.3:8080", false},
			{"10.0.0.4:8080", false}, {"10.0.0.5:8080", false}, {"[fd00::1]:8080", false}}, ""},
		{"an endpoint moving between slices counts as ready when either says so", Port{}, []*discoveryv1.EndpointSlice{
			slice("a", discoveryv1.AddressTypeIPv4, http, ep("10.0.0.1", no, yes, yes)),
			slice("b", discoveryv1.AddressTypeIPv4, http, ep("10.0.0.1", yes, yes, no)),
		}, []want{{"10.0.0.1:8080", false}}, ""},
		{"port by name", Port{Name: "metrics"}, []*discoveryv1.EndpointSlice{
			slice("a", discoveryv1.AddressTypeIPv4, two, ep("10.0.0.1", yes, yes, no)),
		}, []want{{"10.0.0.1:9090", false}}, ""},
		{"port by number", Port{Number: 8080}, []*discoveryv1.EndpointSlice{
			slice("a", discoveryv1.AddressTypeIPv4, two, ep("10.0.0.1", yes, yes, no)),
		}, []want{{"10.0.0.1:8080", false}}, ""},
		{"several ports and none chosen", Port{}, []*discoveryv1.EndpointSlice{
			slice("a", discoveryv1.AddressTypeIPv4, two, ep("10.0.0.1", yes, yes, no)),
		}, nil, "several TCP ports (http=8080, metrics=9090): set the listener's port"},
		{"no port of that name", Port{Name: "grpc"}, []*discoveryv1.EndpointSlice{
			slice("a", discoveryv1.AddressTypeIPv4, two, ep("10.0.0.1", yes, yes, no)),
		}, nil, `no TCP port named "grpc" (ports: http=8080, metrics=9090)`},
		{"a Service port number is not the endpoints'", Port{Number: 80}, []*discoveryv1.EndpointSlice{
			slice("a", discoveryv1.AddressTypeIPv4, http, ep("10.0.0.1", yes, yes, no)),
		}, nil, "no TCP port 80 among the endpoints' ports (http=8080)"},
		{"FQDN slices are not dialled", Port{}, []*discoveryv1.EndpointSlice{
			slice("a", discoveryv1.AddressTypeFQDN, http, ep("db.example.com", yes, yes, no)),
		}, nil, "address type FQDN"},
		{"an empty slice with no ports is no warning", Port{}, []*discoveryv1.EndpointSlice{
			slice("a", discoveryv1.AddressTypeIPv4, nil),
		}, nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := &Watcher{port: tc.port}
			by := map[string]*discoveryv1.EndpointSlice{}
			for _, s := range tc.slices {
				by[s.Name] = s
			}
			snap := w.snapshot(by)
			var got []want
			for _, in := range snap.Instances {
				got = append(got, want{in.Addr, in.Draining})
			}
			if len(got) != len(tc.want) {
				t.Fatalf("instances %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("instances %v, want %v", got, tc.want)
				}
			}
			switch {
			case tc.warn == "" && len(snap.Warnings) > 0:
				t.Fatalf("warnings %v, want none", snap.Warnings)
			case tc.warn != "" && (len(snap.Warnings) != 1 || !strings.Contains(snap.Warnings[0].Reason, tc.warn)):
				t.Fatalf("warnings %v, want one saying %q", snap.Warnings, tc.warn)
			}
		})
	}
}

// TestMetadata: the pod, node and zone an endpoint names are kept beside
// its address.
func TestMetadata(t *testing.T) {
	e := ep("10.0.0.1", nil, nil, nil)
	e.TargetRef = &corev1.ObjectReference{Kind: "Pod", Name: "web-7d9f-abc"}
	e.NodeName, e.Zone = ptr("node-1"), ptr("eu-west-1a")
	w := &Watcher{}
	snap := w.snapshot(map[string]*discoveryv1.EndpointSlice{"a": slice("a", discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{port("", 80)}, e)})
	if want := (discovery.Instance{Addr: "10.0.0.1:80", Metadata: `{"node":"node-1","pod":"web-7d9f-abc","zone":"eu-west-1a"}`}); len(snap.Instances) != 1 || snap.Instances[0] != want {
		t.Fatalf("instances %+v, want %+v", snap.Instances, want)
	}
}

// TestParseName: a bare name takes the client's namespace.
func TestParseName(t *testing.T) {
	for in, want := range map[string]Name{"web": {Name: "web"}, "shop/web": {Namespace: "shop", Name: "web"}} {
		if got, err := ParseName(in); err != nil || got != want {
			t.Errorf("ParseName(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "Web", "shop/", "/web", "a/b/c", "9web"} {
		if _, err := ParseName(bad); err == nil {
			t.Errorf("ParseName(%q) accepted", bad)
		}
	}
}
