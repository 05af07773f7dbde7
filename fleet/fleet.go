// Package fleet holds the marks every rota of a fleet applies alike: drain
// marks and weight overrides of a listener's targets, kept in a registry
// the rotas already read (registries.state: etcd or consul) under
// rota/state/<listener>/<addr>, as JSON {"drain": true, "weight": 3}.
//
// A Store writes one mark and watches them all. Watch owns its goroutine's
// work until its context ends; apply receives a new Marks every time (never
// modified after), so a receiver may keep it. A registry outage keeps the
// marks last applied: Watch reports the error and tries again, and never
// applies an empty set it did not read.
package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"
)

// Mark is one target's fleet-wide state. The zero Mark is no mark.
type Mark struct {
	Drain  bool `json:"drain,omitempty"`
	Weight int  `json:"weight,omitempty"` // overrides the registry's weight; 0: none
}

// Marks is every mark in a store: listener -> target address -> mark.
type Marks map[string]map[string]Mark

// Store keeps marks in a registry.
type Store interface {
	// Get reads addr's mark on listener (the zero Mark for none).
	Get(ctx context.Context, listener, addr string) (Mark, error)
	// Set writes addr's mark on listener; the zero Mark deletes it.
	Set(ctx context.Context, listener, addr string, m Mark) error
	// Watch applies every mark at once and after each change, until ctx
	// ends; failures go to failed, the marks last applied stay.
	Watch(ctx context.Context, apply func(Marks), failed func(error))
	// Kind names the registry: "etcd" or "consul".
	Kind() string
}

// The waits of a store's watch between failed attempts.
const (
	retryInitial = 100 * time.Millisecond
	retryMax     = 5 * time.Second
)

// Dir is the key prefix of every mark under a registry's root.
const Dir = "rota/state/"

// Key is the key of addr's mark on listener, under root ("" or ending in
// "/").
func Key(root, listener, addr string) string { return root + Dir + listener + "/" + addr }

// parseKey splits a key under root into listener and address; false for a
// key that is not a mark's.
func parseKey(root, key string) (listener, addr string, ok bool) {
	rest, ok := strings.CutPrefix(key, root+Dir)
	if !ok {
		return "", "", false
	}
	listener, addr, ok = strings.Cut(rest, "/")
	return listener, addr, ok && listener != "" && addr != ""
}

// decode reads a mark's value.
func decode(v []byte) (Mark, error) {
	var m Mark
	if err := json.Unmarshal(v, &m); err != nil {
		return Mark{}, fmt.Errorf("a mark must be JSON like {\"drain\": true, \"weight\": 3}: %w", err)
	}
	if m.Weight < 0 {
		return Mark{}, fmt.Errorf("weight %d: must not be negative", m.Weight)
	}
	return m, nil
}

// encode is a mark's value.
func encode(m Mark) []byte {
	b, _ := json.Marshal(m)
	return b
}

// Root is the root of the etcd keys beside an etcd registry prefix: the
// prefix up to and including its last "/" before the final element
// ("services/" -> "", "/prod/services/" -> "/prod/").
func Root(prefix string) string {
	p := strings.TrimSuffix(prefix, "/")
	if i := strings.LastIndex(p, "/"); i >= 0 {
		return p[:i+1]
	}
	return ""
}

// put sets the mark of a key under root to value v; a key that is not a
// mark's is ignored, a malformed value logged (when log is set) and
// skipped.
func (m Marks) put(root, key string, v []byte, log *zap.Logger) {
	l, a, ok := parseKey(root, key)
	if !ok {
		return
	}
	mk, err := decode(v)
	if err != nil {
		if log != nil {
			log.Warn("fleet mark skipped", zap.String("key", key), zap.Error(err))
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
