package supervisor

import (
	"os"
	"syscall"
)

// ReopenSignal: Windows has none (no SIGUSR1); the access log is not
// reopened there.
const ReopenSignal = syscall.Signal(-1)

// UpgradeSignal: none on Windows (no SIGUSR2, no socket inheritance).
const UpgradeSignal = syscall.Signal(-2)

// Signals are the signals a rota process hands to Run.
func Signals() []os.Signal { return []os.Signal{syscall.SIGINT, syscall.SIGTERM} }
