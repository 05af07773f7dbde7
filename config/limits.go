package config

import (
	"fmt"
	"reflect"
	"time"

	"github.com/rota-proxy/rota/proxy"
)

// Bounds on values that validate as numbers but would break every
// connection: a deadline is the clock plus a duration, and the count of
// tries is 1 + retries, so values near the types' limits overflow.
const (
	// MaxDuration bounds every duration and grace in the file.
	MaxDuration = 10 * 365 * 24 * time.Hour
	// MaxRetries bounds retries: each is one more target dialled for a
	// client; the picker never offers more than the targets it has.
	MaxRetries = 100
)

// durations checks every time.Duration and Grace under v (a config struct,
// or a pointer, slice or field in one) at path against MaxDuration. It is
// driven by the yaml tags, as the decoder is, so a new duration key is
// bounded without a line here.
func (ck *checker) durations(path string, v reflect.Value) {
	switch v.Kind() {
	case reflect.Pointer:
		if !v.IsNil() {
			ck.durations(path, v.Elem())
		}
	case reflect.Struct:
		t := v.Type()
		for i := range t.NumField() {
			f := t.Field(i)
			switch {
			case isInline(f):
				ck.durations(path, v.Field(i))
			case yamlKey(f) != "" && f.IsExported():
				ck.durations(joinPath(path, yamlKey(f)), v.Field(i))
			}
		}
	case reflect.Slice:
		for i := range v.Len() {
			ck.durations(fmt.Sprintf("%s[%d]", path, i), v.Index(i))
		}
	case reflect.Int64:
		if t := v.Type(); (t == reflect.TypeFor[time.Duration]() || t == reflect.TypeFor[proxy.Grace]()) && time.Duration(v.Int()) > MaxDuration {
			ck.add(path, "must be at most %v (ten years); got %v", MaxDuration, time.Duration(v.Int()))
		}
	}
}
