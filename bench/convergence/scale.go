package main

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/rota-proxy/rota/discovery/etcd"
	"github.com/rota-proxy/rota/health"
)

// runScale measures discovery at scale against the embedded etcd: n
// instances registered at once (the time from the last write until every
// one is routed), then, with the n instances stable, rate changes a second
// for dur (alternately removing and re-adding instances): how far behind
// the registry the picker is when the changes stop, and the CPU the
// process spent meanwhile. Instances are never dialled (check: none), so
// that discovery, the pool and the picker are what is measured.
func runScale(ctx context.Context, o options, out io.Writer) error {
	log := newLogger(o.verbose)
	defer func() { _ = log.Sync() }()
	reg, err := startEtcd(ctx, log)
	if err != nil {
		return err
	}
	defer reg.Close()
	rt, err := startRouter(reg.Watcher(), health.CheckNone, log)
	if err != nil {
		return err
	}
	defer rt.stop(log)
	n := o.scale
	addr := func(i int) string { return fmt.Sprintf("10.%d.%d.%d:80", i>>16&255, i>>8&255, i&255) }
	put := func(i int) clientv3.Op {
		key, _ := etcd.InstanceKey(etcd.DefaultPrefix, service, addr(i))
		return clientv3.OpPut(key, fmt.Sprintf(`{"Op":0,"Addr":%q,"Metadata":null}`, addr(i)))
	}
	del := func(i int) clientv3.Op {
		key, _ := etcd.InstanceKey(etcd.DefaultPrefix, service, addr(i))
		return clientv3.OpDelete(key)
	}
	txn := func(ops ...clientv3.Op) error {
		tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		_, err := reg.client.Txn(tctx).Then(ops...).Commit()
		return err
	}
	waitLive := func(want int, limit time.Duration) (time.Duration, error) {
		start := time.Now()
		for rt.live() != want {
			if time.Since(start) > limit {
				return 0, fmt.Errorf("%d instances routed after %v, want %d", rt.live(), limit, want)
			}
			time.Sleep(time.Millisecond) // polling the picker of this process
		}
		return time.Since(start), nil
	}

	// A burst: n instances in transactions of 128, as fast as etcd takes them.
	burstStart := time.Now()
	var ops []clientv3.Op
	for i := range n {
		ops = append(ops, put(i))
		if len(ops) == 128 || i == n-1 {
			if err := txn(ops...); err != nil {
				return err
			}
			ops = ops[:0]
		}
	}
	writes := time.Since(burstStart)
	burst, err := waitLive(n, time.Minute)
	if err != nil {
		return err
	}

	// Churn: rate single-key changes a second for dur, written by 32
	// writers (one write waits for etcd's fsync), each owning the keys
	// whose index is its own modulo 32.
	const writers = 32
	cpu0 := cpuTime()
	churnStart := time.Now()
	jobs := make([]chan int, writers)
	removed := make([]map[int]bool, writers)
	errs := make(chan error, writers)
	var wg sync.WaitGroup
	for w := range writers {
		jobs[w] = make(chan int, 1024)
		removed[w] = map[int]bool{}
		wg.Go(func() {
			for i := range jobs[w] {
				op := del(i)
				if removed[w][i] {
					op = put(i)
				}
				if err := txn(op); err != nil {
					errs <- err
					return
				}
				removed[w][i] = !removed[w][i]
			}
		})
	}
	// Paced by the clock (a ticker drops ticks when the loop is late):
	// every millisecond, the changes due by then.
	changes := 0
	for elapsed := time.Duration(0); elapsed < o.dur; elapsed = time.Since(churnStart) {
		for due := int(elapsed.Seconds() * float64(o.rate)); changes < due; changes++ {
			i := rand.IntN(n)
			jobs[i%writers] <- i
		}
		time.Sleep(time.Millisecond)
	}
	for _, ch := range jobs {
		close(ch)
	}
	wg.Wait()
	select {
	case err := <-errs:
		return err
	default:
	}
	churnWall := time.Since(churnStart)
	want := n
	for _, m := range removed {
		for _, r := range m {
			if r {
				want--
			}
		}
	}
	lag, err := waitLive(want, time.Minute)
	if err != nil {
		return err
	}
	cpu := cpuTime() - cpu0
	fmt.Fprintf(out, "# rota discovery at scale, %s\n\n", time.Now().Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(out, "Registry: %s. Health check: none (the registry is trusted), so discovery, the pool and the picker are measured.\n\n", reg.Describe())
	fmt.Fprintf(out, "| measurement | result |\n|---|---:|\n")
	fmt.Fprintf(out, "| %d instances written at once (%d transactions) | %v of writes |\n", n, (n+127)/128, writes.Round(time.Millisecond))
	fmt.Fprintf(out, "| last write -> every instance routed | **%v** (goal < 1 s) |\n", burst.Round(time.Millisecond))
	fmt.Fprintf(out, "| churn: %d changes at %d/s over %v with %d instances | %d changes |\n", changes, o.rate, churnWall.Round(time.Millisecond), n, changes)
	fmt.Fprintf(out, "| last change -> routed as the registry says | **%v** behind (goal < 1 s) |\n", lag.Round(time.Millisecond))
	fmt.Fprintf(out, "| process CPU during the churn (etcd included) | **%.0f%% of one core** (goal < 100%%) |\n\n",
		100*cpu.Seconds()/(churnWall+lag).Seconds())
	return nil
}

// cpuTime is the user and system time this process has used.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
