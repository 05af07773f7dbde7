package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"time"

	"github.com/rota-proxy/rota/config"
	"github.com/rota-proxy/rota/internal/handover"
	"github.com/rota-proxy/rota/supervisor"
)

// quickFlags are the flags of the quick form of `rota serve`.
type quickFlags struct {
	listen, service, consul string
	backends, etcd          listFlag
	healthInterval          time.Duration
	rise, fall, retries     int
	dialTimeout             time.Duration
}

// quickOnly are the flags that build a config and so cannot be mixed with
// --config.
var quickOnly = []string{"listen", "backend", "service", "etcd", "consul",
	"health-interval", "rise", "fall", "retries", "dial-timeout"}

func cmdServe(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("serve", stderr, "rota serve --config rota.yaml | rota serve --listen :8080 (--backend h:p ... | --service S --etcd h:p | --service S --consul h:p)")
	var (
		cfgPath string
		q       quickFlags
		adminAt string
		lf      logFlags
	)
	fs.StringVar(&cfgPath, "config", "", "configuration file (YAML); SIGHUP re-reads it")
	fs.StringVar(&q.listen, "listen", ":8080", "quick form: address to accept clients on")
	fs.Var(&q.backends, "backend", "quick form: a static backend host:port (repeat, or comma-separate)")
	fs.StringVar(&q.service, "service", "", "quick form: service name to discover")
	fs.Var(&q.etcd, "etcd", "quick form: etcd endpoints host:port[,host:port] to discover --service in")
	fs.StringVar(&q.consul, "consul", "", "quick form: Consul agent host:port to discover --service in")
	fs.DurationVar(&q.healthInterval, "health-interval", config.DefaultInterval, "quick form: health check interval")
	fs.IntVar(&q.rise, "rise", config.DefaultRise, "quick form: successes before a target is up again")
	fs.IntVar(&q.fall, "fall", config.DefaultFall, "quick form: failures before a target is down")
	fs.IntVar(&q.retries, "retries", config.DefaultRetries, "quick form: further targets to try when a dial fails")
	fs.DurationVar(&q.dialTimeout, "dial-timeout", config.DefaultDialTimeout, "quick form: timeout of one dial to a target")
	fs.StringVar(&adminAt, "admin", config.DefaultAdminListen, `admin HTTP address; "" disables it (overrides admin.listen of --config)`)
	var tokenFile string
	fs.StringVar(&tokenFile, "admin-token-file", "", "file holding the admin API's bearer token; required when --admin is not a loopback address (overrides admin.token_file of --config)")
	var pprofOn bool
	fs.BoolVar(&pprofOn, "pprof", false, "serve Go's profiler at /debug/pprof/ on the admin address")
	lf.register(fs, "auto")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	set := setFlags(fs)

	var cfg *config.Config
	if cfgPath != "" {
		for _, f := range quickOnly {
			if set[f] {
				return usagef("--%s belongs to the quick form; with --config set it in the file", f)
			}
		}
		var err error
		if cfg, err = config.Load(cfgPath); err != nil {
			return errors.New(indentErrors(err))
		}
	} else {
		var err error
		if cfg, err = quickConfig(q); err != nil {
			return err
		}
	}
	if set["admin"] || cfgPath == "" {
		cfg.Admin.Listen = adminAt
	}
	if set["admin-token-file"] {
		cfg.Admin.TokenFile = tokenFile
	}
	if err := cfg.Validate(); err != nil {
		return usagef("%v", flagNames(err))
	}
	logger, err := lf.logger(stderr)
	if err != nil {
		return err
	}
	defer logger.Sync()
	return serve(supervisor.Options{Config: cfg, File: cfgPath, Logger: logger, Pprof: pprofOn, TokenFile: tokenFile})
}

