package testenv

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Docker is this machine's Docker engine, driven with the docker CLI, for
// one test: the containers and networks it makes are removed when the test
// ends.
type Docker struct {
	t     testing.TB
	image string
}

// StartDocker returns the engine with an image built FROM scratch holding
// a static rota (`rota demo-backend` is the plain app the tests run),
// tagged by the binary's hash so that it is built once per change. It
// skips the test when no engine answers (or ROTA_SKIP_DOCKER=1), as make
// test skips the compose checks.
func StartDocker(t testing.TB) *Docker {
	t.Helper()
	if os.Getenv("ROTA_SKIP_DOCKER") == "1" {
		t.Skip("ROTA_SKIP_DOCKER=1")
	}
	if out, err := exec.Command("docker", "info", "--format", "{{.ServerVersion}}").CombinedOutput(); err != nil {
		t.Skipf("no Docker engine: docker info: %v %s", err, bytes.TrimSpace(out))
	}
	root, err := repoRoot()
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "rootfs", "usr", "local", "bin", "rota")
	build := exec.Command("go", "build", "-trimpath", "-o", bin, "./cmd/rota")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("testenv: build a static rota: %v\n%s", err, out)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	d := &Docker{t: t, image: "rota-test/rota:" + hex.EncodeToString(sum[:6])}
	if exec.Command("docker", "image", "inspect", d.image).Run() != nil {
		df := "FROM scratch\nCOPY rootfs/ /\nUSER 65532:65532\nENTRYPOINT [\"/usr/local/bin/rota\"]\n"
		if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(df), 0o644); err != nil {
			t.Fatal(err)
		}
		d.Run("build", "-q", "-t", d.image, dir)
	}
	return d
}

// Image is the FROM-scratch rota image.
func (d *Docker) Image() string { return d.image }

// HealthImage is Image with a healthcheck (exec form: there is no shell
// for docker run's --health-cmd) on port 9000's /healthz every 200 ms,
// unhealthy after one failure.
func (d *Docker) HealthImage() string {
	d.t.Helper()
	tag := d.image + "-health"
	if _, err := d.Try("image", "inspect", tag); err == nil {
		return tag
	}
	dir := d.t.TempDir()
	df := "FROM " + d.image + "\n" +
		`HEALTHCHECK --interval=200ms --timeout=2s --retries=1 CMD ["/usr/local/bin/rota", "healthcheck", "--url", "http://127.0.0.1:9000/healthz"]` + "\n"
	if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(df), 0o644); err != nil {
		d.t.Fatal(err)
	}
	d.Run("build", "-q", "-t", tag, dir)
	return tag
}

// Run runs the docker CLI with args and returns its trimmed output; a
// failure fails the test.
func (d *Docker) Run(args ...string) string {
	d.t.Helper()
	out, err := d.Try(args...)
	if err != nil {
		d.t.Fatalf("docker %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// Try runs the docker CLI with args and returns its trimmed output and
// error.
func (d *Docker) Try(args ...string) (string, error) {
	var stderr bytes.Buffer
	cmd := exec.Command("docker", args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return strings.TrimSpace(string(out) + stderr.String()), err
	}
	return strings.TrimSpace(string(out)), nil
}

// Network creates a bridge network for the test and returns its name.
func (d *Docker) Network() string {
	d.t.Helper()
	name := "rota-test-" + rand.Text()[:10]
	d.Run("network", "create", "--label", "rota-test=1", name)
	d.t.Cleanup(func() { d.Try("network", "rm", name) })
	return name
}

// Container starts a container (docker run -d args...) and returns its ID;
// the test's end removes it.
func (d *Docker) Container(args ...string) string {
	d.t.Helper()
	id := d.Run(append([]string{"run", "-d", "--label", "rota-test=1"}, args...)...)
	d.t.Cleanup(func() { d.Try("rm", "-f", "-v", id) })
	return id
}

// IP is a container's address on network.
func (d *Docker) IP(id, network string) string {
	d.t.Helper()
	return d.Run("inspect", "-f", "{{(index .NetworkSettings.Networks \""+network+"\").IPAddress}}", id)
}
