package fleet

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/internal/retry"
)

// Consul keeps marks in Consul's KV store under Dir.
type Consul struct {
	Client *api.Client
	Log    *zap.Logger
}

// Kind is "consul".
func (c *Consul) Kind() string { return "consul" }

// Get reads one mark.
func (c *Consul) Get(ctx context.Context, listener, addr string) (Mark, error) {
	kv, _, err := c.Client.KV().Get(Key("", listener, addr), (&api.QueryOptions{RequireConsistent: true}).WithContext(ctx))
	if err != nil {
		return Mark{}, fmt.Errorf("consul: read mark: %w", err)
	}
	if kv == nil {
		return Mark{}, nil
	}
	return decode(kv.Value)
}

// Set writes one mark, or deletes it.
func (c *Consul) Set(ctx context.Context, listener, addr string, m Mark) error {
	k := Key("", listener, addr)
	opts := (&api.WriteOptions{}).WithContext(ctx)
	var err error
	if m == (Mark{}) {
		_, err = c.Client.KV().Delete(k, opts)
	} else {
		_, err = c.Client.KV().Put(&api.KVPair{Key: k, Value: encode(m)}, opts)
	}
	if err != nil {
		return fmt.Errorf("consul: write mark %s: %w", k, err)
	}
	return nil
}

// Watch lists the marks with blocking queries: every answer whose index
// moved is applied whole.
func (c *Consul) Watch(ctx context.Context, apply func(Marks), failed func(error)) {
	bo := retry.New(retryInitial, retryMax)
	var index uint64
	applied := false
	for ctx.Err() == nil {
		opts := (&api.QueryOptions{WaitIndex: index, WaitTime: 5 * time.Minute}).WithContext(ctx)
		pairs, meta, err := c.Client.KV().List(Dir, opts)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			// The next list asks afresh: a restarted server's index may
			// be below ours, and a query waiting for ours would block.
			index, applied = 0, false
			failed(fmt.Errorf("consul: list marks: %w", err))
			if !retry.Sleep(ctx, bo.Next()) {
				return
			}
			continue
		}
		bo.Reset()
		if applied && meta.LastIndex == index {
			continue // the wait ended with nothing new
		}
		// An index that went back (a restarted or replaced server) starts
		// over, as Consul's blocking-query rules say.
		index = meta.LastIndex
		if index < 1 {
			index = 1
		}
		marks := Marks{}
		for _, kv := range pairs {
			marks.put("", kv.Key, kv.Value, c.Log)
		}
		apply(marks)
		applied = true
	}
}
