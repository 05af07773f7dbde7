package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"
)

// compose runs one Compose project: `docker compose` (v2) where the plugin
// is installed, else `docker-compose` (v1.29, as Debian ships it). Both read
// the same files; the checks use only what both have, and address single
// containers through `docker` itself.
type compose struct {
	tool    []string // "docker", "compose" or "docker-compose"
	project string
	files   []string
	env     []string // added to the environment: image tags, cluster subnet
	dir     string   // the repository root: the project directory
}

// findCompose returns the command of the Compose tool on this machine.
func findCompose(ctx context.Context) ([]string, error) {
	for _, tool := range [][]string{{"docker", "compose"}, {"docker-compose"}} {
		args := append(slices.Clone(tool[1:]), "version")
		if exec.CommandContext(ctx, tool[0], args...).Run() == nil {
			return tool, nil
		}
	}
	return nil, errors.New("neither `docker compose` nor `docker-compose` answers `version`")
}

// cmd builds a compose command of the project.
func (c *compose) cmd(ctx context.Context, args ...string) *exec.Cmd {
	all := slices.Clone(c.tool[1:])
	all = append(all, "-p", c.project, "--project-directory", c.dir)
	for _, f := range c.files {
		all = append(all, "-f", f)
	}
	all = append(all, args...)
	cmd := exec.CommandContext(ctx, c.tool[0], all...)
	cmd.Dir = c.dir
	cmd.Env = append(os.Environ(), c.env...)
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// run runs a compose command and returns its combined output; the error
// carries the output's tail.
func (c *compose) run(ctx context.Context, args ...string) (string, error) {
	out, err := c.cmd(ctx, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w\n%s", strings.Join(c.tool, " "), strings.Join(args, " "), err, tail(string(out), 30))
	}
	return string(out), nil
}

// up starts the whole project with the given scale of the scaled
// services.
func (c *compose) up(ctx context.Context, scale map[string]int) error {
	_, err := c.run(ctx, append([]string{"up", "-d", "--no-build"}, scaleArgs(scale)...)...)
	return err
}

// scale converges only the scaled services (starting their stopped
// containers too), leaving every other service as it is: a registry
// member a check stopped stays stopped.
func (c *compose) scale(ctx context.Context, scale map[string]int) error {
	args := append([]string{"up", "-d", "--no-build", "--no-deps"}, scaleArgs(scale)...)
	for s := range scale {
		args = append(args, s)
	}
	_, err := c.run(ctx, args...)
	return err
}

// scaleArgs names every scaled service: both tools reset a service not
// named in --scale to its file's scale.
func scaleArgs(scale map[string]int) []string {
	names := make([]string, 0, len(scale))
	for s := range scale {
		names = append(names, s)
	}
	slices.Sort(names)
	var args []string
	for _, s := range names {
		args = append(args, "--scale", fmt.Sprintf("%s=%d", s, scale[s]))
	}
	return args
}

// ids returns the IDs of the service's containers, running or not.
func (c *compose) ids(ctx context.Context, service string) ([]string, error) {
	out, err := c.cmd(ctx, "ps", "-q", service).Output()
	if err != nil {
		return nil, fmt.Errorf("compose ps %s: %w", service, err)
	}
	return strings.Fields(string(out)), nil
}

// allIDs returns the IDs of every container of the project, from docker
// itself (both tools label their containers with the project).
func (c *compose) allIDs(ctx context.Context) ([]string, error) {
	out, err := exec.CommandContext(ctx, "docker", "ps", "-aq", "--filter", "label=com.docker.compose.project="+c.project).Output()
	if err != nil {
		return nil, fmt.Errorf("docker ps: %w", err)
	}
	return strings.Fields(string(out)), nil
}

// down removes the project's containers, networks and volumes. It runs on
// its own context: it must also run after an interrupt.
func (c *compose) down() error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	_, err := c.run(ctx, "down", "-v", "--remove-orphans", "--timeout", "5")
	return err
}

// container is what the checks read of a container from docker inspect.
type container struct {
	ID     string `json:"Id"`
	Name   string
	Config struct {
		Hostname string
		Labels   map[string]string
	}
	State struct {
		Status     string
		Running    bool
		ExitCode   int
		StartedAt  time.Time
		FinishedAt time.Time
		Health     *struct{ Status string }
	}
	NetworkSettings struct {
		Networks map[string]struct {
			IPAddress string
			Aliases   []string
		}
	}
}

// service is the compose service the container belongs to.
func (c container) service() string { return c.Config.Labels["com.docker.compose.service"] }

// health is "healthy", "unhealthy", "starting", or the state when the
// container has no healthcheck or does not run.
func (c container) health() string {
	if !c.State.Running {
		return c.State.Status
	}
	if c.State.Health == nil {
		return "running (no healthcheck)"
	}
	return c.State.Health.Status
}

// ip is the container's address on its (only) network.
func (c container) ip() string {
	for _, n := range c.NetworkSettings.Networks {
		if n.IPAddress != "" {
			return n.IPAddress
		}
	}
	return ""
}

func inspect(ctx context.Context, ids ...string) ([]container, error) {
	if len(ids) == 0 {
		return nil, nil
	}
	out, err := exec.CommandContext(ctx, "docker", append([]string{"inspect"}, ids...)...).Output()
	if err != nil {
		return nil, fmt.Errorf("docker inspect: %w", err)
	}
	var cs []container
	if err := json.Unmarshal(out, &cs); err != nil {
		return nil, fmt.Errorf("docker inspect: %w", err)
	}
	return cs, nil
}

// services returns the containers of one service.
func (c *compose) containers(ctx context.Context, service string) ([]container, error) {
	ids, err := c.ids(ctx, service)
	if err != nil {
		return nil, err
	}
	return inspect(ctx, ids...)
}

// hostnames are the names demo backends answer with (their container's
// hostname, the short container ID).
func hostnames(cs []container) []string {
	out := make([]string, len(cs))
	for i, c := range cs {
		out[i] = c.Config.Hostname
	}
	slices.Sort(out)
	return out
}

// waitHealthy polls until every container of the project runs and is
// healthy, and returns how long that took; on timeout the error lists the
// ones that are not.
func (c *compose) waitHealthy(ctx context.Context, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	var bad []string
	for {
		ids, err := c.allIDs(ctx)
		if err != nil {
			return 0, err
		}
		cs, err := inspect(ctx, ids...)
		if err != nil {
			return 0, err
		}
		bad = bad[:0]
		for _, ct := range cs {
			if h := ct.health(); h != "healthy" {
				bad = append(bad, fmt.Sprintf("%s: %s", strings.TrimPrefix(ct.Name, "/"), h))
			}
		}
		if len(bad) == 0 && len(cs) > 0 {
			return time.Since(start), nil
		}
		if time.Since(start) > timeout {
			return 0, fmt.Errorf("not healthy after %v: %s", timeout, strings.Join(bad, ", "))
		}
		if err := pause(ctx, 250*time.Millisecond); err != nil {
			return 0, err
		}
	}
}

// docker runs a docker command and returns its combined output.
func docker(ctx context.Context, args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, "docker", args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, tail(out.String(), 10))
	}
	return out.String(), nil
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// pause waits d unless ctx ends first: the polling interval of a wait with
// a deadline, never synchronisation by itself.
func pause(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
