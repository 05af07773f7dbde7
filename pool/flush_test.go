package pool

import (
	"testing"
	"time"

	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/internal/testenv"
)

// An input that causes another (a snapshot makes the checker report a
// health change) may push it while the serializer is already between
// batches, behind a Flush queued meanwhile: Flush must still wait for it.
// This is the interleaving that let TestEmptyAnswers see a pool without its
// live target under -race, forced here with a gate.
func TestFlushWaitsForInputsCausedByEarlierOnes(t *testing.T) {
	p := New(Config{Health: health.Config{Check: health.CheckNone}}, nil)
	defer p.Close()
	p.Flush()

	started, gate := make(chan struct{}), make(chan struct{})
	var caused bool // the serializer's own, like every field it touches
	p.inputs.push(func() {
		close(started)
		<-gate
		p.inputs.push(func() { caused = true })
	})
	<-started
	flushed := make(chan bool)
	go func() {
		p.Flush()
		flushed <- caused // read after Flush: ordered by the serializer
	}()
	// The Flush is queued ahead of what the input will cause.
	testenv.Eventually(t, "Flush queued", 10*time.Second, p.inputs.pending)
	close(gate)
	if !<-flushed {
		t.Fatal("Flush returned before the input caused by an earlier one was applied")
	}
}
