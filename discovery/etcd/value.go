package etcd

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"

	"go.etcd.io/etcd/client/v3/naming/endpoints"
)

// value is the JSON of an instance key. It mirrors the unexported
// naming/endpoints/internal.Update that endpoints.Manager writes: Op,
// Addr, Metadata. Register writes through endpoints.Manager itself; this
// type only reads.
type value struct {
	Op       endpoints.Operation
	Addr     string
	Metadata any
}

// MalformedError describes an instance key whose value the watcher
// skipped. Watchers report it through Sink.Error once per key and
// revision; find it with errors.As.
type MalformedError struct {
	Key      string
	Revision int64 // the value's ModRevision
	Reason   string
}

func (e *MalformedError) Error() string {
	return fmt.Sprintf("etcd: skipped malformed instance %s (revision %d): %s", e.Key, e.Revision, e.Reason)
}

// parseInstance returns the address a key/value pair registers. keyPrefix
// is "<prefix><service>/"; the rest of the key must be the value's Addr.
func parseInstance(keyPrefix string, key, val []byte) (string, error) {
	seg, ok := strings.CutPrefix(string(key), keyPrefix)
	if !ok {
		return "", fmt.Errorf("key outside %s", keyPrefix)
	}
	var v value
	if err := json.Unmarshal(val, &v); err != nil {
		return "", fmt.Errorf("value is not naming/endpoints JSON: %w", err)
	}
	if v.Op != endpoints.Add {
		return "", fmt.Errorf("op is %d, want %d (add)", v.Op, endpoints.Add)
	}
	if err := checkAddr(v.Addr); err != nil {
		return "", fmt.Errorf("addr %q: %w", v.Addr, err)
	}
	if seg != v.Addr {
		return "", fmt.Errorf("key ends in %q but addr is %q", seg, v.Addr)
	}
	return v.Addr, nil
}

// checkAddr accepts host:port with a non-empty host and a port in 1-65535.
func checkAddr(addr string) error {
	if addr == "" {
		return errors.New("empty")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if host == "" {
		return errors.New("no host")
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return fmt.Errorf("bad port %q", port)
	}
	return nil
}
