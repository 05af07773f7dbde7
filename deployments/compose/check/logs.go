package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
)

// window is a time span in which a fault explains error-level log lines:
// a registry being down is an error for rota until it is back.
type window struct {
	what       string
	start, end time.Time
}

// faults records the windows of the faults a run injects.
type faults struct {
	mu      sync.Mutex
	windows []window
}

// open starts a fault window and returns the function that closes it. The
// window is widened by a margin at each end: rota's watchers notice an
// outage and a recovery after a request or a retry, not at once.
func (f *faults) open(what string) func() {
	start := time.Now().Add(-time.Second)
	return func() {
		f.mu.Lock()
		f.windows = append(f.windows, window{what, start, time.Now().Add(15 * time.Second)})
		f.mu.Unlock()
	}
}

func (f *faults) explain(t time.Time) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, w := range f.windows {
		if !t.Before(w.start) && !t.After(w.end) {
			return w.what, true
		}
	}
	return "", false
}

// logLine is what the check reads of rota's JSON log lines.
type logLine struct {
	Level string `json:"level"`
	TS    string `json:"ts"`
	Msg   string `json:"msg"`
}

// logScan is what errorLines found in a service's log.
type logScan struct {
	lines, warnings int            // JSON lines read; warn-level ones among them
	unexplained     []string       // error-level lines no fault explains
	explained       map[string]int // error-level lines by fault and message
}

// errorLines reads the service's logs and sorts its error-level lines
// (error, dpanic, panic, fatal) into those a fault window explains and the
// others.
func errorLines(ctx context.Context, c *compose, service string, f *faults) (logScan, error) {
	scan := logScan{explained: map[string]int{}}
	out, err := c.run(ctx, "logs", "--no-color", service)
	if err != nil {
		return scan, err
	}
	for _, line := range strings.Split(out, "\n") {
		// Both tools prefix each line with "<container> | ".
		_, msg, ok := strings.Cut(line, "| ")
		msg = strings.TrimSpace(msg)
		if !ok || !strings.HasPrefix(msg, "{") {
			continue
		}
		var l logLine
		if json.Unmarshal([]byte(msg), &l) != nil {
			continue
		}
		scan.lines++
		switch l.Level {
		case "warn":
			scan.warnings++
			continue
		case "error", "dpanic", "panic", "fatal":
		default:
			continue
		}
		ts, err := time.Parse("2006-01-02T15:04:05.000Z0700", l.TS)
		if err != nil {
			scan.unexplained = append(scan.unexplained, msg)
			continue
		}
		if what, ok := f.explain(ts); ok {
			scan.explained[what+": "+l.Msg]++
			continue
		}
		scan.unexplained = append(scan.unexplained, msg)
	}
	return scan, nil
}

func describeExplained(m map[string]int) string {
	if len(m) == 0 {
		return "none"
	}
	parts := make([]string, 0, len(m))
	for k, n := range m {
		parts = append(parts, fmt.Sprintf("%d× %s", n, k))
	}
	slices.Sort(parts)
	return strings.Join(parts, "; ")
}
