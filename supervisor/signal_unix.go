//go:build !windows

package supervisor

import (
	"os"
	"syscall"
)

// ReopenSignal asks for the access log's file to be reopened (logrotate's
// postrotate sends it).
const ReopenSignal = syscall.SIGUSR1

// UpgradeSignal starts the binary at rota's path with the listening
// sockets; this process drains once it serves.
const UpgradeSignal = syscall.SIGUSR2

// Signals are the signals a rota process hands to Run.
func Signals() []os.Signal {
	return []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, ReopenSignal, UpgradeSignal}
}
