// Package supervisor runs the life of one rota process: the server and its
// admin API started from a configuration; reloads (SIGHUP, POST
// /api/v1/reload) applied one at a time, the admin token re-read with each;
// and shutdown, where the first SIGINT or SIGTERM drains every listener
// and a second cuts the drains short. Signals arrive on a channel, so tests
// drive it without a process; cmd/rota only parses flags and wires.
package supervisor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/rota-proxy/rota/admin"
	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/certfile"
	"github.com/rota-proxy/rota/internal/handover"
	"github.com/rota-proxy/rota/server"
)

// Options are what Run runs.
type Options struct {
	Config *config.Config // valid
	// File is where Config was read; "" when it was built otherwise
	// (reloads then have nothing to re-read).
	File string
	// TokenFile, if set, stands for admin.token_file over every reload
	// (--admin-token-file).
	TokenFile string
	Logger    *zap.Logger
	Version   string // shown by the admin API
	Pprof     bool   // serve Go's profiler at /debug/pprof/ on the admin address
	// Signals are the process's: SIGHUP reloads, SIGUSR1 reopens the
	// access log, SIGINT and SIGTERM shut down (a second one cuts the
	// drains).
	Signals <-chan os.Signal
	// Ready, if set, runs once everything listens; an error stops Run.
	Ready func(*server.Server) error
	// Stopping, if set, runs on the shutdown signal, before the drain.
	Stopping func()
	// Inherited are the sockets this process was passed (an upgrade's
	// parent, systemd) and the parent waiting for it to be ready; nil for
	// none.
	Inherited *handover.Inherited
	// StartNew, if set, starts the program at rota's path with these
	// sockets (UpgradeSignal, POST /api/v1/upgrade); nil: no upgrades.
	StartNew func(files map[string]*os.File, state *os.File) (*handover.Child, error)
	// UpgradeTimeout bounds the new process's start, to ready; 0: a
	// minute.
	UpgradeTimeout time.Duration
	// Notify, if set, tells the service manager of state changes
	// (systemd's sd_notify: "READY=1", "RELOADING=1", "STOPPING=1",
	// "MAINPID=n").
	Notify func(state string)
}

// startTimeout bounds the start (an embedded etcd's first election).
const startTimeout = time.Minute

// Run starts what o describes and runs it until a shutdown signal, then
// drains and returns nil; it returns an error only when the start failed.
func Run(o Options) error {
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	s := &supervisor{o: o, cfg: o.Config, reloads: make(chan chan error), upgrades: make(chan chan error)}
	if err := s.start(); err != nil {
		return err
	}
	for s.next() {
	}
	s.shutdown()
	return nil
}

// supervisor is Run's state; its goroutine is the only one that touches it.
type supervisor struct {
	o   Options
	cfg *config.Config // in force
	srv *server.Server
	ah  *admin.Handler
	adm *admin.Server
	// adminCerts is the admin API's certificate, when admin.tls is set.
	adminCerts *certfile.Reloader
	reloads    chan chan error // POST /api/v1/reload's requests, answered here
	// upgrades are POST /api/v1/upgrade's requests, answered once the new
	// process started (or could not).
	upgrades chan chan error
	upgraded bool // a new process took over: this one drains and exits
}

// start starts the server, then the admin API, then Ready; what started is
// stopped again if a later step fails.
func (s *supervisor) start() error {
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	srv, err := server.StartWith(ctx, s.cfg, s.o.Logger, server.StartOptions{Inherit: s.inheritedSocket,
		Hold: s.o.Inherited.Upgrading(), Restore: s.handedOver(), DeferEmbedded: s.o.Inherited.Upgrading()})
	cancel()
	if err != nil {
		s.o.Inherited.Close()
		return err
	}
	s.srv = srv
	s.ah = &admin.Handler{State: srv, Logger: s.o.Logger.Named("admin"), Version: s.o.Version, Pprof: s.o.Pprof}
	if s.o.File != "" {
		s.ah.Reload = s.requestReload
	}
	if s.o.StartNew != nil {
		s.ah.Upgrade = s.requestUpgrade
	}
	err = s.startAdmin()
	s.o.Inherited.Close() // the sockets the configuration no longer has
	if err != nil {
		srv.Shutdown(context.Background())
		return err
	}
	if s.o.Inherited.Upgrading() {
		s.takeOver()
	}
	s.writePIDFile()
	s.notify("READY=1\nMAINPID=" + strconv.Itoa(os.Getpid()))
	if s.o.Ready != nil {
		if err := s.o.Ready(srv); err != nil {
			if s.o.Stopping != nil {
				s.o.Stopping()
			}
			s.stop(context.Background())
			return err
		}
	}
	return nil
}

func (s *supervisor) startAdmin() error {
	a := s.cfg.Admin
	if a.Listen == "" {
		return nil
	}
	if a.TokenFile != "" {
		tok, err := admin.ReadToken(a.TokenFile)
		if err != nil {
			return err
		}
		s.ah.SetToken(tok)
	}
	if w := a.Cleartext(); w != "" {
		s.o.Logger.Warn(w)
	}
	if a.TLS.Enabled() {
		r, err := certfile.New(adminFiles(a.TLS))
		if err != nil {
			return fmt.Errorf("admin.tls: %w", err)
		}
		log := s.o.Logger.Named("admin")
		r.OnError = func(err error) {
			log.Warn("admin certificate files changed but do not load; still serving the previous certificate", zap.Error(err))
		}
		r.OnReload = func(f certfile.Files) {
			log.Info("admin certificate reloaded from its changed files", zap.String("cert_file", f.CertFile))
		}
		s.adminCerts = r
		s.ah.TLS = r.ServerConfig(nil)
	}
	adm, err := s.adminSocket(a.Listen)
	if err != nil {
		return fmt.Errorf("admin: %w", err)
	}
	s.adm = adm
	s.o.Logger.Info("admin listening", zap.String("addr", adm.Addr().String()))
	return nil
}

