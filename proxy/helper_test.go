package proxy_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The bulk helper is this test binary run as another process: a backend
// that streams data to every connection (but one answer, then silence, to a
// connection whose first byte is 'q'), and clients that pull that data
// through a proxy. It reads commands from stdin and reports on stdout.
const bulkHelperEnv = "ROTA_TEST_BULK_HELPER"

type bulkHelper struct {
	cmd     *exec.Cmd
	in      io.WriteCloser
	out     *bufio.Reader
	backend string
}

func startBulkHelper(t *testing.T) *bulkHelper {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), bulkHelperEnv+"=1", "GOMAXPROCS=1")
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &bulkHelper{cmd: cmd, in: in, out: bufio.NewReader(out)}
	h.backend = h.expect(t, "backend ")
	return h
}

// expect reads the helper's next line, which must start with prefix, and
// returns the rest.
func (h *bulkHelper) expect(t *testing.T, prefix string) string {
	t.Helper()
	line, err := h.out.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, prefix) {
		t.Fatalf("bulk helper said %q (%v), want %q...", line, err, prefix)
	}
	return strings.TrimSpace(strings.TrimPrefix(line, prefix))
}

// pull starts n clients pulling through addr, and returns once data flows.
func (h *bulkHelper) pull(t *testing.T, addr string, n int) {
	t.Helper()
	fmt.Fprintf(h.in, "pull %s %d\n", addr, n)
	h.expect(t, "flowing")
}

func (h *bulkHelper) stop(t *testing.T) {
	h.in.Close()
	if err := h.cmd.Wait(); err != nil {
		t.Errorf("bulk helper: %v", err)
	}
}

// runBulkHelper is the helper process's main.
func runBulkHelper() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	stop := make(chan struct{})
	chunk := make([]byte, 64<<10)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				var b [1]byte
				if _, err := c.Read(b[:]); err != nil {
					return
				}
				if b[0] == 'q' {
					c.Write(b[:])
					<-stop
					return
				}
				for {
					select {
					case <-stop:
						return
					default:
					}
					c.SetWriteDeadline(time.Now().Add(time.Second))
					if _, err := c.Write(chunk); err != nil {
						return
					}
				}
			}()
		}
	}()
	fmt.Println("backend", ln.Addr())
	var moved atomic.Int64
	var clients sync.WaitGroup
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		var addr string
		var n int
		if _, err := fmt.Sscanf(sc.Text(), "pull %s %d", &addr, &n); err != nil {
			continue
		}
		// Every client connects first, then all start pulling, so that a
		// dial does not wait for this process's busy goroutines.
		conns := make([]net.Conn, n)
		for i := range conns {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				fmt.Println("error", err)
				os.Exit(1)
			}
			conns[i] = c
		}
		for _, c := range conns {
			c.Write([]byte("b"))
			clients.Go(func() {
				defer c.Close()
				buf := make([]byte, 64<<10)
				for {
					select {
					case <-stop:
						return
					default:
					}
					c.SetReadDeadline(time.Now().Add(time.Second))
					k, err := c.Read(buf)
					moved.Add(int64(k))
					if err != nil && !os.IsTimeout(err) {
						return
					}
				}
			})
		}
		for moved.Load() < int64(n)<<20 {
			time.Sleep(10 * time.Millisecond) // a separate process: no test to wait on
		}
		fmt.Println("flowing")
	}
	close(stop)
	ln.Close()
	clients.Wait()
	os.Exit(0)
}
