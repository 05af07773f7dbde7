package supervisor

// Binary upgrades: this process hands its listening sockets to a new one
// of the program at its path, which tells it once it serves; this one then
// stops accepting, drains and exits (nginx's USR2, HAProxy's socket
// transfer). The sockets are the same kernel sockets throughout, so a
// client connecting meanwhile waits in their queue for one process or the
// other: none is refused.

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/admin"
	"github.com/rota-proxy/rota/health"
	"github.com/rota-proxy/rota/internal/handover"
	"github.com/rota-proxy/rota/server"
)

// Names of the sockets handed over: the admin's, and each listener's
// under a prefix, so that no listener name can be taken for another
// socket. (systemd's socket activation names a listener's socket by the
// listener's name alone: inheritedSocket takes both.)
const (
	adminName      = "admin"
	listenerPrefix = "listener/"
)

// inheritedSocket is the socket passed for listener name, if any.
func (s *supervisor) inheritedSocket(name string) *os.File {
	if f := s.o.Inherited.Take(listenerPrefix + name); f != nil {
		return f
	}
	return s.o.Inherited.Take(name)
}

// defaultUpgradeTimeout bounds a new process's start, to ready.
const defaultUpgradeTimeout = time.Minute

// adminSocket serves the admin API on the socket inherited for it, when
// it is on addr, else on a new one.
func (s *supervisor) adminSocket(addr string) (*admin.Server, error) {
	if f := s.o.Inherited.Take(adminName); f != nil {
		ln, err := net.FileListener(f)
		f.Close()
		if err == nil && handover.Serves(ln.Addr(), addr) {
			return admin.Serve(ln, s.ah), nil
		}
		if ln != nil {
			ln.Close()
		}
	}
	return admin.Listen(addr, s.ah)
}

// requestUpgrade is the admin API's upgrade: it asks Run's goroutine and
// waits until the new process has started (not until it takes over).
func (s *supervisor) requestUpgrade(ctx context.Context) error { return ask(ctx, s.upgrades) }

// upgrade starts the new process with every listening socket and waits
// for it to be ready: then this process drains and exits (false). A new
// process that fails to start or to get ready is killed and logged, and
// this one goes on serving (true). started, if set, learns whether the new
// process started.
func (s *supervisor) upgrade(started chan<- error) bool {
	log := s.o.Logger
	answer := func(err error) {
		if started != nil {
			started <- err
		}
	}
	if s.o.StartNew == nil {
		log.Warn("upgrade ignored: not supported here")
		answer(errors.New("upgrade not supported"))
		return true
	}
	sockets, err := s.srv.Sockets()
	if err != nil {
		log.Error("upgrade failed: the listening sockets cannot be passed on", zap.Error(err))
		answer(err)
		return true
	}
	files := make(map[string]*os.File, len(sockets)+1)
	for name, f := range sockets {
		files[listenerPrefix+name] = f
	}
	if s.adm != nil {
		f, err := s.adm.File()
		if err != nil {
			log.Error("upgrade failed: the admin socket cannot be passed on", zap.Error(err))
			closeAll(files)
			answer(err)
			return true
		}
		files[adminName] = f
	}
	state, err := stateFile(s.srv.Handover())
	if err != nil {
		log.Warn("upgrade: the state cannot be handed over; the new process starts fresh", zap.Error(err))
	}
	start := time.Now()
	s.notify("RELOADING=1")
	child, err := s.o.StartNew(files, state)
	closeAll(files) // the new process has its own copies
	if state != nil {
		state.Close()
	}
	answer(err)
	if err != nil {
		log.Error("upgrade failed: the new process did not start; serving on", zap.Error(err))
		s.notify("READY=1")
		return true
	}
	log.Info("upgrade: new process started; waiting for it to be ready", zap.Int("pid", child.Pid()))
	timeout := s.o.UpgradeTimeout
	if timeout <= 0 {
		timeout = defaultUpgradeTimeout
	}
	if err := child.Wait(timeout); err != nil {
		log.Error("upgrade failed; serving on", zap.Error(err))
		s.notify("READY=1")
		return true
	}
	log.Info("upgrade: the new process took over; draining and exiting",
		zap.Int("pid", child.Pid()), zap.Duration("took", time.Since(start)))
	// The new process starts the embedded etcd once this one's is gone
	// (its data directory is one process's).
	s.srv.StopEmbedded()
	s.upgraded = true
	return false
}

// stateFile writes st to an unlinked temporary file, read from its start
// by the new process.
func stateFile(st *server.HandoverState) (*os.File, error) {
	f, err := os.CreateTemp("", "rota-handover-")
	if err != nil {
		return nil, err
	}
	os.Remove(f.Name())
	if err := json.NewEncoder(f).Encode(st); err != nil {
		f.Close()
		return nil, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// handedOver reads the state the process this one takes over from passed,
// if any; one of another version is not used (this process starts fresh
// and says so).
func (s *supervisor) handedOver() *server.HandoverState {
	f := s.o.Inherited.State()
	if f == nil {
		return nil
	}
	defer f.Close()
	var st server.HandoverState
	if err := json.NewDecoder(f).Decode(&st); err != nil {
		s.o.Logger.Warn("upgrade: the state handed over is unreadable; starting fresh", zap.Error(err))
		return nil
	}
	if st.Version != server.HandoverVersion {
		s.o.Logger.Warn("upgrade: the state handed over is of another version; starting fresh",
			zap.Int("version", st.Version), zap.Int("reads", server.HandoverVersion))
		return nil
	}
	return &st
}

func closeAll(files map[string]*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// takeOver waits until this process, started by an upgrade, can serve as
// its parent does: every pool has its first discovery answer and every
// target its first verdict (none is still checking). Then its listeners
// accept, and it tells the parent, which stops accepting. The parent's
// timeout bounds the wait.
func (s *supervisor) takeOver() {
	log := s.o.Logger
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !serving(s.srv) {
		<-tick.C
	}
	s.srv.Flush() // the verdicts are in the pickers
	s.srv.Open()
	if err := s.o.Inherited.Ready(); err != nil {
		log.Error("upgrade: could not tell the old process", zap.Error(err))
		return
	}
	log.Info("upgrade: serving; the old process drains")
	// The old process stops its embedded etcd now; this one starts it on
	// the same data directory (registrants' keepalives reconnect; the
	// pools keep their targets meanwhile).
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := s.srv.StartEmbedded(ctx); err != nil {
		log.Error("upgrade: the embedded etcd did not start here", zap.Error(err))
	}
}

// serving reports whether srv has had every pool's first discovery answer
// and every target's first health verdict.
func serving(srv *server.Server) bool {
	if !srv.Ready() {
		return false
	}
	for _, l := range srv.Status() {
		pools := []server.PoolStatus{l.PoolStatus}
		for _, r := range l.Routes {
			pools = append(pools, r.PoolStatus)
		}
		for _, p := range pools {
			for _, t := range p.Targets {
				if t.Health.State == health.Checking {
					return false
				}
			}
		}
	}
	return true
}

// writePIDFile writes pid_file, when set.
func (s *supervisor) writePIDFile() {
	path := s.cfg.PIDFile
	if path == "" {
		return
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err == nil {
		err = os.Rename(tmp, path)
		if err == nil {
			return
		}
	}
	s.o.Logger.Warn("pid_file not written", zap.String("path", path))
}
