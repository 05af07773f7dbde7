// Package testenv starts real registry servers for tests of other packages:
// an embedded etcd (etcd.go) and a Consul agent (consul.go). Its files are
// ordinary (non-_test) files so any package's tests can import them; nothing
// outside tests should. Every server is tied to the testing.TB that started
// it and is stopped by t.Cleanup, and everything listens on 127.0.0.1 only.
package testenv
