//go:build !linux

package health

import (
	"go.uber.org/zap"
)

// tcpProber is Linux's; elsewhere every probe takes the goroutine path.
type tcpProber struct{}

func newTCPProber(*zap.Logger) (*tcpProber, error) { return nil, nil }

func (*tcpProber) start([]tcpJob) bool { return false }
func (*tcpProber) close()              {}

// probeSocket is Linux's: no job ever carries one here.
type probeSocket struct{}

func (*probeSocket) closeKept() {}
