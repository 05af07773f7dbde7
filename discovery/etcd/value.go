package etcd

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"strconv"
	"strings"

	"go.etcd.io/etcd/client/v3/naming/endpoints"

	"github.com/rota-proxy/rota/discovery"
)

// value is the JSON of an instance key. It mirrors the unexported
// naming/endpoints/internal.Update that endpoints.Manager writes: Op,
// Addr, Metadata. Register writes through endpoints.Manager itself; this
// type only reads.
type value struct {
	Op       endpoints.Operation
	Addr     string
	Metadata json.RawMessage
}

// maxMetadata bounds the metadata kept per instance.
const maxMetadata = 4 << 10

// parseInstance returns the instance a key/value pair registers. keyPrefix
// is "<prefix><service>/"; whatever follows it in the key is the instance's
// id (etcd's endpoints.Manager takes any; `rota register` uses the
// address), and the value's Addr is the instance.
func parseInstance(keyPrefix string, key, val []byte) (discovery.Instance, error) {
	id, ok := strings.CutPrefix(string(key), keyPrefix)
	if !ok || id == "" {
		return discovery.Instance{}, fmt.Errorf("no instance id after %s", keyPrefix)
	}
	var v value
	if err := json.Unmarshal(val, &v); err != nil {
		return discovery.Instance{}, fmt.Errorf("value is not naming/endpoints JSON: %w", err)
	}
	if v.Op != endpoints.Add {
		return discovery.Instance{}, fmt.Errorf("op is %d, want %d (add)", v.Op, endpoints.Add)
	}
	if err := checkAddr(v.Addr); err != nil {
		return discovery.Instance{}, fmt.Errorf("addr %q: %w", v.Addr, err)
	}
	in := discovery.Instance{Addr: v.Addr}
	if md := bytes.TrimSpace(v.Metadata); len(md) > 0 && !bytes.Equal(md, []byte("null")) {
		if len(md) > maxMetadata {
			return discovery.Instance{}, fmt.Errorf("metadata of %d bytes, more than %d", len(md), maxMetadata)
		}
		w, err := metadataWeight(md)
		if err != nil {
			return discovery.Instance{}, err
		}
		backup, err := metadataBackup(md)
		if err != nil {
			return discovery.Instance{}, err
		}
		var compact bytes.Buffer
		json.Compact(&compact, md)
		in.Weight, in.Metadata, in.Backup = w, compact.String(), backup
	}
	return in, nil
}

// metadataWeight reads Metadata.weight: an integer 1-1000, or absent.
func metadataWeight(md json.RawMessage) (int, error) {
	var obj map[string]json.RawMessage
	if json.Unmarshal(md, &obj) != nil {
		return 0, nil // metadata that is not an object carries no weight
	}
	raw, ok := obj["weight"]
	if !ok {
		return 0, nil
	}
	var f float64 // a JSON number: "3" (a string) is not one
	if err := json.Unmarshal(raw, &f); err != nil || f != math.Trunc(f) || f < 1 || f > 1000 {
		return 0, fmt.Errorf("weight (Metadata.weight) %s: want an integer 1-1000", truncate(raw, 40))
	}
	return int(f), nil
}

// metadataBackup reads Metadata.backup: true, false, or absent.
func metadataBackup(md json.RawMessage) (bool, error) {
	var obj map[string]json.RawMessage
	if json.Unmarshal(md, &obj) != nil {
		return false, nil
	}
	raw, ok := obj["backup"]
	if !ok {
		return false, nil
	}
	var b bool
	if err := json.Unmarshal(raw, &b); err != nil {
		return false, fmt.Errorf("backup (Metadata.backup) %s: want true or false", truncate(raw, 40))
	}
	return b, nil
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

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}
