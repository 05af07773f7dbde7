// Package testenv holds what tests of several packages share: real servers
// and clients, on 127.0.0.1 only, each tied to the test that started it and
// stopped by t.Cleanup. Its files are ordinary (non-_test) files so any
// package's tests (and the bench programs) can import them; nothing else
// should.
//
//   - registries: an embedded etcd (etcd.go), an etcd cluster of real
//     member processes (etcdcluster.go), a Consul agent and a Consul
//     cluster (consul.go, consulcluster.go);
//   - backends and clients: a killable backend that answers its name
//     (backend.go, with Request), load that keeps score (load.go), a
//     connect storm (storm.go), both run by a bounded crew (crew.go);
//   - faults: a TCP proxy that freezes or cuts a link (tcpproxy.go), a
//     listener whose accept queue is full (stuck.go);
//   - TLS: a ClientHello as crypto/tls sends it (tls.go), a certificate
//     authority issuing real certificates (pki.go);
//   - waiting: Eventually and Poll (a condition with a deadline, never a
//     sleep), FreeAddr (wait.go).
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
