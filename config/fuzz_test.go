package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParse feeds arbitrary bytes to the loader: it must never panic or
// hang, every failure must be a positioned *Error naming the file, and every
// success must pass Validate unchanged.
func FuzzParse(f *testing.F) {
	for _, dir := range []string{"testdata/valid", "testdata/invalid"} {
		files, _ := filepath.Glob(filepath.Join(dir, "*.yaml"))
		for _, file := range files {
			if data, err := os.ReadFile(file); err == nil {
				f.Add(data)
			}
		}
	}
	f.Add([]byte("x-a: &a [*a, *a]\nlisteners: *a\n"))
	f.Add([]byte("listeners:\n  - {listen: ':1', discovery: static, static: [a:1], health: {interval: 99999999999999999999s}}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(data, "f.yaml")
		if err != nil {
			msg := err.Error()
			for _, line := range strings.Split(msg, "\n") {
				if !strings.HasPrefix(line, "f.yaml") {
					t.Fatalf("error line does not name the file: %q", line)
				}
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("error is not a *config.Error: %T %v", err, err)
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("Parse accepted a config Validate rejects: %v\n%s", err, data)
		}
	})
}
