package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// image is one FROM-scratch image of local.yml: a build context under
// bin/compose/<name> laid out from static binaries built on the host, and
// a Dockerfile in deployments/compose/scratch.
type image struct {
	name    string   // rota, consul, etcd: the image is rota-local/<name>
	service string   // the local.yml service whose build: makes it
	env     string   // the variable local.yml reads the tag from
	owned   []string // directories under owned/, for the image's user
	tag     string   // content hash of the context and Dockerfile, once laid out
}

const imageRepo = "rota-local/"

func (im *image) ref() string { return imageRepo + im.name + ":" + im.tag }

func (im *image) context(root string) string { return filepath.Join(root, "bin", "compose", im.name) }

func (im *image) dockerfile(root string) string {
	return filepath.Join(root, "deployments", "compose", "scratch", im.name+".Dockerfile")
}

func localImages() []*image {
	return []*image{
		{name: "rota", service: "rota", env: "ROTA_LOCAL_ROTA_TAG"},
		{name: "consul", service: "consul", env: "ROTA_LOCAL_CONSUL_TAG", owned: []string{"consul/data"}},
		{name: "etcd", service: "etcd", env: "ROTA_LOCAL_ETCD_TAG", owned: []string{"etcd-data"}},
	}
}

// buildImages lays out the build contexts from static binaries (go build's
// cache and scripts/*-bin's make that cheap after the first time), tags
// each image by a hash of its context, and builds through Compose only the
// images whose tag is missing: a second run builds nothing. It returns the
// environment that points local.yml at the tags, and a summary.
func buildImages(ctx context.Context, root string, c *compose) ([]string, string, error) {
	images := localImages()
	bins, err := hostBinaries(ctx, root)
	if err != nil {
		return nil, "", err
	}
	var env, built, cached []string
	var missing []*image
	for _, im := range images {
		if err := layout(im, root, bins[im.name]); err != nil {
			return nil, "", fmt.Errorf("image %s: %w", im.name, err)
		}
		if im.tag, err = hashContext(im.context(root), im.dockerfile(root)); err != nil {
			return nil, "", fmt.Errorf("image %s: %w", im.name, err)
		}
		env = append(env, im.env+"="+im.tag)
		if exec.CommandContext(ctx, "docker", "image", "inspect", im.ref()).Run() == nil {
			cached = append(cached, im.ref())
			continue
		}
		missing = append(missing, im)
	}
	if len(missing) > 0 {
		build := *c
		build.env = append(slices.Clone(c.env), env...)
		args := []string{"build"}
		for _, im := range missing {
			args = append(args, im.service)
			built = append(built, im.ref())
		}
		logf("building %s (FROM scratch; logs in bin/compose/build.log)", strings.Join(built, ", "))
		out, err := build.run(ctx, args...)
		_ = os.WriteFile(filepath.Join(root, "bin", "compose", "build.log"), []byte(out), 0o644)
		if err != nil {
			return nil, "", err
		}
		for _, im := range missing {
			pruneOldTags(ctx, im)
		}
	}
	summary := fmt.Sprintf("built %d (%s), up to date %d (%s)", len(built), strings.Join(built, ", "), len(cached), strings.Join(cached, ", "))
	return env, summary, nil
}

