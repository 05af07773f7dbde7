package config

import (
	"bytes"
	"encoding"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"go.yaml.in/yaml/v3"

	"github.com/rota-proxy/rota/accesslog"
	"github.com/rota-proxy/rota/discovery/dns"
	"github.com/rota-proxy/rota/health"
)

// The decoder walks a yaml.Node tree itself instead of calling
// yaml.Unmarshal into the structs: only the node tree knows the line and
// column of every key and value, and only a walk of our own can report
// unknown keys, duplicate keys and wrong types with the full field path, all
// of them in one pass instead of stopping at the first.
//
// The walk is driven by the `yaml` tags of the config structs, so the tags
// are the single list of valid keys.

// maxSteps bounds the nodes visited while following aliases and merge keys.
// Aliases make a small file describe an exponentially large document
// ("billion laughs"); a real config visits a few thousand nodes at most.
const maxSteps = 1 << 20

// maxDocuments bounds the (empty) documents skipped after the first.
const maxDocuments = 16

type position struct{ line, col int }

func posOf(n *yaml.Node) position { return position{n.Line, n.Column} }

type decoder struct {
	file    string
	errs    []*Error
	pos     map[string]position // field path → where it is written in the file
	bad     []string            // field paths whose value was rejected
	merging map[*yaml.Node]bool // mappings whose merge keys are being expanded
	steps   int
	tooBig  bool
}

func newDecoder(file string) *decoder {
	return &decoder{
		file:    file,
		pos:     make(map[string]position),
		merging: make(map[*yaml.Node]bool),
	}
}

// parseDocument parses data into its root node; nil (and no error) when the
// file holds no document or only null. A second document with content is an
// error: yaml.Unmarshal would silently ignore it, and a file that was
// concatenated by mistake should not half-apply.
func parseDocument(data []byte, file string) (root *yaml.Node, err error) {
	defer func() {
		// yaml.v3 reports its own errors by panicking internally and
		// recovering; anything else escaping it is a bug in the library.
		// A config loader must not take the process down with it (SIGHUP
		// reload runs in a live proxy), so it becomes an error instead.
		if r := recover(); r != nil {
			root, err = nil, &Error{File: file, Msg: fmt.Sprintf("invalid YAML: parser failed: %v", r)}
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		return nil, syntaxError(file, err)
	}
	for range maxDocuments {
		var extra yaml.Node
		err := dec.Decode(&extra)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, syntaxError(file, err)
		}
		if body := documentBody(&extra); body != nil {
			return nil, &Error{File: file, Line: body.Line, Column: body.Column,
				Msg: "only one YAML document is allowed (found another after ---)"}
		}
	}
	return documentBody(&doc), nil
}

// documentBody returns the content of a document node, nil when it is empty
// or null.
func documentBody(doc *yaml.Node) *yaml.Node {
	if doc.Kind != yaml.DocumentNode || len(doc.Content) == 0 {
		return nil
	}
	n := doc.Content[0]
	if isNull(n) {
		return nil
	}
	return n
}

