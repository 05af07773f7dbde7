package fleet

import (
	"context"
	"errors"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/internal/retry"
)

// Etcd keeps marks in etcd under Root(prefix) + Dir.
type Etcd struct {
	Client *clientv3.Client
	Root   string
	Log    *zap.Logger
}

// Kind is "etcd".
func (e *Etcd) Kind() string { return "etcd" }

// Get reads one mark.
func (e *Etcd) Get(ctx context.Context, listener, addr string) (Mark, error) {
	resp, err := e.Client.Get(ctx, Key(e.Root, listener, addr))
	if err != nil {
		return Mark{}, fmt.Errorf("etcd: read mark: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return Mark{}, nil
	}
	return decode(resp.Kvs[0].Value)
}

// Set writes one mark, or deletes it.
func (e *Etcd) Set(ctx context.Context, listener, addr string, m Mark) error {
	k := Key(e.Root, listener, addr)
	var err error
	if m == (Mark{}) {
		_, err = e.Client.Delete(ctx, k)
	} else {
		_, err = e.Client.Put(ctx, k, string(encode(m)))
	}
	if err != nil {
		return fmt.Errorf("etcd: write mark %s: %w", k, err)
	}
	return nil
}

// Watch lists the marks, applies them, and follows changes from the
// listed revision; a broken watch lists again (after a backoff when it
// failed), so nothing in between is missed.
func (e *Etcd) Watch(ctx context.Context, apply func(Marks), failed func(error)) {
	bo := retry.New(retryInitial, retryMax)
	for ctx.Err() == nil {
		err := e.follow(ctx, apply)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			failed(err)
			if !retry.Sleep(ctx, bo.Next()) {
				return
			}
			continue
		}
		bo.Reset()
	}
}

// follow lists, applies, and watches until the watch breaks.
func (e *Etcd) follow(ctx context.Context, apply func(Marks)) error {
	dir := e.Root + Dir
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	resp, err := e.Client.Get(lctx, dir, clientv3.WithPrefix())
	cancel()
	if err != nil {
		return fmt.Errorf("etcd: list marks: %w", err)
	}
	marks := Marks{}
	for _, kv := range resp.Kvs {
		marks.put(e.Root, string(kv.Key), kv.Value, e.Log)
	}
	apply(marks)
	wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer wcancel()
	for w := range e.Client.Watch(wctx, dir, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1)) {
		if err := w.Err(); err != nil {
			return fmt.Errorf("etcd: watch marks: %w", err)
		}
		next := marks.clone()
		for _, ev := range w.Events {
			if ev.Type == clientv3.EventTypeDelete {
				next.del(e.Root, string(ev.Kv.Key))
				continue
			}
			next.put(e.Root, string(ev.Kv.Key), ev.Kv.Value, e.Log)
		}
		marks = next
		apply(marks)
	}
	if ctx.Err() != nil {
		return nil
	}
	return errors.New("etcd: watch of marks ended")
}