// hostBinaries builds rota static and returns, per image, the files of its
// rootfs/ (path inside the image -> file on the host).
func hostBinaries(ctx context.Context, root string) (map[string]map[string]string, error) {
	rota := filepath.Join(root, "bin", "compose", "rota.bin")
	start := time.Now()
	version := "compose"
	if out, err := exec.CommandContext(ctx, "git", "-C", root, "describe", "--tags", "--always", "--dirty").Output(); err == nil {
		version = strings.TrimSpace(string(out))
	}
	// go build leaves an up-to-date output file alone, so an unchanged
	// tree costs a few hundred milliseconds here.
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w -X main.version="+version, "-o", rota, "./cmd/rota")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOTOOLCHAIN=local")
	if out, err := build.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go build ./cmd/rota: %w\n%s", err, out)
	}
	logf("rota built static in %v", time.Since(start).Round(time.Millisecond))

	script := func(name string) ([]string, error) {
		start := time.Now()
		cmd := exec.CommandContext(ctx, filepath.Join(root, "scripts", name))
		cmd.Stderr = os.Stderr // first builds take minutes: show their progress
		out, err := cmd.Output()
		if err != nil {
			return nil, fmt.Errorf("scripts/%s: %w", name, err)
		}
		logf("scripts/%s: %v", name, time.Since(start).Round(time.Millisecond))
		return strings.Fields(string(out)), nil
	}
	consul, err := script("consul-bin")
	if err != nil {
		return nil, err
	}
	etcd, err := script("etcd-bin")
	if err != nil {
		return nil, err
	}
	if len(consul) != 1 || len(etcd) != 2 {
		return nil, fmt.Errorf("scripts/consul-bin printed %q, scripts/etcd-bin %q", consul, etcd)
	}
	return map[string]map[string]string{
		"rota":   {"usr/local/bin/rota": rota},
		"consul": {"bin/consul": consul[0]},
		"etcd":   {"usr/local/bin/etcd": etcd[0], "usr/local/bin/etcdctl": etcd[1]},
	}, nil
}

// layout makes the build context: rootfs/ with the binaries and an empty
// /tmp (mode 1777), owned/ with the image user's directories (mode 0700).
// A binary is copied only when its content changed, so the context of an
// unchanged tree stays byte for byte the same.
func layout(im *image, root string, files map[string]string) error {
	dir := im.context(root)
	tmp := filepath.Join(dir, "rootfs", "tmp")
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return err
	}
	if err := os.Chmod(tmp, 0o777|fs.ModeSticky); err != nil {
		return err
	}
	for _, o := range im.owned {
		d := filepath.Join(dir, "owned", o)
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
		if err := os.Chmod(d, 0o700); err != nil {
			return err
		}
	}
	for dst, src := range files {
		if err := copyIfChanged(src, filepath.Join(dir, "rootfs", dst)); err != nil {
			return err
		}
	}
	return nil
}

func copyIfChanged(src, dst string) error {
	want, err := fileHash(src)
	if err != nil {
		return err
	}
	if have, err := fileHash(dst); err == nil && have == want {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copy %s: %w", src, err)
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}

func fileHash(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// hashContext hashes what docker build sees: the Dockerfile and every
// path, mode and file content of the context (mtimes do not count, as they
// do not for docker's layer cache).
func hashContext(dir, dockerfile string) (string, error) {
	h := sha256.New()
	df, err := os.ReadFile(dockerfile)
	if err != nil {
		return "", err
	}
	fmt.Fprintf(h, "dockerfile %d\n", len(df))
	h.Write(df)
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		info, err := d.Info()
		if err != nil {
			return err
		}
		fmt.Fprintf(h, "%s %v", rel, info.Mode())
		if d.Type().IsRegular() {
			fh, err := fileHash(path)
			if err != nil {
				return err
			}
			fmt.Fprintf(h, " %s", fh)
		}
		h.Write([]byte{'\n'})
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("hash %s: %w", dir, err)
	}
	return hex.EncodeToString(h.Sum(nil))[:12], nil
}

// pruneOldTags removes the earlier content-hash tags of an image just
// built, so that repeated edits do not pile up images. :dev (a developer's
// own `up --build`) is left alone.
func pruneOldTags(ctx context.Context, im *image) {
	out, err := exec.CommandContext(ctx, "docker", "images", "--format", "{{.Tag}}", imageRepo+im.name).Output()
	if err != nil {
		return
	}
	for _, tag := range strings.Fields(string(out)) {
		if tag == im.tag || len(tag) != 12 || strings.Trim(tag, "0123456789abcdef") != "" {
			continue
		}
		var stderr bytes.Buffer
		cmd := exec.CommandContext(ctx, "docker", "rmi", imageRepo+im.name+":"+tag)
		cmd.Stderr = &stderr
		if cmd.Run() == nil {
			logf("removed the outdated image %s:%s", imageRepo+im.name, tag)
		}
	}
}