// syntaxError turns yaml.v3's "yaml: line 3: could not find expected ':'"
// into an *Error that names the file like every other config error.
func syntaxError(file string, err error) *Error {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	e := &Error{File: file}
	if rest, ok := strings.CutPrefix(msg, "line "); ok {
		if num, tail, ok := strings.Cut(rest, ": "); ok {
			if line, err := strconv.Atoi(num); err == nil {
				e.Line = line
				msg = tail
			}
		}
	}
	e.Msg = "invalid YAML: " + msg
	return e
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

// fail records that the value of field at pos was rejected.
func (d *decoder) fail(field string, at position, format string, args ...any) {
	d.errs = append(d.errs, &Error{
		File: d.file, Line: at.line, Column: at.col, Field: field,
		Msg: fmt.Sprintf(format, args...),
	})
	d.bad = append(d.bad, field)
}

// step counts one node visit and reports whether the budget allows more.
func (d *decoder) step() bool {
	if d.tooBig {
		return false
	}
	d.steps++
	if d.steps > maxSteps {
		d.tooBig = true
		d.errs = append(d.errs, &Error{File: d.file,
			Msg: "document too complex: aliases and merge keys expand to too many nodes"})
		return false
	}
	return true
}

// resolve follows aliases to the node they name; nil when over budget.
func (d *decoder) resolve(n *yaml.Node) *yaml.Node {
	for n != nil {
		if !d.step() {
			return nil
		}
		if n.Kind != yaml.AliasNode {
			return n
		}
		n = n.Alias
	}
	return nil
}

// decode decodes the root mapping into cfg.
func (d *decoder) decode(root *yaml.Node, path string, cfg *Config) {
	d.value(root, posOf(root), path, reflect.ValueOf(cfg).Elem())
}

// value decodes n into v. at is where the field is written: the key for a
// block mapping or list (its contents start on later lines), the item for a
// list item; scalars use their own position.
func (d *decoder) value(orig *yaml.Node, at position, path string, v reflect.Value) {
	n := d.resolve(orig)
	if n == nil {
		return
	}
	if n.Kind == yaml.ScalarNode || orig.Line == at.line {
		// Point at the value when it is on the key's line (a scalar or
		// a flow collection such as [a, b]); a block collection starts
		// on the next line, so its key is the better place. The alias,
		// not the anchor, is where this field is written.
		at = posOf(orig)
	}
	d.pos[path] = at

	if v.Kind() == reflect.Pointer {
		// A present section is enabled, even when it is null or fails
		// to decode: leaving it nil would add "registry not configured"
		// errors on top of the real one.
		if v.IsNil() {
			v.Set(defaultFor(v.Type().Elem()).Addr())
		}
		v = v.Elem()
	}
	if isNull(n) {
		if v.Kind() != reflect.Struct {
			v.SetZero()
		}
		return
	}

	switch {
	case v.Type() == reflect.TypeFor[netip.Prefix]():
		if n.Kind != yaml.ScalarNode {
			d.fail(path, at, "expected a CIDR or an IP address, got %s", describe(n))
			return
		}
		p, err := parsePrefix(n.Value)
		if err != nil {
			d.fail(path, at, "%v", err)
			return
		}
		v.Set(reflect.ValueOf(p))
	case v.Addr().Type().Implements(reflect.TypeFor[encoding.TextUnmarshaler]()):
		// A typed value its package parses (proxy_protocol, a grace).
		var err error
		if n.Kind == yaml.ScalarNode {
			err = v.Addr().Interface().(encoding.TextUnmarshaler).UnmarshalText([]byte(n.Value))
		}
		if n.Kind != yaml.ScalarNode || err != nil {
			what := "a scalar"
			if err != nil {
				what = err.Error()
			}
			d.fail(path, at, "%s, got %s", what, describe(n))
		}
	case v.Type() == reflect.TypeFor[time.Duration]():
		if n.Kind != yaml.ScalarNode {
			d.fail(path, at, "expected a duration like 2s or 500ms, got %s", describe(n))
			return
		}
		dur, err := time.ParseDuration(n.Value)
		if err != nil {
			d.fail(path, at, "expected a duration like 2s or 500ms, got %s", describe(n))
			return
		}
		v.SetInt(int64(dur))
	case v.Kind() == reflect.String:
		if n.Kind != yaml.ScalarNode {
			d.fail(path, at, "expected a string, got %s", describe(n))
			return
		}
		v.SetString(n.Value)
	case v.Kind() == reflect.Int:
		var i int
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" && !looksInteger(n) {
			d.fail(path, at, "expected an integer, got %s", describe(n))
			return
		}
		if err := n.Decode(&i); err != nil {
			d.fail(path, at, "integer %s is out of range", n.Value)
			return
		}
		v.SetInt(int64(i))
	case v.Kind() == reflect.Float64:
		var f float64
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!float" && n.ShortTag() != "!!int" || n.Decode(&f) != nil {
			d.fail(path, at, "expected a number, got %s", describe(n))
			return
		}
		v.SetFloat(f)
	case v.Kind() == reflect.Bool:
		var b bool
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!bool" || n.Decode(&b) != nil {
			d.fail(path, at, "expected true or false, got %s", describe(n))
			return
		}
		v.SetBool(b)
	case v.Type() == reflect.TypeFor[StaticTarget]() && n.Kind == yaml.ScalarNode:
		// The short form of a static entry: just the address.
		v.Set(reflect.ValueOf(StaticTarget{Addr: n.Value}))
	case v.Type() == reflect.TypeFor[StaticTarget]() && n.Kind == yaml.MappingNode:
		d.object(n, at, path, v)
		for i := 0; i+1 < len(n.Content); i += 2 {
			// 0 is how a static weight would mean "absent": written out,
			// it is someone trying to stop traffic, which is a drain.
			if k, w := n.Content[i], n.Content[i+1]; k.Value == "weight" && w.Value == "0" {
				d.fail(path+".weight", posOf(w), "must be 1-1000; got 0 (to stop new connections to a target, drain it: POST /api/v1/listeners/{listener}/targets/{addr}/drain)")
			}
		}
	case v.Kind() == reflect.Slice:
		d.list(n, at, path, v)
	case v.Kind() == reflect.Struct:
		d.object(n, at, path, v)
	default:
		// Unreachable unless a field of a new type is added to the
		// config structs without teaching the decoder about it.
		panic(fmt.Sprintf("config: no decoder for %s (%s)", path, v.Type()))
	}
}