// requestReload is the admin API's reload: it asks Run's goroutine, which
// applies reloads one at a time, and waits for the answer or ctx.
func (s *supervisor) requestReload(ctx context.Context) error { return ask(ctx, s.reloads) }

// ask sends a request to Run's goroutine on to and waits for its answer,
// or ctx.
func ask(ctx context.Context, to chan<- chan error) error {
	done := make(chan error, 1)
	select {
	case to <- done:
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

// next handles one event: a reload asked for by the API or SIGHUP, or a
// shutdown signal (false).
func (s *supervisor) next() bool {
	select {
	case done := <-s.reloads:
		err := s.reload()
		logReload(s.o.Logger, "api", err)
		done <- err
	case done := <-s.upgrades:
		return s.upgrade(done)
	case sig := <-s.o.Signals:
		if sig == ReopenSignal {
			s.reopenAccessLog()
			return true
		}
		if sig == UpgradeSignal {
			return s.upgrade(nil)
		}
		if sig != syscall.SIGHUP {
			s.o.Logger.Info("shutting down: draining connections", zap.String("signal", sig.String()))
			return false
		}
		if s.o.File == "" {
			s.o.Logger.Warn("SIGHUP ignored: reload needs --config")
			return true
		}
		logReload(s.o.Logger, "SIGHUP", s.reload())
	}
	return true
}

// reopenAccessLog reopens the access log's file (logrotate renamed it).
func (s *supervisor) reopenAccessLog() {
	l := s.srv.AccessLog()
	if l == nil {
		s.o.Logger.Warn("SIGUSR1 ignored: no access log")
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := l.Reopen(ctx); err != nil {
		s.o.Logger.Error("access log not reopened", zap.Error(err))
		return
	}
	s.o.Logger.Info("access log reopened", zap.String("path", l.Config().Path))
}

// reload re-reads the file and applies it; the admin socket stays where it
// is, and the token file is read again (a reload rotates the token).
func (s *supervisor) reload() error {
	next, err := config.Load(s.o.File)
	if err != nil {
		return err
	}
	next.Admin.Listen = s.cfg.Admin.Listen
	if s.o.TokenFile != "" {
		next.Admin.TokenFile = s.o.TokenFile
	}
	if err := next.Validate(); err != nil {
		return err
	}
	tok := ""
	if next.Admin.Listen != "" && next.Admin.TokenFile != "" {
		if tok, err = admin.ReadToken(next.Admin.TokenFile); err != nil {
			return err
		}
	}
	if next.Admin.Listen != "" && next.Admin.TLS.Enabled() != (s.adminCerts != nil) {
		return errors.New("admin.tls cannot be turned on or off by a reload (the admin socket stays as it is): restart rota, or upgrade it (SIGUSR2)")
	}
	if s.adminCerts != nil {
		// Checked before the listeners change; applied after they did.
		if _, err := certfile.New(adminFiles(next.Admin.TLS)); err != nil {
			return fmt.Errorf("admin.tls: %w", err)
		}
	}
	if err := s.srv.Reload(context.Background(), next); err != nil {
		return err
	}
	if s.adminCerts != nil {
		if err := s.adminCerts.Set(adminFiles(next.Admin.TLS)); err != nil {
			// Changed between the check and now: the old one stays.
			s.o.Logger.Warn("admin certificate not reloaded; still serving the previous one", zap.Error(err))
		}
	}
	s.ah.SetToken(tok)
	s.cfg = next
	return nil
}

func (s *supervisor) notify(state string) {
	if s.o.Notify != nil {
		s.o.Notify(state)
	}
}

// shutdown drains every listener, the ones reloads removed included; a
// second shutdown signal meanwhile cuts the drains.
func (s *supervisor) shutdown() {
	if !s.upgraded { // the new process is the service now
		s.notify("STOPPING=1")
	}
	if s.o.Stopping != nil {
		s.o.Stopping()
	}
	ctx, cancel := context.WithCancel(context.Background())
	watching := make(chan struct{})
	go func() {
		defer close(watching)
		for {
			select {
			case sig := <-s.o.Signals:
				if sig != syscall.SIGHUP && sig != ReopenSignal && sig != UpgradeSignal {
					s.o.Logger.Warn("second signal: closing open connections now")
					cancel()
					return
				}
			case <-ctx.Done(): // the drain ended
				return
			}
		}
	}()
	s.stop(ctx)
	cancel()
	<-watching
	s.o.Logger.Info("stopped")
}

// stop shuts the server down (bounded by ctx), then the admin API (first,
// after an upgrade: the new process answers it).
func (s *supervisor) stop(ctx context.Context) {
	if s.upgraded && s.adm != nil {
		s.adm.Handoff(time.Second)
		actx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s.adm.Shutdown(actx)
		cancel()
		s.adm = nil
	}
	if err := s.srv.Shutdown(ctx); err != nil {
		s.o.Logger.Warn("drain incomplete", zap.Error(err))
	}
	if s.adm != nil {
		actx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s.adm.Shutdown(actx)
		cancel()
	}
}

func logReload(logger *zap.Logger, trigger string, err error) {
	if err != nil {
		logger.Error("reload rejected; the running configuration stays", zap.String("trigger", trigger), zap.Error(err))
		return
	}
	logger.Info("configuration reloaded", zap.String("trigger", trigger))
}

// adminFiles are admin.tls's files.
func adminFiles(t config.AdminTLS) certfile.Files {
	return certfile.Files{CertFile: t.CertFile, KeyFile: t.KeyFile, ClientCAFile: t.ClientCAFile}
}
