package handover

import "os"

// activated: no socket activation on Windows.
func activated() []*os.File { return nil }