// list decodes a YAML sequence into a slice. Items that fail to decode keep
// their place (as defaults) so the indices of later items in error messages
// and in the decoded config agree with the file.
func (d *decoder) list(n *yaml.Node, at position, path string, v reflect.Value) {
	if n.Kind != yaml.SequenceNode {
		what := "a list"
		switch {
		case v.Type().Elem().Kind() == reflect.String:
			what = "a list of strings, like [a, b]"
		case v.Type().Elem() == reflect.TypeFor[StaticTarget]():
			what = "a list of addresses, like [10.0.0.7:5432, {addr: 10.0.0.8:5432, weight: 3}]"
		}
		d.fail(path, at, "expected %s, got %s", what, describe(n))
		return
	}
	if len(n.Content) == 0 {
		v.SetZero() // "tags: []" means the same as no tags: nil
		return
	}
	out := reflect.MakeSlice(v.Type(), 0, len(n.Content))
	for i, item := range n.Content {
		elem := defaultFor(v.Type().Elem())
		d.value(item, posOf(item), fmt.Sprintf("%s[%d]", path, i), elem)
		out = reflect.Append(out, elem)
		if d.tooBig {
			return
		}
	}
	v.Set(out)
}

// object decodes a YAML mapping into a struct, field by `yaml` tag.
func (d *decoder) object(n *yaml.Node, at position, path string, v reflect.Value) {
	if n.Kind != yaml.MappingNode {
		d.fail(path, at, "expected a mapping (key: value lines), got %s", describe(n))
		return
	}
	keys := fieldKeys(v.Type())
	for _, p := range d.pairs(n, path) {
		if path == "" && strings.HasPrefix(p.name, "x-") {
			// Extension keys, as in docker-compose: a home for anchors
			// ("x-health: &health {...}") that rota itself ignores.
			continue
		}
		field := joinPath(path, p.name)
		i := fieldIndex(v.Type(), p.name)
		if i == nil {
			d.errs = append(d.errs, &Error{
				File: d.file, Line: p.key.Line, Column: p.key.Column, Field: field,
				Msg: "unknown key" + suggest(p.name, keys),
			})
			continue
		}
		d.value(p.val, posOf(p.key), field, v.FieldByIndex(i))
		if d.tooBig {
			return
		}
	}
}

type pair struct {
	key, val *yaml.Node
	name     string
}

