package accesslog

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Config is the access_log section of rota's configuration (its keys are
// the yaml tags).
type Config struct {
	Path      string `yaml:"path"`       // stdout, stderr, or a file (appended to; reopened by Reopen)
	Format    string `yaml:"format"`     // json or text
	OnConnect bool   `yaml:"on_connect"` // also a record when the target connection is made
	// Buffer is how many records wait for the writer at most (0:
	// DefaultBuffer); past it, records are dropped and counted.
	Buffer int `yaml:"buffer"`
}

// DefaultConfig is the section's defaults: JSON to stdout at the end of
// each connection.
func DefaultConfig() Config { return Config{Path: "stdout", Format: JSON, Buffer: DefaultBuffer} }

// DefaultBuffer is Config.Buffer's default: about half a second of
// records at 20,000 connections a second.
const DefaultBuffer = 8192

// Formats.
const (
	JSON = "json"
	Text = "text"
)

// Bounds of the buffers between the relay loops and the writer.
const (
	shards = 8 // Add picks one in turn: the loops rarely meet on a lock
	// RecentPerListener is how many of a listener's last records Recent
	// keeps (the status page's list).
	RecentPerListener = 20
)

// flushEvery is how often the writer takes the records even when no Add
// woke it.
const flushEvery = 100 * time.Millisecond

// Log writes Records. Add is safe for concurrent use and never blocks on
// the writer; the writer goroutine owns the output, the recent lists' ring
// positions and the buffers it has taken. Create it with Open; Close
// stops it.
type Log struct {
	cfg     Config
	shard   [shards]shard
	next    atomic.Uint32
	dropped atomic.Uint64
	wake    chan struct{} // capacity 1: "records are waiting"
	reopen  chan chan error
	stop    chan struct{}
	done    chan struct{}

	mu     sync.Mutex // guards recent
	recent map[string]*recentRing
}

type shard struct {
	mu   sync.Mutex
	recs []Record
	_    [64]byte // a cache line apart from the next shard's lock
}

type recentRing struct {
	recs [RecentPerListener]Record
	n    int // records ever put
}

// Open opens cfg's output and starts the writer.
func Open(cfg Config) (*Log, error) {
	switch cfg.Format {
	case "", JSON:
		cfg.Format = JSON
	case Text:
	default:
		return nil, fmt.Errorf("access_log.format %q: want json or text", cfg.Format)
	}
	out, err := openOutput(cfg.Path)
	if err != nil {
		return nil, err
	}
	l := &Log{cfg: cfg, wake: make(chan struct{}, 1), reopen: make(chan chan error),
		stop: make(chan struct{}), done: make(chan struct{}), recent: map[string]*recentRing{}}
	perShard := max(cfg.Buffer, shards) / shards
	if cfg.Buffer == 0 {
		perShard = DefaultBuffer / shards
	}
	for i := range l.shard {
		l.shard[i].recs = make([]Record, 0, perShard)
	}
	go l.write(out, perShard)
	return l, nil
}

// Config is the configuration l was opened with.
func (l *Log) Config() Config { return l.cfg }

// OnConnect reports whether connect records are asked for.
func (l *Log) OnConnect() bool { return l.cfg.OnConnect }

// Add queues r for the writer: a copy, into a bounded buffer. When the
// buffer is full (the writer is behind) r is dropped and counted.
func (l *Log) Add(r *Record) { l.AddFrom(int(l.next.Add(1)), r) }

// AddFrom is Add for a caller that names its buffer (a relay loop, by its
// number): callers that keep to their own never meet on a lock.
func (l *Log) AddFrom(buffer int, r *Record) {
	s := &l.shard[uint(buffer)%shards]
	s.mu.Lock()
	if len(s.recs) == cap(s.recs) {
		s.mu.Unlock()
		l.dropped.Add(1)
		return
	}
	s.recs = append(s.recs, *r)
	half := len(s.recs) == cap(s.recs)/2
	s.mu.Unlock()
	if half {
		// The writer takes the records every flushEvery anyway; it is
		// woken early only when a buffer fills (a wake-up per record
		// would cost the loops a futex each).
		select {
		case l.wake <- struct{}{}:
		default:
		}
	}
}

// Dropped is how many records were dropped because the writer was behind.
func (l *Log) Dropped() uint64 { return l.dropped.Load() }

// Recent returns the last records of listener, oldest first.
func (l *Log) Recent(listener string) []Record {
	l.mu.Lock()
	defer l.mu.Unlock()
	r := l.recent[listener]
	if r == nil {
		return nil
	}
	n := min(r.n, RecentPerListener)
	out := make([]Record, 0, n)
	for i := r.n - n; i < r.n; i++ {
		out = append(out, r.recs[i%RecentPerListener])
	}
	return out
}

// Reopen closes the output file and opens the path again (after logrotate
// renamed it); stdout and stderr stay. It waits for the writer to do it.
func (l *Log) Reopen(ctx context.Context) error {
	done := make(chan error, 1)
	select {
	case l.reopen <- done:
	case <-l.done:
		return errors.New("access log closed")
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close writes what is queued and stops the writer; it waits for it until
// ctx ends (a writer blocked on a full pipe is left to finish on its own).
func (l *Log) Close(ctx context.Context) error {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	select {
	case <-l.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("access log: the writer did not finish: %w", ctx.Err())
	}
}

// write is the writer goroutine: it takes the shards' records, formats
// and writes them, and keeps the recent lists, until stop.
func (l *Log) write(out *os.File, perShard int) {
	defer close(l.done)
	w := bufio.NewWriterSize(out, 64<<10)
	spare := make([]Record, 0, perShard)
	var batch []Record
	var line []byte
	tick := time.NewTicker(flushEvery)
	defer tick.Stop()
	defer func() {
		w.Flush()
		closeOutput(out)
	}()
	for {
		stopping := false
		select {
		case <-l.wake:
		case <-tick.C:
		case done := <-l.reopen:
			w.Flush()
			next, err := openOutput(l.cfg.Path)
			if err == nil {
				closeOutput(out)
				out = next
				w.Reset(out)
			}
			done <- err
			continue
		case <-l.stop:
			stopping = true
		}
		// Every shard's records, in the order they ended (the shards
		// interleave them).
		batch = batch[:0]
		for i := range l.shard {
			s := &l.shard[i]
			s.mu.Lock()
			recs := s.recs
			s.recs = spare
			s.mu.Unlock()
			batch = append(batch, recs...)
			spare = recs[:0]
		}
		slices.SortStableFunc(batch, func(a, b Record) int { return a.Time.Compare(b.Time) })
		for j := range batch {
			line = l.format(line[:0], &batch[j])
			w.Write(line)
		}
		l.remember(batch)
		w.Flush()
		if stopping {
			return
		}
	}
}

func (l *Log) format(b []byte, r *Record) []byte {
	if l.cfg.Format == Text {
		return AppendText(b, r)
	}
	return AppendJSON(b, r)
}

// remember keeps the last records of each listener.
func (l *Log) remember(recs []Record) {
	if len(recs) == 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := range recs {
		r := l.recent[recs[i].Listener]
		if r == nil {
			r = new(recentRing)
			l.recent[recs[i].Listener] = r
		}
		r.recs[r.n%RecentPerListener] = recs[i]
		r.n++
	}
}

func openOutput(path string) (*os.File, error) {
	switch path {
	case "", "stdout":
		return os.Stdout, nil
	case "stderr":
		return os.Stderr, nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("access_log.path: %w", err)
	}
	return f, nil
}

func closeOutput(f *os.File) {
	if f != os.Stdout && f != os.Stderr {
		f.Close()
	}
}
