package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/rota-proxy/rota/discovery/etcd"
	"github.com/rota-proxy/rota/fleet"
)

// cmdDrain is rota drain and rota undrain: a fleet-wide drain mark of a
// listener's target written to etcd (registries.state: etcd), which every
// rota reading that etcd applies.
func cmdDrain(on bool) func([]string, io.Writer, io.Writer) error {
	name := "undrain"
	if on {
		name = "drain"
	}
	return func(args []string, stdout, stderr io.Writer) error {
		fs := newFlagSet(name, stderr, "rota "+name+" --etcd host:port [--prefix services/] LISTENER TARGET")
		var ef etcdFlags
		ef.register(fs)
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return err
			}
			return usageError{err.Error()}
		}
		switch {
		case len(ef.endpoints) == 0:
			return usagef("--etcd is required")
		case fs.NArg() != 2:
			return usagef("want LISTENER TARGET (host:port), got %d arguments", fs.NArg())
		}
		listener, target := fs.Arg(0), fs.Arg(1)
		client, err := etcd.NewClient(ef.config())
		if err != nil {
			return err
		}
		defer client.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		store := &fleet.Etcd{Client: client, Root: fleet.Root(ef.prefix)}
		m, err := store.Get(ctx, listener, target)
		if err != nil {
			return err
		}
		m.Drain = on
		if err := store.Set(ctx, listener, target, m); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%sed %s on listener %s (%s)\n", name, target, listener, fleet.Key(store.Root, listener, target))
		return nil
	}
}
