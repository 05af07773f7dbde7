// Package handover passes a rota process's listening sockets to a new
// process of the program at its path (a binary upgrade), and tells the old
// process when the new one is ready to serve; it also takes the sockets
// systemd passes a socket-activated service.
//
// The convention is systemd's, under rota's own names: the sockets are
// descriptors 3, 4, ... of the new process, ROTA_LISTEN_FDS says how many
// and ROTA_LISTEN_FDNAMES names them (colon-separated, each query-escaped:
// a name is the caller's), and ROTA_READY_FD is a pipe the new process writes "ready"
// to. (systemd's LISTEN_PID cannot name a process before it is started,
// hence names of rota's own.)
//
// Ownership: a Child owns the process it started until Wait returns; an
// Inherited owns the descriptors it was passed until Take hands one over
// (the caller then owns it) or Close.
package handover

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

const (
	envFds   = "ROTA_LISTEN_FDS"
	envNames = "ROTA_LISTEN_FDNAMES"
	envReady = "ROTA_READY_FD"
	envState = "ROTA_STATE_FD"
	// firstFD is the first inherited descriptor (after stdin, out, err).
	firstFD = 3
	ready   = "ready\n"
)

// Inherited is what a process was passed: listening sockets by name, and
// the parent to tell once ready. The zero Inherited passed nothing.
type Inherited struct {
	mu     sync.Mutex
	files  map[string]*os.File
	parent *os.File // the ready pipe; nil without a parent waiting
	state  *os.File // the parent's state, to read once; nil for none
	// From says where the sockets came from: "upgrade", "systemd" or "".
	From string
}

// FromEnv takes what this process was passed: an upgrade's sockets and
// ready pipe (ROTA_*), or systemd's socket activation (LISTEN_FDS, named
// by FileDescriptorName=). It clears the variables, so that a process this
// one starts does not take them for its own.
func FromEnv() (*Inherited, error) {
	in := &Inherited{files: map[string]*os.File{}}
	if v := os.Getenv(envFds); v != "" {
		n, err := strconv.Atoi(v)
		names := strings.Split(os.Getenv(envNames), ":")
		if err != nil || n < 0 || n != len(names) && n > 0 {
			return nil, fmt.Errorf("%s=%q with %s=%q: malformed", envFds, v, envNames, os.Getenv(envNames))
		}
		for i := range n {
			name, err := url.QueryUnescape(names[i])
			if err != nil {
				return nil, fmt.Errorf("%s: %q: %w", envNames, names[i], err)
			}
			in.files[name] = os.NewFile(uintptr(firstFD+i), name)
		}
		in.From = "upgrade"
		if r := os.Getenv(envReady); r != "" {
			fd, err := strconv.Atoi(r)
			if err != nil {
				return nil, fmt.Errorf("%s=%q: malformed", envReady, r)
			}
			in.parent = os.NewFile(uintptr(fd), "ready")
		}
		if r := os.Getenv(envState); r != "" {
			fd, err := strconv.Atoi(r)
			if err != nil {
				return nil, fmt.Errorf("%s=%q: malformed", envState, r)
			}
			in.state = os.NewFile(uintptr(fd), "state")
		}
		for _, k := range []string{envFds, envNames, envReady, envState} {
			os.Unsetenv(k)
		}
		return in, nil
	}
	for _, f := range activated() {
		in.files[f.Name()] = f
		in.From = "systemd"
	}
	return in, nil
}

// Serves reports whether a socket bound at got serves listen
// ("host:port") as configured: the same port (any, for port 0), and the
// same address unless listen's host is empty, unspecified or a name.
func Serves(got net.Addr, listen string) bool {
	ta, ok := got.(*net.TCPAddr)
	host, port, err := net.SplitHostPort(listen)
	if !ok || err != nil || (port != "0" && port != strconv.Itoa(ta.Port)) {
		return false
	}
	ip := net.ParseIP(host)
	return host == "" || ip == nil || ip.IsUnspecified() || ip.Equal(ta.IP)
}

