// Package bench holds rota's benchmark programs (run: rota beside HAProxy
// and nginx; convergence: how fast registry changes are routed). It is a
// module of its own so that what only the reports need (PNG charts) is not
// a dependency of rota's: `make bench` builds it.
package bench
