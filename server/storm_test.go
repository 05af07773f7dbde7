package server_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/testenv"
	"github.com/rota-proxy/rota/server"
)

// A reload that removes a listener while clients storm it drains that
// listener within its drain_timeout plus a second, every time, and leaves
// the other listener serving.
func TestReloadRemovingBusyListenerEnds(t *testing.T) {
	b1 := startBackend(t, "b1")
	const drain = 500 * time.Millisecond
	for trial := range 20 {
		keep := fastListener("keep", b1.Addr)
		busy := fastListener("busy", b1.Addr)
		busy.DrainTimeout = drain
		if trial%2 == 1 {
			busy.Static = config.Statics("127.0.0.1:1") // nothing to reach
		}
		cfg := config.Default()
		cfg.Admin.Listen = ""
		cfg.Listeners = []config.Listener{keep, busy}
		srv, err := server.Start(context.Background(), cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		busyAddr := proxyAddr(t, srv, "busy")
		storm := testenv.StartStorm(busyAddr, 8, []byte("hello\n"))
		testenv.Eventually(t, "the storm under way", 10*time.Second, func() bool { return storm.Attempts() > 300 })

		next := config.Default()
		next.Admin.Listen = ""
		next.Listeners = []config.Listener{keep}
		began := time.Now()
		if err := srv.Reload(context.Background(), next); err != nil {
			t.Fatal(err)
		}
		// Shutdown waits for the removed listener's drain too.
		err = shutdownBy(srv, proxyAddr(t, srv, "keep"), began.Add(drain+time.Second))
		storm.Stop()
		if took := time.Since(began); err != nil || took > drain+time.Second {
			t.Errorf("trial %d: the removed listener drained after %v (%v), want within %v + 1s", trial, took, err, drain)
		}
		if t.Failed() {
			return
		}
	}
}

// shutdownBy asks the listener at keep once (the server still serves
// it), then shuts srv down, and returns Shutdown's error, or
// errNotEnded when it had not ended by deadline (after waiting for it to
// end: nothing outlives a trial).
func shutdownBy(srv *server.Server, keep string, deadline time.Time) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	shut := make(chan error, 1)
	go func() {
		if _, err := request(keep); err != nil {
			shut <- err
			return
		}
		shut <- srv.Shutdown(ctx)
	}()
	select {
	case err := <-shut:
		return err
	case <-time.After(time.Until(deadline)):
		<-shut
		return errNotEnded
	}
}

var errNotEnded = errors.New("not ended by the deadline")
