// Package testenv starts real registry servers for tests of other packages:
// an embedded etcd (etcd.go) and a Consul agent (consul.go). Its files are
// ordinary (non-_test) files so any package's tests can import them; nothing
// outside tests should. Every server is tied to the testing.TB that started
// it and is stopped by t.Cleanup, and everything listens on 127.0.0.1 only.
package testenv

// T is what the helpers need of their caller: a test's testing.TB has it,
// and so can a benchmark command that runs real registries (the cluster
// helpers are used by bench/convergence too).
type T interface {
	Helper()
	Fatalf(format string, args ...any)
	TempDir() string
	Cleanup(func())
}
