// Package deployments holds what users copy to run rota (docker-compose,
// Kubernetes, systemd); its test keeps every shipped file valid.
package deployments

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

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
	for _, want := range []string{"ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
		"Type=notify", "NotifyAccess=all", "PIDFile=/run/rota/rota.pid"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("rota.service lacks %s", want)
		}
	}
	// The socket unit names the listener that config.yaml has on its port.
	sock, err := os.ReadFile("systemd/rota.socket")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"ListenStream=8080", "FileDescriptorName=web", "Service=rota.service"} {
		if !strings.Contains(string(sock), want) {
			t.Errorf("rota.socket lacks %s", want)
		}
	}
	cfg, err := os.ReadFile("systemd/rota.yaml")
	if err != nil || !strings.Contains(string(cfg), "- name: web\n    listen: \":8080\"") || !strings.Contains(string(cfg), "pid_file: /run/rota/rota.pid") {
		t.Errorf("systemd/rota.yaml should have listener web on :8080 and pid_file /run/rota/rota.pid (%v)", err)
	}
}

// TestComposeLocalOverride keeps deployments/compose/local.yml to what it
// promises: for every service of docker-compose.yml, an image: and a
// build: FROM scratch of a Dockerfile that exists, and nothing else, so
// that the offline run checks the ports, commands, healthchecks,
// depends_on and volumes users run.
func TestComposeLocalOverride(t *testing.T) {
	var base, local struct {
		Services map[string]map[string]any `yaml:"services"`
	}
	readYAML(t, "../docker-compose.yml", &base)
	readYAML(t, "compose/local.yml", &local)
	for name := range base.Services {
		if _, ok := local.Services[name]; !ok {
			t.Errorf("local.yml does not replace the image of %s", name)
		}
	}
	for name, s := range local.Services {
		if _, ok := base.Services[name]; !ok {
			t.Errorf("local.yml adds service %s", name)
		}
		for k := range s {
			if k != "image" && k != "build" {
				t.Errorf("local.yml changes %s.%s; it may only replace image and build", name, k)
			}
		}
		image, _ := s["image"].(string)
		if !strings.HasPrefix(image, "rota-local/") {
			t.Errorf("%s: image %q is not a local one", name, image)
		}
		build, _ := s["build"].(map[string]any)
		ctx, _ := build["context"].(string)
		df, _ := build["dockerfile"].(string)
		// Paths are relative to the first file's directory, the repository
		// root; the Dockerfile is relative to the context.
		b, err := os.ReadFile(filepath.Join("..", ctx, df))
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) > 1 && strings.EqualFold(f[0], "FROM") && f[1] != "scratch" {
				t.Errorf("%s: %s builds FROM %s; offline images are FROM scratch", name, df, f[1])
			}
			if f := strings.Fields(line); len(f) > 0 && strings.EqualFold(f[0], "RUN") {
				t.Errorf("%s: %s has a RUN step; a scratch image has no shell", name, df)
			}
		}
	}
}

// TestComposeNoShell: both backends run the same rota image with exec-form
// healthchecks, and every published port binds to the host's loopback.
func TestComposeNoShell(t *testing.T) {
	var c struct {
		Services map[string]struct {
			Command     []string `yaml:"command"`
			Ports       []string `yaml:"ports"`
			Healthcheck struct {
				Test []string `yaml:"test"`
			} `yaml:"healthcheck"`
		} `yaml:"services"`
	}
	readYAML(t, "../docker-compose.yml", &c)
	for name, s := range c.Services {
		if len(s.Healthcheck.Test) == 0 || s.Healthcheck.Test[0] != "CMD" {
			t.Errorf("%s: healthcheck %q is not exec form (CMD)", name, s.Healthcheck.Test)
		}
		for _, p := range s.Ports {
			if !strings.HasPrefix(p, "127.0.0.1:") {
				t.Errorf("%s publishes %q beyond the host's loopback", name, p)
			}
		}
	}
	if cmd := strings.Join(c.Services["backend-consul"].Command, " "); !strings.Contains(cmd, "demo-backend") || !strings.Contains(cmd, "--consul consul:8500") {
		t.Errorf("backend-consul runs %q, want rota demo-backend --consul consul:8500", cmd)
	}
	if _, err := os.Stat("compose/consul-register.sh"); err == nil {
		t.Error("compose/consul-register.sh is back; backend-consul registers itself")
	}
}

// TestComposeCluster: cluster.yml gives each member of the 3-member etcd
// and Consul clusters a container, a healthcheck and an address of its
// own, and rota every etcd member.
func TestComposeCluster(t *testing.T) {
	var c struct {
		Services map[string]struct {
			Command     []string       `yaml:"command"`
			Healthcheck map[string]any `yaml:"healthcheck"`
			Networks    map[string]struct {
				IPv4 string `yaml:"ipv4_address"`
			} `yaml:"networks"`
		} `yaml:"services"`
	}
	readYAML(t, "compose/cluster.yml", &c)
	addrs := map[string]string{}
	for _, m := range []string{"etcd", "etcd2", "etcd3", "consul", "consul-server-1", "consul-server-2", "consul-server-3"} {
		s, ok := c.Services[m]
		if !ok {
			t.Errorf("cluster.yml has no %s", m)
			continue
		}
		ip := s.Networks["default"].IPv4
		if ip == "" {
			t.Errorf("%s has no fixed address", m)
		}
		if other, dup := addrs[ip]; dup {
			t.Errorf("%s and %s share %s", m, other, ip)
		}
		addrs[ip] = m
		if m != "etcd" && m != "consul" && s.Healthcheck == nil {
			t.Errorf("%s has no healthcheck", m)
		}
	}
	cfg, err := config.Load("compose/rota-cluster.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if n := len(cfg.Registries.Etcd.Endpoints); n != 3 {
		t.Errorf("rota-cluster.yaml lists %d etcd endpoints, want the 3 members", n)
	}
}
