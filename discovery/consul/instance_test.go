package consul

import (
	"testing"

	"github.com/hashicorp/consul/api"
)

// A catalog entry's address, weight and backup flag (service meta
// rota_backup = "true").
func TestInstance(t *testing.T) {
	entry := func(meta map[string]string) *api.ServiceEntry {
		return &api.ServiceEntry{Node: &api.Node{Address: "10.0.0.1"},
			Service: &api.AgentService{Port: 5432, Weights: api.AgentWeights{Passing: 3}, Meta: meta}}
	}
	for _, tc := range []struct {
		meta   map[string]string
		backup bool
	}{
		{nil, false},
		{map[string]string{MetaBackup: "true"}, true},
		{map[string]string{MetaBackup: "false"}, false},
		{map[string]string{"other": "true"}, false},
	} {
		in, err := instance(entry(tc.meta))
		if err != nil || in.Addr != "10.0.0.1:5432" || in.Weight != 3 || in.Backup != tc.backup {
			t.Errorf("meta %v: %+v %v, want 10.0.0.1:5432 weight 3 backup %v", tc.meta, in, err, tc.backup)
		}
	}
}