// quickConfig builds the config of the quick form.
func quickConfig(q quickFlags) (*config.Config, error) {
	cfg := config.Default()
	l := config.DefaultListener()
	l.Listen = q.listen
	l.Health.Interval = q.healthInterval
	if l.Health.BackoffMax < l.Health.Interval {
		l.Health.BackoffMax = l.Health.Interval
	}
	l.Health.Rise, l.Health.Fall = q.rise, q.fall
	l.Retries, l.DialTimeout = q.retries, q.dialTimeout
	sources := 0
	if len(q.backends) > 0 {
		sources++
		l.Discovery, l.Static = "static", config.Statics(q.backends...)
		l.Name = "default"
	}
	if len(q.etcd) > 0 {
		sources++
		e := config.DefaultEtcd()
		e.Endpoints = q.etcd
		cfg.Registries.Etcd = &e
		l.Discovery = "etcd"
	}
	if q.consul != "" {
		sources++
		cfg.Registries.Consul = &config.Consul{Address: q.consul}
		l.Discovery = "consul"
	}
	switch {
	case sources == 0:
		return nil, usagef("nothing to proxy to: give --config, --backend host:port, or --service with --etcd or --consul")
	case sources > 1:
		return nil, usagef("--backend, --etcd and --consul are alternatives; give one")
	case l.Discovery == "static" && q.service != "":
		return nil, usagef("--service needs --etcd or --consul; --backend lists the backends itself")
	case l.Discovery != "static":
		if q.service == "" {
			return nil, usagef("--%s needs --service NAME", l.Discovery)
		}
		l.Service, l.Name = q.service, q.service
	}
	cfg.Listeners = []config.Listener{l}
	if err := cfg.Validate(); err != nil {
		return nil, usagef("%v", flagNames(err))
	}
	return cfg, nil
}

// flagNames rewords config field paths in quick-form errors as the flags
// that set them.
func flagNames(err error) string {
	r := []string{
		"listeners[0].listen", "--listen", "listeners[0].static", "--backend",
		"listeners[0].service", "--service", "registries.etcd.endpoints", "--etcd",
		"registries.consul.address", "--consul", "listeners[0].health.interval", "--health-interval",
		"listeners[0].health.rise", "--rise", "listeners[0].health.fall", "--fall",
		"listeners[0].retries", "--retries", "listeners[0].dial_timeout", "--dial-timeout",
		"admin.listen", "--admin", "admin.token_file", "--admin-token-file",
	}
	msg := err.Error()
	for i := 0; i < len(r); i += 2 {
		msg = strings.ReplaceAll(msg, r[i], r[i+1])
	}
	return msg
}

// serve runs cfg until SIGINT or SIGTERM (supervisor.Run), the process's
// signals delivered to it.
func serve(o supervisor.Options) error {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, supervisor.Signals()...)
	defer signal.Stop(sigs)
	o.Signals = sigs
	o.Version = version
	in, err := handover.FromEnv()
	if err != nil {
		return err
	}
	o.Inherited = in
	if upgradable {
		o.StartNew = startNew
		o.Notify = notifySystemd
	}
	return supervisor.Run(o)
}

func cmdCheck(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("check", stderr, "rota check --config rota.yaml")
	var path string
	fs.StringVar(&path, "config", "", "configuration file to validate")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if path == "" {
		return usagef("--config is required")
	}
	cfg, err := config.Load(path)
	if err != nil {
		return errors.New(indentErrors(err))
	}
	fmt.Fprintf(stdout, "%s: ok (%d listener%s)\n", path, len(cfg.Listeners), plural(len(cfg.Listeners)))
	if w := cfg.Admin.Cleartext(); w != "" {
		fmt.Fprintf(stderr, "%s: warning: %s\n", path, w)
	}
	return nil
}

// indentErrors puts each of several joined errors on its own line.
func indentErrors(err error) string {
	msg := err.Error()
	if !strings.Contains(msg, "\n") {
		return msg
	}
	return "invalid configuration:\n  " + strings.ReplaceAll(msg, "\n", "\n  ")
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}
