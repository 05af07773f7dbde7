package testenv

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strings"
	"time"
)

// Redis is a redis-server on loopback for one test (Debian's, installed by
// scripts/redis-bin on first use), stopped by the test's cleanup.
type Redis struct {
	Addr string
	cmd  *exec.Cmd
	logs *bytes.Buffer
}

// StartRedis starts redis-server on a free loopback port with no
// persistence, extra taking more of its options ("--replicaof", "host",
// "port"), and waits until it answers PING.
func StartRedis(t T, extra ...string) *Redis {
	t.Helper()
	bin := scriptPath(t, "redis-bin")
	for range 10 {
		ports, err := freePorts(1)
		if err != nil {
			t.Fatalf("testenv: %v", err)
		}
		_, port, _ := net.SplitHostPort(ports[0])
		dir := t.TempDir()
		args := append([]string{"--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
			"--dir", dir, "--logfile", "", "--daemonize", "no"}, extra...)
		r := &Redis{Addr: ports[0], logs: &bytes.Buffer{}}
		r.cmd = exec.Command(bin, args...)
		r.cmd.Stdout, r.cmd.Stderr = r.logs, r.logs
		if err := r.cmd.Start(); err != nil {
			t.Fatalf("testenv: redis-server: %v", err)
		}
		done := make(chan struct{})
		go func() { r.cmd.Wait(); close(done) }()
		stop := func() {
			r.cmd.Process.Kill()
			<-done
		}
		_, ok := Poll(10*time.Second, func() bool {
			select {
			case <-done:
				return true // exited: the port was taken, most likely
			default:
			}
			got, err := r.Do("PING")
			return err == nil && got == "+PONG"
		})
		select {
		case <-done:
			continue
		default:
		}
		if !ok {
			stop()
			t.Fatalf("testenv: redis-server on %s never answered PING:\n%s", r.Addr, r.logs)
		}
		t.Cleanup(stop)
		return r
	}
	t.Fatalf("testenv: redis-server: no free port after 10 tries")
	return nil
}

// Do sends one inline command to addr and returns the first line of the
// answer ("+PONG", "-READONLY ...") or, for a bulk answer, its body.
func (r *Redis) Do(cmd string) (string, error) { return RedisDo(r.Addr, cmd) }

// RedisDo sends one inline command to a Redis at addr (or through a proxy
// in front of one) on a new connection.
func RedisDo(addr, cmd string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(c, "%s\r\n", cmd); err != nil {
		return "", err
	}
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		return "", err
	}
	line = strings.TrimRight(line, "\r\n")
	if !strings.HasPrefix(line, "$") {
		return line, nil
	}
	var n int
	if _, err := fmt.Sscanf(line, "$%d", &n); err != nil || n < 0 {
		return line, nil
	}
	body := make([]byte, n+2)
	if _, err := io.ReadFull(br, body); err != nil {
		return "", err
	}
	return string(body[:n]), nil
}

// Logs is what the server printed.
func (r *Redis) Logs() string { return r.logs.String() }
