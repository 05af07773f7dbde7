package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/rota-proxy/rota/discovery/docker"
	"github.com/rota-proxy/rota/health"
)

// runDockerScale measures discovery/docker on this machine's engine: n
// containers of a plain app (rota demo-backend, from an image built here
// FROM scratch, no healthcheck) started together, four `docker run`s at a
// time, as compose's scale-out does; the time from each container's start
// (the engine's StartedAt) to the picker offering it (after rota's first
// TCP probe passed); then all of them killed (SIGKILL), the time from each
// one's death (FinishedAt) to the picker dropping it. It must run where
// the containers' bridge network is reachable: not in bench/isolated.
func runDockerScale(ctx context.Context, o options, out io.Writer) error {
	log := newLogger(o.verbose)
	defer func() { _ = log.Sync() }()
	image, err := benchImage(ctx)
	if err != nil {
		return err
	}
	suffix := strings.ToLower(rand.Text()[:8])
	network, svc := "rota-bench-"+suffix, "bench-"+suffix
	if _, err := dockerCLI(ctx, "network", "create", "--label", "rota-bench=1", network); err != nil {
		return err
	}
	var ids []string
	var mu sync.Mutex
	defer func() {
		// Removed whatever happened, with a context of its own.
		cctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if len(ids) > 0 {
			_, _ = dockerCLI(cctx, append([]string{"rm", "-f"}, ids...)...)
		}
		_, _ = dockerCLI(cctx, "network", "rm", network)
	}()

	w, err := docker.NewWatcher(docker.Config{}, docker.Match{Service: svc, Network: network, Port: 9000}, log)
	if err != nil {
		return err
	}
	rt, err := startRouter(w, health.CheckTCP, log)
	if err != nil {
		return err
	}
	defer rt.stop(log)

	n := o.scale
	each := func(f func(i int) error) error {
		jobs := make(chan int)
		errs := make(chan error, n)
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for i := range jobs {
					if err := f(i); err != nil {
						errs <- err
					}
				}
			})
		}
		for i := range n {
			jobs <- i
		}
		close(jobs)
		wg.Wait()
		close(errs)
		return <-errs
	}
	began := time.Now()
	err = each(func(i int) error {
		id, err := dockerCLI(ctx, "run", "-d", "--network", network, "--label", "rota-bench=1", "--label", docker.LabelService+"="+svc,
			image, "demo-backend", "--listen", ":9000", "--name", fmt.Sprintf("c%d", i))
		if err == nil {
			mu.Lock()
			ids = append(ids, id)
			mu.Unlock()
		}
		return err
	})
	if err != nil {
		return err
	}
	runsTook := time.Since(began)
	cs, err := inspectContainers(ctx, network, ids...)
	if err != nil {
		return err
	}
	addrs := make([]string, len(cs))
	for i, c := range cs {
		addrs[i] = c.addr
	}
	for rt.live() != n {
		if time.Since(began) > 2*time.Minute {
			return fmt.Errorf("%d of %d containers routed after 2 minutes", rt.live(), n)
		}
		time.Sleep(10 * time.Millisecond) // polling the picker of this process
	}
	var toRouted []time.Duration
	for _, c := range cs {
		at, ok := rt.firstSince(&rt.lives, began, func(live []string) bool { return slices.Contains(live, c.addr) })
		if !ok {
			return fmt.Errorf("%s never live", c.addr)
		}
		toRouted = append(toRouted, at.Sub(c.started))
	}
	slices.Sort(toRouted)

	killed := time.Now()
	if err := each(func(i int) error { _, err := dockerCLI(ctx, "kill", ids[i]); return err }); err != nil {
		return err
	}
	for rt.live() != 0 {
		if time.Since(killed) > time.Minute {
			return fmt.Errorf("%d containers still routed a minute after the kills", rt.live())
		}
		time.Sleep(10 * time.Millisecond) // polling the picker of this process
	}
	dead, err := inspectContainers(ctx, network, ids...)
	if err != nil {
		return err
	}
	var toOut []time.Duration
	for i, c := range dead {
		at, ok := rt.firstSince(&rt.lives, killed, func(live []string) bool { return !slices.Contains(live, addrs[i]) })
		if !ok {
			return fmt.Errorf("%s never dropped", addrs[i])
		}
		toOut = append(toOut, at.Sub(c.finished))
	}
	slices.Sort(toOut)

	v, _ := dockerCLI(ctx, "version", "--format", "{{.Server.Version}} (API {{.Server.APIVersion}})")
	fmt.Fprintf(out, "### Docker discovery: %d containers started together, then killed\n\n", n)
	fmt.Fprintf(out, "Docker engine %s on this machine; a plain app (`rota demo-backend`, FROM scratch, no healthcheck) labelled `rota.service`, "+
		"started four `docker run`s at a time (%v for all %d); discovery/docker following the event stream, health check `tcp` "+
		"(a new container is routed after its first probe passes). Times from the engine's own StartedAt and FinishedAt.\n\n", strings.TrimSpace(v), runsTook.Round(time.Millisecond), n)
	fmt.Fprintf(out, "| change | n | p50 | p99 | max |\n|---|---:|---:|---:|---:|\n")
	fmt.Fprintf(out, "| container started -> routed | %d | %s | %s | %s |\n", len(toRouted), ms(pct(toRouted, 50)), ms(pct(toRouted, 99)), ms(pct(toRouted, 100)))
	fmt.Fprintf(out, "| container died (SIGKILL) -> out of rotation | %d | %s | %s | %s |\n\n", len(toOut), ms(pct(toOut, 50)), ms(pct(toOut, 99)), ms(pct(toOut, 100)))
	return nil
}

