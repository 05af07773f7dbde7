package docker

import (
	"testing"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/network"
)

// The network a container's address is taken from, without an engine.
func TestAddress(t *testing.T) {
	on := func(nets map[string]string) container.Summary {
		c := container.Summary{NetworkSettings: &container.NetworkSettingsSummary{Networks: map[string]*network.EndpointSettings{}}}
		for n, ip := range nets {
			c.NetworkSettings.Networks[n] = &network.EndpointSettings{IPAddress: ip}
		}
		return c
	}
	two := on(map[string]string{"a_default": "172.18.0.2", "b_default": "172.19.0.2"})
	for _, tc := range []struct {
		name    string
		network string   // docker.network
		rota    []string // rota's own container's networks
		c       container.Summary
		want    string // address, or "" for a warning
	}{
		{"rota not in a container: first by name", "", nil, two, "172.18.0.2"},
		{"the one rota shares", "", []string{"b_default"}, two, "172.19.0.2"},
		{"configured", "b_default", []string{"a_default"}, two, "172.19.0.2"},
		{"configured, not on it", "c_default", nil, two, ""},
		{"rota in a container, none shared", "", []string{"c_default"}, two, ""},
		{"rota on the host's network", "", []string{"host"}, two, "172.18.0.2"},
		{"on no network", "", nil, container.Summary{}, ""},
		{"no address", "", nil, on(map[string]string{"a_default": ""}), ""},
	} {
		w := &Watcher{m: Match{Network: tc.network}}
		got, reason := w.address(tc.c, &self{networks: tc.rota})
		switch {
		case tc.want == "" && reason == "":
			t.Errorf("%s: %v, want a warning", tc.name, got)
		case tc.want != "" && (reason != "" || got.String() != tc.want):
			t.Errorf("%s: %v %q, want %s", tc.name, got, reason, tc.want)
		}
	}
}

// A container's labels: rota.port, rota.weight, rota.backup, and why a bad
// one leaves it out.
func TestInstanceLabels(t *testing.T) {
	w := &Watcher{m: Match{Port: 8080}}
	c := func(labels map[string]string) container.Summary {
		return container.Summary{Labels: labels, NetworkSettings: &container.NetworkSettingsSummary{
			Networks: map[string]*network.EndpointSettings{"n": {IPAddress: "172.18.0.2"}}}}
	}
	for _, tc := range []struct {
		labels map[string]string
		want   string // addr, or "" for a warning
		weight int
		backup bool
	}{
		{nil, "172.18.0.2:8080", 0, false},
		{map[string]string{LabelPort: "9000", LabelWeight: "5", LabelBackup: "true"}, "172.18.0.2:9000", 5, true},
		{map[string]string{LabelBackup: "false"}, "172.18.0.2:8080", 0, false},
		{map[string]string{LabelBackup: "maybe"}, "", 0, false},
		{map[string]string{LabelPort: "0"}, "", 0, false},
		{map[string]string{LabelWeight: "1001"}, "", 0, false},
	} {
		in, reason := w.instance(c(tc.labels), &self{})
		if tc.want == "" {
			if reason == "" {
				t.Errorf("%v: %+v, want a warning", tc.labels, in)
			}
			continue
		}
		if reason != "" || in.Addr != tc.want || in.Weight != tc.weight || in.Backup != tc.backup {
			t.Errorf("%v: %+v %q, want %s weight %d backup %v", tc.labels, in, reason, tc.want, tc.weight, tc.backup)
		}
	}
}
