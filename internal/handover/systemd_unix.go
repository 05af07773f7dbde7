//go:build !windows

package handover

import (
	"os"

	"github.com/coreos/go-systemd/v22/activation"
)

// activated are the sockets systemd passed (LISTEN_FDS for this process),
// each named by its FileDescriptorName=; the variables are cleared.
func activated() []*os.File { return activation.Files(true) }
