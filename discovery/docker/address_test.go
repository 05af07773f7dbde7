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
