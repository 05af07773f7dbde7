package fleet

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cenkalti/backoff/v5"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
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
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval, bo.MaxInterval = 100*time.Millisecond, 5*time.Second
	for ctx.Err() == nil {
		err := e.follow(ctx, apply)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			failed(err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(bo.NextBackOff()):
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
		e.put(marks, string(kv.Key), kv.Value)
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
			e.put(next, string(ev.Kv.Key), ev.Kv.Value)
		}
		marks = next
		apply(marks)
	}
	if ctx.Err() != nil {
		return nil
	}
	return errors.New("etcd: watch of marks ended")
}

// put sets a key's mark in m; a malformed one is logged and skipped.
func (e *Etcd) put(m Marks, key string, v []byte) {
	l, a, ok := parseKey(e.Root, key)
	if !ok {
		return
	}
	mk, err := decode(v)
	if err != nil {
		if e.Log != nil {
			e.Log.Warn("fleet mark skipped", zap.String("key", key), zap.Error(err))
		}
		return
	}
	m.set(l, a, mk)
}

func (m Marks) set(listener, addr string, mk Mark) {
	if m[listener] == nil {
		m[listener] = map[string]Mark{}
	}
	m[listener][addr] = mk
}

func (m Marks) del(root, key string) {
	if l, a, ok := parseKey(root, key); ok {
		delete(m[l], a)
	}
}

// clone copies m deeply enough that changing the copy leaves m alone.
func (m Marks) clone() Marks {
	out := make(Marks, len(m))
	for l, as := range m {
		c := make(map[string]Mark, len(as))
		for a, mk := range as {
			c[a] = mk
		}
		out[l] = c
	}
	return out
}
