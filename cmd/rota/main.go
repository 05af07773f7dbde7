// Command rota is a TCP proxy for dynamic clusters. This package only parses
// the command line and wires the other packages together.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `rota is a TCP proxy for dynamic clusters.

Usage:
  rota serve --config rota.yaml
  rota serve --listen :8080 --backend h1:p1 --backend h2:p2
  rota serve --listen :8080 --service web --etcd 127.0.0.1:2379
  rota serve --listen :8080 --service web --consul 127.0.0.1:8500
  rota register --etcd 127.0.0.1:2379 --service web --addr 10.0.0.5:9000 [--ttl 10s]
  rota drain --etcd 127.0.0.1:2379 LISTENER TARGET     a fleet-wide drain mark (registries.state: etcd)
  rota undrain --etcd 127.0.0.1:2379 LISTENER TARGET   its removal
  rota demo            embedded etcd + 3 demo backends + proxy on :8080
  rota demo-backend    one demo HTTP backend, optionally self-registering in etcd or Consul
  rota check --config rota.yaml
  rota upgrade --pid-file /run/rota.pid   hand the listeners to a new binary (as SIGUSR2)
  rota healthcheck --url URL   exit 0 when URL answers 2xx (container healthchecks)
  rota version

Run "rota <command> --help" for the flags of a command.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run executes one command and returns the process exit code.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	cmds := map[string]func([]string, io.Writer, io.Writer) error{
		"serve":        cmdServe,
		"check":        cmdCheck,
		"register":     cmdRegister,
		"drain":        cmdDrain(true),
		"undrain":      cmdDrain(false),
		"demo":         cmdDemo,
		"demo-backend": cmdDemoBackend,
		"healthcheck":  cmdHealthcheck,
		"upgrade":      cmdUpgrade,
		"version": func(args []string, stdout, stderr io.Writer) error {
			if err := parseFlags(newFlagSet("version", stderr, "rota version"), args); err != nil {
				return err
			}
			fmt.Fprintln(stdout, "rota", version)
			return nil
		},
	}
	name := args[0]
	if name == "-h" || name == "--help" || name == "help" {
		fmt.Fprint(stdout, usage)
		return 0
	}
	cmd, ok := cmds[name]
	if !ok {
		fmt.Fprintf(stderr, "rota: unknown command %q\n\n%s", name, usage)
		return 2
	}
	err := cmd(args[1:], stdout, stderr)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, new(usageError)):
		fmt.Fprintf(stderr, "rota %s: %v\n", name, err)
		return 2
	default:
		fmt.Fprintf(stderr, "rota %s: %v\n", name, err)
		return 1
	}
}

// usageError is a mistake on the command line (exit status 2).
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

// newFlagSet returns a flag set that reports errors instead of exiting.
func newFlagSet(name string, stderr io.Writer, synopsis string) *flag.FlagSet {
	fs := flag.NewFlagSet("rota "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: %s\n\nFlags:\n", synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses args and rejects positional arguments.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

// listFlag is a flag that may be repeated and also takes comma-separated
// values: --backend a:1 --backend b:2, or --etcd a:2379,b:2379.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(v string) error {
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*l = append(*l, p)
		}
	}
	return nil
}

// setFlags returns the names of the flags given on the command line.
func setFlags(fs *flag.FlagSet) map[string]bool {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	return set
}
