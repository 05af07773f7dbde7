package main

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/rota-proxy/rota/internal/handover"
	"github.com/rota-proxy/rota/supervisor"
)

// cmdUpgrade is rota upgrade: SIGUSR2 to the process pid_file names, which
// then starts the binary at its path with its listening sockets.
func cmdUpgrade(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("upgrade", stderr, "rota upgrade --pid-file /run/rota.pid")
	var pidFile string
	fs.StringVar(&pidFile, "pid-file", "", "the running rota's pid_file")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if pidFile == "" {
		return usagef("--pid-file is required")
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return fmt.Errorf("%s: not a process id: %q", pidFile, strings.TrimSpace(string(b)))
	}
	p, err := os.FindProcess(pid)
	if err != nil {
		return err
	}
	if err := p.Signal(supervisor.UpgradeSignal); err != nil {
		return fmt.Errorf("process %d: %w", pid, err)
	}
	fmt.Fprintf(stdout, "asked rota (pid %d) to upgrade; it hands over once the new process serves\n", pid)
	return nil
}

// startNew starts the binary at rota's path (read now: an upgrade may have
// replaced the file) with this process's arguments and the sockets.
func startNew(files map[string]*os.File, state *os.File) (*handover.Child, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	return handover.Start(exe, os.Args[1:], files, state, os.Stdout, os.Stderr)
}
