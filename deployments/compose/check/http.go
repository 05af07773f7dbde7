package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// do sends req on a connection of its own, as a client of the proxy that
// opens a connection per request does: every GET is a new proxied
// connection, so a failed GET is a failed client connection. The timeout
// is long enough for a dial to a dead backend plus a retry. Without
// keep-alives a transport holds nothing after the response, so one per
// request costs no pooled connections.
func do(req *http.Request) (*http.Response, error) {
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	if req.URL.Host == adminAddr && req.URL.Path != "/healthz" && req.URL.Path != "/readyz" {
		// rota's admin API wants the token rota.yaml names (the file the
		// compose files mount), as any operator's client would send it.
		tok, err := os.ReadFile(adminTokenFile)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	}
	return c.Do(req)
}

// get returns the name the backend behind addr (host:port) answers with.
func get(ctx context.Context, addr string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/", nil)
	if err != nil {
		return "", err
	}
	resp, err := do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("read body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %s", resp.Status)
	}
	return strings.TrimSpace(string(b)), nil
}

// status returns the status code of a GET of url.
func status(ctx context.Context, url string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

// waitRouted polls addr until every name in want has answered, and returns
// how long that took.
func waitRouted(ctx context.Context, addr string, want []string, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	seen := map[string]bool{}
	for {
		if name, err := get(ctx, addr); err == nil {
			seen[name] = true
		}
		missing := 0
		for _, w := range want {
			if !seen[w] {
				missing++
			}
		}
		if missing == 0 {
			return time.Since(start), nil
		}
		if time.Since(start) > timeout {
			return 0, fmt.Errorf("%s: after %v saw %v, want all of %v", addr, timeout, keys(seen), want)
		}
		if err := pause(ctx, 10*time.Millisecond); err != nil {
			return 0, err
		}
	}
}

// waitOnly polls addr until n answers in a row come only from names in
// want, and returns how long that took.
func waitOnly(ctx context.Context, addr string, want []string, n int, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	inRow := 0
	var last string
	for inRow < n {
		name, err := get(ctx, addr)
		if err == nil && slices.Contains(want, name) {
			inRow++
			continue
		}
		inRow, last = 0, name
		if err != nil {
			last = err.Error()
		}
		if time.Since(start) > timeout {
			return 0, fmt.Errorf("%s: still answered by %q after %v, want only %v", addr, last, timeout, want)
		}
		if err := pause(ctx, 10*time.Millisecond); err != nil {
			return 0, err
		}
	}
	return time.Since(start), nil
}

func keys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// load is client traffic from the host: a few goroutines doing GETs
// through the published ports in a loop, each bounded in count; stop ends
// it early.
type load struct {
	ok, failed atomic.Int64
	slowest    atomic.Int64 // nanoseconds of the slowest request since resetSlowest
	cancel     context.CancelFunc
	wg         sync.WaitGroup

	mu     sync.Mutex
	errs   []string // the first few failures, for the report
	byAddr map[string]*atomic.Int64
}

// maxLoadRequests bounds each load goroutine, whatever happens.
const maxLoadRequests = 50000

func startLoad(ctx context.Context, addrs []string, perAddr int) *load {
	ctx, cancel := context.WithCancel(ctx)
	l := &load{cancel: cancel, byAddr: map[string]*atomic.Int64{}}
	for _, a := range addrs {
		l.byAddr[a] = new(atomic.Int64)
	}
	for _, addr := range addrs {
		for range perAddr {
			l.wg.Go(func() {
				for range maxLoadRequests {
					if ctx.Err() != nil {
						return
					}
					t0 := time.Now()
					_, err := get(ctx, addr)
					l.noteLatency(time.Since(t0))
					switch {
					case ctx.Err() != nil:
						return // stopped mid-request: not the proxy's failure
					case err != nil:
						l.failed.Add(1)
						l.note(fmt.Sprintf("%s %s: %v", time.Now().Format("15:04:05.000"), addr, err))
					default:
						l.ok.Add(1)
						l.byAddr[addr].Add(1)
					}
				}
			})
		}
	}
	return l
}

func (l *load) noteLatency(d time.Duration) {
	for {
		cur := l.slowest.Load()
		if int64(d) <= cur || l.slowest.CompareAndSwap(cur, int64(d)) {
			return
		}
	}
}

func (l *load) note(e string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.errs) < 10 {
		l.errs = append(l.errs, e)
		logf("client error: %s", e)
	}
}

// firstErrors lists the first failures, for a report row ("" if none).
func (l *load) firstErrors() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.errs) == 0 {
		return ""
	}
	return "; first: " + strings.Join(l.errs, "; ")
}

// mark is a point in the load's counts, to tell what happened since.
type mark struct{ ok, failed int64 }

// mark also restarts the slowest-request measure.
func (l *load) mark() mark {
	l.slowest.Store(0)
	return mark{l.ok.Load(), l.failed.Load()}
}

// slow is the slowest request since the last mark.
func (l *load) slow() time.Duration { return time.Duration(l.slowest.Load()).Round(time.Millisecond) }

// since says how many requests succeeded and failed after m.
func (l *load) since(m mark) (ok, failed int64) {
	return l.ok.Load() - m.ok, l.failed.Load() - m.failed
}

// waitRequests waits until n more requests succeeded through addr (or any
// failed), so that a fault is seen under traffic, not merely alongside it.
func (l *load) waitRequests(ctx context.Context, addr string, n int64, timeout time.Duration) error {
	c := l.byAddr[addr]
	target := c.Load() + n
	deadline := time.Now().Add(timeout)
	for c.Load() < target {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: fewer than %d requests succeeded in %v", addr, n, timeout)
		}
		if err := pause(ctx, 10*time.Millisecond); err != nil {
			return err
		}
	}
	return nil
}

func (l *load) stop() {
	l.cancel()
	l.wg.Wait()
}

// discoveryErrors reads rota_discovery_errors_total of a listener from
// rota's /metrics: it grows while rota cannot reach that listener's
// registry and serves the last good set.
func discoveryErrors(ctx context.Context, listener string) (float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+adminAddr+"/metrics", nil)
	if err != nil {
		return 0, err
	}
	resp, err := do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, fmt.Errorf("/metrics: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, "rota_discovery_errors_total{") || !strings.Contains(line, `listener="`+listener+`"`) {
			continue
		}
		var v float64
		if _, err := fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v); err != nil {
			return 0, fmt.Errorf("/metrics: %q: %w", line, err)
		}
		return v, nil
	}
	return 0, nil // not counted yet: no error so far
}

// waitDiscoveryErrors waits until rota has counted a discovery error of
// listener beyond before, and returns the count.
func waitDiscoveryErrors(ctx context.Context, listener string, before float64, timeout time.Duration) (float64, error) {
	var now float64
	err := waitFor(ctx, timeout, func() error {
		var err error
		if now, err = discoveryErrors(ctx, listener); err != nil {
			return err
		}
		if now <= before {
			return fmt.Errorf("rota counted no discovery error of listener %s", listener)
		}
		return nil
	})
	return now, err
}