// pairs returns the key/value pairs of mapping m with merge keys ("<<")
// expanded: keys written in m win over merged ones, and earlier merge
// sources win over later ones, as the YAML merge spec says. Duplicate keys
// written in m are errors (yaml.v3 only checks them when decoding into Go
// values, which this package does not do).
func (d *decoder) pairs(m *yaml.Node, path string) []pair {
	if d.merging[m] {
		d.fail(path, posOf(m), "merge key (<<) includes the mapping that contains it")
		return nil
	}
	d.merging[m] = true
	defer delete(d.merging, m)

	var own, merged []pair
	seen := make(map[string]*yaml.Node)
	for i := 0; i+1 < len(m.Content); i += 2 {
		if !d.step() {
			return nil
		}
		k, v := m.Content[i], m.Content[i+1]
		if k.Kind == yaml.ScalarNode && k.Value == "<<" && k.ShortTag() == "!!merge" {
			merged = append(merged, d.mergeSources(v, path)...)
			continue
		}
		rk := d.resolve(k)
		if rk == nil {
			return nil
		}
		if rk.Kind != yaml.ScalarNode || isNull(rk) {
			d.errs = append(d.errs, &Error{File: d.file, Line: k.Line, Column: k.Column,
				Field: path, Msg: fmt.Sprintf("keys must be plain names, got %s", describe(rk))})
			continue
		}
		if first, dup := seen[rk.Value]; dup {
			d.errs = append(d.errs, &Error{File: d.file, Line: k.Line, Column: k.Column,
				Field: joinPath(path, rk.Value),
				Msg:   fmt.Sprintf("duplicate key (first set at line %d)", first.Line)})
			continue
		}
		seen[rk.Value] = k
		own = append(own, pair{key: k, val: v, name: rk.Value})
	}
	for _, p := range merged {
		if _, dup := seen[p.name]; !dup {
			seen[p.name] = p.key
			own = append(own, p)
		}
	}
	return own
}

// mergeSources returns the pairs a merge key's value contributes: a mapping,
// or a list of mappings (usually aliases).
func (d *decoder) mergeSources(v *yaml.Node, path string) []pair {
	rv := d.resolve(v)
	if rv == nil {
		return nil
	}
	switch rv.Kind {
	case yaml.MappingNode:
		return d.pairs(rv, path)
	case yaml.SequenceNode:
		var out []pair
		for _, item := range rv.Content {
			ri := d.resolve(item)
			if ri == nil {
				return nil
			}
			if ri.Kind != yaml.MappingNode {
				d.fail(path, posOf(item), "merge key (<<) needs a mapping or a list of mappings, got %s", describe(ri))
				continue
			}
			out = append(out, d.pairs(ri, path)...)
		}
		return out
	}
	d.fail(path, posOf(v), "merge key (<<) needs a mapping or a list of mappings, got %s", describe(rv))
	return nil
}

// looksInteger reports whether n is an unquoted run of digits that YAML
// resolved to a float only because it overflows int64.
func looksInteger(n *yaml.Node) bool {
	v := strings.TrimLeft(n.Value, "+-")
	return n.ShortTag() == "!!float" && v != "" && strings.Trim(v, "0123456789") == ""
}

// defaultFor returns an addressable value of type t holding its defaults, so
// that keys absent from the file keep them.
func defaultFor(t reflect.Type) reflect.Value {
	v := reflect.New(t).Elem()
	switch t {
	case reflect.TypeFor[Listener]():
		v.Set(reflect.ValueOf(DefaultListener()))
	case reflect.TypeFor[Route]():
		v.Set(reflect.ValueOf(Route{Pool: DefaultPool()}))
	case reflect.TypeFor[Etcd]():
		v.Set(reflect.ValueOf(DefaultEtcd()))
	case reflect.TypeFor[Embedded]():
		v.Set(reflect.ValueOf(DefaultEmbedded()))
	case reflect.TypeFor[dns.Config]():
		v.Set(reflect.ValueOf(dns.DefaultConfig()))
	case reflect.TypeFor[accesslog.Config]():
		v.Set(reflect.ValueOf(accesslog.DefaultConfig()))
	}
	return v
}

