package health

import "time"

// SetObserver installs a probe observer; call before the first Update.
func (c *Checker) SetObserver(f func(addr string, err error, next time.Duration)) { c.observe = f }