// State hands over the parent's state (the caller reads and closes it), or
// nil when none was passed.
func (in *Inherited) State() *os.File {
	if in == nil {
		return nil
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	f := in.state
	in.state = nil
	return f
}

// Upgrading reports whether a parent waits for this process to be ready.
func (in *Inherited) Upgrading() bool { return in != nil && in.parent != nil }

// Take hands over the socket passed for name (the caller owns it), or nil.
func (in *Inherited) Take(name string) *os.File {
	if in == nil {
		return nil
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	f := in.files[name]
	delete(in.files, name)
	return f
}

// Close closes the sockets not taken (a listener the new configuration no
// longer has): the parent's copies close with it.
func (in *Inherited) Close() {
	if in == nil {
		return
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	for name, f := range in.files {
		f.Close()
		delete(in.files, name)
	}
}

// Ready tells the parent this process serves: it stops accepting and
// drains. Later calls do nothing.
func (in *Inherited) Ready() error {
	if in == nil {
		return nil
	}
	in.mu.Lock()
	p := in.parent
	in.parent = nil
	in.mu.Unlock()
	if p == nil {
		return nil
	}
	defer p.Close()
	_, err := io.WriteString(p, ready)
	return err
}

// Child is a new process started with this one's sockets.
type Child struct {
	cmd   *exec.Cmd
	ready chan error // one result: nil once it said ready, else why not
}

// Start runs path with args and the environment of this process, passing
// it files (by name), state (nil for none: what the new process reads with
// Inherited.State) and a ready pipe. The files stay the caller's (the
// child has its own copies once Start returns).
func Start(path string, args []string, files map[string]*os.File, state *os.File, stdout, stderr io.Writer) (*Child, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer w.Close()
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	slices.Sort(names)
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	for _, name := range names {
		cmd.ExtraFiles = append(cmd.ExtraFiles, files[name])
	}
	cmd.ExtraFiles = append(cmd.ExtraFiles, w)
	escaped := make([]string, len(names))
	for i, name := range names {
		escaped[i] = url.QueryEscape(name) // a name may hold the separator
	}
	cmd.Env = append(os.Environ(),
		envFds+"="+strconv.Itoa(len(names)),
		envNames+"="+strings.Join(escaped, ":"),
		envReady+"="+strconv.Itoa(firstFD+len(names)))
	if state != nil {
		cmd.ExtraFiles = append(cmd.ExtraFiles, state)
		cmd.Env = append(cmd.Env, envState+"="+strconv.Itoa(firstFD+len(names)+1))
	}
	if err := cmd.Start(); err != nil {
		r.Close()
		return nil, fmt.Errorf("start %s: %w", path, err)
	}
	c := &Child{cmd: cmd, ready: make(chan error, 1)}
	go func() {
		defer r.Close()
		buf := make([]byte, len(ready))
		_, err := io.ReadFull(r, buf)
		switch {
		case err == nil && string(buf) == ready:
			c.ready <- nil
		case err == nil:
			c.ready <- fmt.Errorf("said %q instead of ready", buf)
		default:
			// EOF: the child closed the pipe (it exited) before ready.
			c.ready <- errors.New("exited before it was ready")
		}
	}()
	return c, nil
}

// Pid is the child's process id.
func (c *Child) Pid() int { return c.cmd.Process.Pid }

// Wait waits up to timeout for the child to be ready. A child that is not
// is killed and reaped, and Wait says why. A ready child is left to run:
// it outlives this process, whose parent (or init) reaps it.
func (c *Child) Wait(timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	var err error
	select {
	case err = <-c.ready:
		if err == nil {
			c.cmd.Process.Release()
			return nil
		}
	case <-t.C:
		err = fmt.Errorf("not ready within %v", timeout)
	}
	c.cmd.Process.Kill()
	werr := c.cmd.Wait()
	return fmt.Errorf("new process %d: %w (%v)", c.cmd.Process.Pid, err, werr)
}