// fieldKeys lists the YAML keys of struct type t in declaration order,
// those of inline structs (`yaml:",inline"`) in their place.
func fieldKeys(t reflect.Type) []string {
	keys := make([]string, 0, t.NumField())
	for i := range t.NumField() {
		f := t.Field(i)
		if isInline(f) {
			keys = append(keys, fieldKeys(f.Type)...)
		} else if k := yamlKey(f); k != "" {
			keys = append(keys, k)
		}
	}
	return keys
}

// fieldIndex returns the index path (for reflect.Value.FieldByIndex) of
// the field of t with YAML key key, looking into inline structs; nil when
// there is none.
func fieldIndex(t reflect.Type, key string) []int {
	if key == "" {
		return nil // untagged and `yaml:"-"` fields have no key
	}
	for i := range t.NumField() {
		f := t.Field(i)
		if isInline(f) {
			if sub := fieldIndex(f.Type, key); sub != nil {
				return append([]int{i}, sub...)
			}
		} else if yamlKey(f) == key {
			return []int{i}
		}
	}
	return nil
}

// isInline reports whether f is a struct whose keys are written at its
// parent's level.
func isInline(f reflect.StructField) bool {
	_, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
	return opts == "inline" && f.Type.Kind() == reflect.Struct
}

func yamlKey(f reflect.StructField) string {
	name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
	if name == "-" {
		return ""
	}
	return name
}

