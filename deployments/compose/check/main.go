// Command check runs docker-compose.yml on this machine's Docker engine and
// checks it end to end, from images built here FROM scratch
// (deployments/compose/local.yml: no image is pulled). It builds the static
// binaries and the images (cached: a second run builds nothing), brings the
// topology up under a project name of its own, checks round-robin through
// both registries, scale out and in, a backend killed under load, registry
// outages, a rota restart, health and logs, prints each check with its
// timing, and always takes the project down again (down -v), also on
// failure or interrupt.
//
// With -cluster it adds deployments/compose/cluster.yml: 3-member etcd and
// Consul clusters, one member cut off its network and a leader killed
// under client load.
//
//	make compose-test              (go run ./deployments/compose/check)
//	make compose-test CLUSTER=1    (go run ./deployments/compose/check -cluster)
//	make compose-images            (-images: build the images only)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	cluster := flag.Bool("cluster", false, "run the 3-member etcd and Consul clusters of deployments/compose/cluster.yml")
	imagesOnly := flag.Bool("images", false, "only build the binaries and images")
	keep := flag.Bool("keep", false, "leave the project up after the checks (take it down with the printed command)")
	timeout := flag.Duration("timeout", 20*time.Minute, "give up after this long (the first build of the images is included)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	if err := run(ctx, *cluster, *imagesOnly, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "compose check:", err)
		os.Exit(1)
	}
}

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "[%s] %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, a...))
}

// report collects the checks and prints them as they happen and as a table
// at the end, like `make e2e`.
type report struct {
	mu     sync.Mutex
	checks []check
}

type check struct {
	name, result string
	took         time.Duration
	ok           bool
}

func (r *report) record(name string, took time.Duration, ok bool, format string, a ...any) {
	c := check{name: name, result: fmt.Sprintf(format, a...), took: took, ok: ok}
	r.mu.Lock()
	r.checks = append(r.checks, c)
	r.mu.Unlock()
	mark := "ok  "
	if !ok {
		mark = "FAIL"
	}
	logf("%s %s (%v): %s", mark, name, took.Round(time.Millisecond), c.result)
}

// fail records a failed check from an error and returns it.
func (r *report) fail(name string, took time.Duration, err error) error {
	r.record(name, took, false, "%v", err)
	return fmt.Errorf("%s: %w", name, err)
}

func (r *report) summary(total time.Duration) error {
	fmt.Println("\n| check | took | result | |\n|---|---|---|---|")
	failed := 0
	for _, c := range r.checks {
		mark := "ok"
		if !c.ok {
			mark, failed = "FAIL", failed+1
		}
		fmt.Printf("| %s | %v | %s | %s |\n", c.name, c.took.Round(time.Millisecond), c.result, mark)
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d checks failed", failed, len(r.checks))
	}
	fmt.Printf("\nall %d checks passed in %v\n", len(r.checks), total.Round(time.Second))
	return nil
}

// The host side of the topology: docker-compose.yml publishes these on
// 127.0.0.1 only, and the checks send traffic nowhere else.
const (
	webAddr       = "127.0.0.1:8080" // etcd-registered backends
	webConsulAddr = "127.0.0.1:8081" // Consul-registered backends
	adminAddr     = "127.0.0.1:9090"
	// adminTokenFile is the admin token the compose files mount into rota,
	// relative to the repository root (the check's working directory).
	adminTokenFile = "deployments/compose/admin-token"
	consulAddr     = "127.0.0.1:8500"
)

func run(ctx context.Context, cluster, imagesOnly, keep bool) error {
	begin := time.Now()
	root, err := repoRoot()
	if err != nil {
		return err
	}
	if err := os.Chdir(root); err != nil { // the compose files' paths are the root's
		return err
	}
	engine, err := docker(ctx, "info", "--format", "{{.ServerVersion}}")
	if err != nil {
		return fmt.Errorf("no Docker engine: %w", err)
	}
	logf("Docker engine %s", strings.TrimSpace(engine))
	tool, err := findCompose(ctx)
	if err != nil {
		return err
	}
	files := []string{"docker-compose.yml", "deployments/compose/local.yml"}
	if cluster {
		files = append(files, "deployments/compose/cluster.yml")
	}
	c := &compose{tool: tool, project: fmt.Sprintf("rotacheck%d", os.Getpid()), files: files, dir: root}
	logf("compose tool: %s", strings.Join(tool, " "))

	r := &report{}
	start := time.Now()
	env, summary, err := buildImages(ctx, root, c)
	if err != nil {
		return r.fail("binaries and images", time.Since(start), err)
	}
	r.record("binaries and images", time.Since(start), true, "%s", summary)
	if imagesOnly {
		return nil
	}
	c.env = append(env, dockerGID()...)
	if cluster {
		subnet, err := freeSubnet(ctx)
		if err != nil {
			return err
		}
		c.env = append(c.env, "ROTA_CLUSTER_NET="+subnet,
			"ROTA_ETCD_IMAGE="+imageRepo+"etcd:"+envTag(env, "ROTA_LOCAL_ETCD_TAG"),
			"ROTA_CONSUL_IMAGE="+imageRepo+"consul:"+envTag(env, "ROTA_LOCAL_CONSUL_TAG"))
		logf("cluster network %s.0/24", subnet)
	}
	for _, a := range []string{webAddr, webConsulAddr, appDNSAddr, appDockerAddr, adminAddr, consulAddr} {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			return fmt.Errorf("%s is taken on this machine (docker-compose.yml publishes it): %w", a, err)
		}
		ln.Close()
	}

	logf("project %s: %s", c.project, strings.Join(files, " + "))
	if keep {
		logf("-keep: take it down with: %s", downCommand(c))
	} else {
		defer func() {
			start := time.Now()
			if err := c.down(); err != nil {
				logf("down -v: %v", err)
				return
			}
			logf("down -v: removed in %v", time.Since(start).Round(time.Millisecond))
		}()
	}

	if cluster {
		err = checkCluster(ctx, c, r)
	} else {
		err = checkTopology(ctx, c, r)
	}
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("interrupted or out of time: %w", err)
		}
		_ = r.summary(time.Since(begin))
		logs, _ := c.run(context.Background(), "logs", "--no-color", "--tail", "30")
		fmt.Fprintf(os.Stderr, "\nlast log lines of each container:\n%s\n", logs)
		return err
	}
	return r.summary(time.Since(begin))
}

func envTag(env []string, name string) string {
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, name+"="); ok {
			return v
		}
	}
	return "dev"
}

func downCommand(c *compose) string {
	parts := append(append([]string{}, c.env...), c.tool...)
	parts = append(parts, "-p", c.project)
	for _, f := range c.files {
		parts = append(parts, "-f", f)
	}
	return strings.Join(append(parts, "down", "-v"), " ")
}

// repoRoot is the directory holding docker-compose.yml, above the working
// directory.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "deployments", "compose", "local.yml")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("repository root (with deployments/compose/local.yml) not found above the working directory")
		}
		dir = parent
	}
}

// dockerGID is DOCKER_GID for docker-compose.yml (rota's group_add): the
// group of the engine's socket, unless the caller set it.
func dockerGID() []string {
	if os.Getenv("DOCKER_GID") != "" {
		return nil
	}
	fi, err := os.Stat("/var/run/docker.sock")
	if err != nil {
		return nil
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return []string{fmt.Sprintf("DOCKER_GID=%d", st.Gid)}
	}
	return nil
}
