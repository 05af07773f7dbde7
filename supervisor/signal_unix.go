//go:build !windows

package supervisor

import (
	"os"
	"syscall"
)

// ReopenSignal asks for the access log's file to be reopened (logrotate's
// postrotate sends it).
const ReopenSignal = syscall.SIGUSR1

// Signals are the signals a rota process hands to Run.
func Signals() []os.Signal {
	return []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, ReopenSignal}
}