type benchContainer struct {
	addr              string
	started, finished time.Time
}

// inspectContainers reads the containers' address on network and their
// start and end, in the order of ids.
func inspectContainers(ctx context.Context, network string, ids ...string) ([]benchContainer, error) {
	outp, err := dockerCLI(ctx, append([]string{"inspect", "-f",
		`{{with index .NetworkSettings.Networks "` + network + `"}}{{.IPAddress}}{{end}}|{{.State.StartedAt}}|{{.State.FinishedAt}}`}, ids...)...)
	if err != nil {
		return nil, err
	}
	var cs []benchContainer
	for line := range strings.SplitSeq(outp, "\n") {
		f := strings.Split(line, "|") // no address once it stopped
		if len(f) != 3 {
			return nil, fmt.Errorf("docker inspect: %q", line)
		}
		c := benchContainer{addr: net.JoinHostPort(f[0], "9000")}
		c.started, err = time.Parse(time.RFC3339Nano, f[1])
		if err != nil {
			return nil, err
		}
		c.finished, _ = time.Parse(time.RFC3339Nano, f[2]) // 0001-01-01 while it runs
		cs = append(cs, c)
	}
	return cs, nil
}

// benchImage builds a static rota into an image FROM scratch, tagged by
// the binary's hash (built once per change), and returns its name. It
// runs from the repository root, as make bench does.
func benchImage(ctx context.Context) (string, error) {
	dir, err := os.MkdirTemp("", "rota-bench-image-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "rootfs", "usr", "local", "bin", "rota")
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", bin, "./cmd/rota")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build a static rota (run from the repository root): %w\n%s", err, b)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(data)
	image := "rota-bench/rota:" + hex.EncodeToString(sum[:6])
	if _, err := dockerCLI(ctx, "image", "inspect", image); err == nil {
		return image, nil
	}
	df := "FROM scratch\nCOPY rootfs/ /\nUSER 65532:65532\nENTRYPOINT [\"/usr/local/bin/rota\"]\n"
	if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(df), 0o644); err != nil {
		return "", err
	}
	if _, err := dockerCLI(ctx, "build", "-q", "-t", image, dir); err != nil {
		return "", err
	}
	return image, nil
}

func dockerCLI(ctx context.Context, args ...string) (string, error) {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "docker", args...)
	cmd.Stderr = &stderr
	b, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("docker %s: %w: %s", args[0], err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(string(b)), nil
}
