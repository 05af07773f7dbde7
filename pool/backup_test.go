package pool_test

import (
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rota-proxy/rota/discovery"
)

// Backups take new connections only while no primary is live (before
// that, a cursor offers them after every primary: the last resort of a
// connection whose primaries all failed before the pool heard of it), and
// a primary back takes the new connections again.
func TestBackupsOnlyWhileNoPrimaryIsLive(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := trusted(0)
		defer p.Close()
		p.NewSink().Update(discovery.Snapshot{Instances: discovery.SortInstances([]discovery.Instance{
			{Addr: "10.0.0.1:1"}, {Addr: "10.0.0.2:1"}, {Addr: "10.0.0.9:1", Backup: true},
		})})
		p.Flush()
		if got := picked(p); !slices.Equal(got, []string{"10.0.0.1:1", "10.0.0.2:1", "10.0.0.9:1"}) &&
			!slices.Equal(got, []string{"10.0.0.2:1", "10.0.0.1:1", "10.0.0.9:1"}) {
			t.Fatalf("with both primaries live: %v, want them, then the backup", got)
		}
		if got := split(p, 1000); got["10.0.0.9:1"] != 0 || got["10.0.0.1:1"] != 500 {
			t.Fatalf("first choices with both primaries live: %v", got)
		}
		if !target(p, "10.0.0.9:1").Backup || target(p, "10.0.0.1:1").Backup {
			t.Fatal("the view does not say which target is the backup")
		}

		p.ReportFailure("10.0.0.1:1", nil)
		p.Flush()
		if got := picked(p); !slices.Equal(got, []string{"10.0.0.2:1", "10.0.0.9:1"}) {
			t.Fatalf("with one primary live: %v", got)
		}
		p.ReportFailure("10.0.0.2:1", nil)
		p.Flush()
		if got := picked(p); !slices.Equal(got, []string{"10.0.0.9:1"}) {
			t.Fatalf("with no primary live: %v, want the backup", got)
		}

		// check: none brings them back after a trivial probe on backoff.
		time.Sleep(time.Minute)
		synctest.Wait()
		p.Flush()
		if got := split(p, 1000); got["10.0.0.9:1"] != 0 || got["10.0.0.1:1"] != 500 {
			t.Fatalf("first choices with the primaries back: %v", got)
		}
	})
}