func joinPath(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// parentPath strips the last ".key" or "[i]" of a field path.
func parentPath(path string) string {
	i := strings.LastIndexAny(path, ".[")
	if i < 0 {
		return ""
	}
	return path[:i]
}

// position returns where field (or, when it is not in the file, its nearest
// enclosing field) is written, so that a missing required key points at
// its listener.
func (d *decoder) position(field string) (line, col int) {
	for p := field; ; p = parentPath(p) {
		if at, ok := d.pos[p]; ok {
			return at.line, at.col
		}
		if p == "" {
			return 0, 0
		}
	}
}

// covered reports whether field is, or lies inside, a value that failed to
// decode.
func (d *decoder) covered(field string) bool {
	for _, b := range d.bad {
		if b == "" || field == b || strings.HasPrefix(field, b+".") || strings.HasPrefix(field, b+"[") {
			return true
		}
	}
	return false
}

// applyDefaults fills the defaults that depend on other fields or on whether
// a key was written at all; see the package doc.
func (d *decoder) applyDefaults(cfg *Config) {
	taken := make(map[string]bool)
	for _, l := range cfg.Listeners {
		if l.Name != "" {
			taken[l.Name] = true
		}
	}
	for i := range cfg.Listeners {
		l := &cfg.Listeners[i]
		if l.Name == "" {
			l.Name = defaultName(taken, l.Service, "listener", i)
		}
		d.backoffFollowsInterval(fmt.Sprintf("listeners[%d].health", i), &l.Health)
		d.routeDefaults(i, l)
	}
	if e := cfg.Registries.Etcd; e != nil && e.Embedded != nil && len(e.Endpoints) == 0 {
		e.Endpoints = e.ClientEndpoints()
	}
	// consul/api reads CONSUL_HTTP_ADDR (and the rest of CONSUL_*) itself:
	// with it set, a listener needs no registries.consul section.
	if cfg.Registries.Consul == nil && os.Getenv("CONSUL_HTTP_ADDR") != "" {
		for _, l := range cfg.Listeners {
			if l.Discovery == "consul" {
				cfg.Registries.Consul = &Consul{}
				break
			}
		}
	}
}

// routeDefaults names a listener's routes that have no name (after their
// service, else "route-N") and gives each route the listener's health,
// balance, slow_start, max_conns_per_target, queue and panic where the route does not set its own, so
// that settings common to every route are written once.
func (d *decoder) routeDefaults(i int, l *Listener) {
	lp := fmt.Sprintf("listeners[%d]", i)
	taken := map[string]bool{}
	for _, r := range l.Routes {
		if r.Name != "" {
			taken[r.Name] = true
		}
	}
	for j := range l.Routes {
		r := &l.Routes[j]
		rp := fmt.Sprintf("%s.routes[%d]", lp, j)
		if r.Name == "" {
			r.Name = defaultName(taken, r.Service, "route", j)
		}
		inherit := func(key string, set func()) {
			_, onListener := d.pos[lp+"."+key]
			_, onRoute := d.pos[rp+"."+key]
			if onListener && !onRoute {
				set()
			}
		}
		inherit("health", func() { r.Health = l.Health })
		inherit("balance", func() { r.Balance = l.Balance })
		inherit("hash_key", func() { r.HashKey = l.HashKey })
		inherit("hash_balance_factor", func() { r.HashBalanceFactor = l.HashBalanceFactor })
		inherit("slow_start", func() { r.SlowStart = l.SlowStart })
		inherit("max_conns_per_target", func() { r.MaxConnsPerTarget = l.MaxConnsPerTarget })
		inherit("queue", func() { r.Queue = l.Queue })
		inherit("panic", func() { r.Panic = l.Panic })
		d.backoffFollowsInterval(rp+".health", &r.Health)
	}
}

// defaultName names item i of a list after its service, else "kind-i",
// with "-N" appended while the name is taken; it takes the name.
func defaultName(taken map[string]bool, service, kind string, i int) string {
	// A Kubernetes namespace/name: the name (a listener's name is in
	// the admin API's paths and the fleet's keys).
	_, base, _ := strings.Cut(service, "/")
	if base == "" {
		base = service
	}
	if base == "" {
		base = fmt.Sprintf("%s-%d", kind, i)
	}
	name := base
	for n := i; taken[name]; n++ {
		name = fmt.Sprintf("%s-%d", base, n)
	}
	taken[name] = true
	return name
}

// backoffFollowsInterval raises a health section's backoff_max to its
// interval when the interval is above it and backoff_max is not written
// (see the package doc).
func (d *decoder) backoffFollowsInterval(path string, h *health.Config) {
	if _, set := d.pos[path+".backoff_max"]; !set && h.Interval > h.BackoffMax {
		h.BackoffMax = h.Interval
	}
}

// describe names a node's kind and value for "expected X, got Y" messages.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if isNull(n) {
			return "nothing (null)"
		}
		v := n.Value
		if utf8.RuneCountInString(v) > 60 {
			v = string([]rune(v)[:57]) + "..."
		}
		if n.ShortTag() == "!!str" {
			return "the string " + strconv.Quote(v)
		}
		return strconv.Quote(v)
	}
	return "an unexpected YAML node"
}

// suggest returns " (did you mean "x"?)" for the known key closest to an
// unknown one, or the list of valid keys when none is close.
func suggest(name string, keys []string) string {
	norm := strings.NewReplacer("-", "_", " ", "_").Replace(strings.ToLower(name))
	best, bestDist := "", 3
	for _, k := range keys {
		if k == norm {
			return fmt.Sprintf(" (did you mean %q?)", k)
		}
		if dist := levenshtein(norm, k); dist < bestDist && dist < len(k) {
			best, bestDist = k, dist
		}
	}
	if best != "" {
		return fmt.Sprintf(" (did you mean %q?)", best)
	}
	return "; valid keys: " + strings.Join(keys, ", ")
}

// levenshtein is the edit distance between a and b, in bytes; keys are ASCII.
func levenshtein(a, b string) int {
	if len(a) > 64 {
		return len(a) // not a typo of a short key; skip the quadratic work
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// splitHostPort wraps net.SplitHostPort and returns the reason of an
// *net.AddrError ("missing port in address") rather than its full message,
// which repeats the address.
func splitHostPort(s string) (host, port string, err error) {
	host, port, err = net.SplitHostPort(s)
	var ae *net.AddrError
	if errors.As(err, &ae) {
		err = errors.New(ae.Err)
	}
	return host, port, err
}
