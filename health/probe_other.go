//go:build !linux

package health

import (
	"net/netip"
	"time"

	"go.uber.org/zap"
)

// tcpProber is Linux's; elsewhere every probe takes the goroutine path.
type tcpProber struct{}

type tcpJob struct {
	addr    netip.AddrPort
	timeout time.Duration
	done    func(error)
}

func newTCPProber(*zap.Logger) (*tcpProber, error) { return nil, nil }

func (*tcpProber) start([]tcpJob) bool { return false }
func (*tcpProber) close()              {}
