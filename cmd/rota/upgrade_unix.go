//go:build !windows

package main

import "github.com/coreos/go-systemd/v22/daemon"

// notifySystemd tells systemd of a state change (Type=notify); without
// NOTIFY_SOCKET it does nothing.
func notifySystemd(state string) { daemon.SdNotify(false, state) }

// upgradable: a process can pass its listening sockets to a new one.
const upgradable = true
