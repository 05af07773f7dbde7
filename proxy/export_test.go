package proxy

// RelayWithGoroutines makes p relay every connection with goroutines, the
// path taken off Linux, so tests cover both drivers.
func RelayWithGoroutines(p *Proxy) { p.goroutinesOnly = true }

// PanicOn makes relaying panic when a client sends a chunk for which f is
// true.
func PanicOn(s *Settings, f func([]byte) bool) { s.panicOn = f }
