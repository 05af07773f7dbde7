// Package deployments holds what users copy to run rota (docker-compose,
// Kubernetes, systemd); its test keeps every shipped file valid.
package deployments

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/rota-proxy/rota/config"
)

// TestShippedConfigsPassCheck loads every rota config in the repository the
// way `rota check` does, including the one inside the Kubernetes ConfigMap.
func TestShippedConfigsPassCheck(t *testing.T) {
	files := []string{"../rota.example.yaml"}
	for _, pat := range []string{"*/rota*.yaml", "../config/testdata/valid/*.yaml"} {
		m, _ := filepath.Glob(pat)
		files = append(files, m...)
	}
	if len(files) < 4 {
		t.Fatalf("found only %v", files)
	}
	for _, f := range files {
		if _, err := config.Load(f); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
	var cm struct {
		Data map[string]string `yaml:"data"`
	}
	readYAML(t, "k8s/configmap.yaml", &cm)
	if _, err := config.Parse([]byte(cm.Data["rota.yaml"]), "k8s/configmap.yaml#rota.yaml"); err != nil {
		t.Errorf("ConfigMap: %v", err)
	}
}

func readYAML(t *testing.T, path string, v any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func TestComposeFile(t *testing.T) {
	var c struct {
		Services map[string]struct {
			Image       string         `yaml:"image"`
			Build       any            `yaml:"build"`
			Healthcheck map[string]any `yaml:"healthcheck"`
			DependsOn   map[string]struct {
				Condition string `yaml:"condition"`
			} `yaml:"depends_on"`
			Volumes []string `yaml:"volumes"`
		} `yaml:"services"`
	}
	readYAML(t, "../docker-compose.yml", &c)
	for _, want := range []string{"consul", "etcd", "backend", "backend-consul", "rota"} {
		if _, ok := c.Services[want]; !ok {
			t.Errorf("service %s missing", want)
		}
	}
	for name, s := range c.Services {
		if s.Healthcheck == nil {
			t.Errorf("service %s has no healthcheck", name)
		}
		if s.Image != "" {
			tag := s.Image[strings.LastIndex(s.Image, ":")+1:]
			if !strings.Contains(s.Image, ":") || tag == "latest" {
				t.Errorf("service %s: image %q is not pinned", name, s.Image)
			}
		} else if s.Build == nil {
			t.Errorf("service %s has neither image nor build", name)
		}
		for dep, d := range s.DependsOn {
			if d.Condition != "service_healthy" {
				t.Errorf("service %s depends on %s without condition service_healthy", name, dep)
			}
		}
		for _, v := range s.Volumes {
			if src, _, ok := strings.Cut(v, ":"); ok && strings.HasPrefix(src, "./") {
				if _, err := os.Stat(filepath.Join("..", src)); err != nil {
					t.Errorf("service %s mounts missing %s", name, src)
				}
			}
		}
	}
}

func TestKubernetesManifests(t *testing.T) {
	var k struct {
		Resources []string `yaml:"resources"`
	}
	readYAML(t, "k8s/kustomization.yaml", &k)
	for _, r := range k.Resources {
		if _, err := os.Stat(filepath.Join("k8s", r)); err != nil {
			t.Errorf("kustomization lists missing %s", r)
		}
	}
	var d struct {
		Spec struct {
			Replicas int `yaml:"replicas"`
			Template struct {
				Spec struct {
					SecurityContext struct {
						RunAsNonRoot bool `yaml:"runAsNonRoot"`
					} `yaml:"securityContext"`
					Containers []struct {
						ReadinessProbe struct {
							HTTPGet struct{ Path string } `yaml:"httpGet"`
						} `yaml:"readinessProbe"`
						LivenessProbe struct {
							HTTPGet struct{ Path string } `yaml:"httpGet"`
						} `yaml:"livenessProbe"`
						Resources struct {
							Requests map[string]string `yaml:"requests"`
						} `yaml:"resources"`
						SecurityContext struct {
							ReadOnlyRootFilesystem   bool `yaml:"readOnlyRootFilesystem"`
							AllowPrivilegeEscalation bool `yaml:"allowPrivilegeEscalation"`
						} `yaml:"securityContext"`
					} `yaml:"containers"`
				} `yaml:"spec"`
			} `yaml:"template"`
		} `yaml:"spec"`
	}
	readYAML(t, "k8s/deployment.yaml", &d)
	ps := d.Spec.Template.Spec
	if d.Spec.Replicas < 2 || !ps.SecurityContext.RunAsNonRoot || len(ps.Containers) != 1 {
		t.Fatalf("deployment: replicas %d, runAsNonRoot %v", d.Spec.Replicas, ps.SecurityContext.RunAsNonRoot)
	}
	c := ps.Containers[0]
	if c.ReadinessProbe.HTTPGet.Path != "/readyz" || c.LivenessProbe.HTTPGet.Path != "/healthz" {
		t.Errorf("probes: readiness %q, liveness %q", c.ReadinessProbe.HTTPGet.Path, c.LivenessProbe.HTTPGet.Path)
	}
	if !c.SecurityContext.ReadOnlyRootFilesystem || c.SecurityContext.AllowPrivilegeEscalation || len(c.Resources.Requests) == 0 {
		t.Errorf("container security context or resources incomplete: %+v", c)
	}
}

func TestSystemdUnit(t *testing.T) {
	b, err := os.ReadFile("systemd/rota.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("rota.service lacks %s", want)
		}
	}
}
