package testenv

import "sync"

// crew is a bounded set of workers that run until Stop: the loop behind
// Storm and Load.
type crew struct {
	stop chan struct{}
	wg   sync.WaitGroup
}

// start runs workers, each calling fn (with its number) until Stop, at
// most n times.
func (c *crew) start(workers, n int, fn func(worker int)) {
	c.stop = make(chan struct{})
	for w := range workers {
		c.wg.Go(func() {
			for range n {
				select {
				case <-c.stop:
					return
				default:
				}
				fn(w)
			}
		})
	}
}

// Stop ends the work and waits for the workers. It may be called twice.
func (c *crew) Stop() {
	select {
	case <-c.stop:
	default:
		close(c.stop)
	}
	c.wg.Wait()
}
