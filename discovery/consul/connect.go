package consul

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/rota-proxy/rota/internal/retry"
)

// ConnectTLS is rota as a Consul Connect client: it keeps the leaf
// certificate of one service name (connect_service, rota's identity in
// intentions) and the CA roots current by blocking queries on the local
// agent, which issues and renews the leaf (a CA rotation included), and
// makes the TLS configurations that dial Connect services with them: mTLS
// with the leaf, the peer's chain verified against every root, and the
// peer's SPIFFE ID checked to be the destination service's. Intentions are
// the destination's to enforce, in its handshake.
//
// Ownership: Start runs two goroutines (leaf, roots) that Close stops and
// waits for; handshakes read the leaf and roots through atomic pointers.
type ConnectTLS struct {
	client  *api.Client
	service string
	log     *zap.Logger

	leaf  atomic.Pointer[tls.Certificate]
	roots atomic.Pointer[x509.CertPool]
	ready chan struct{} // closed once both are loaded
	once  sync.Once

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// StartConnectTLS starts following service's leaf certificate and the
// roots on client's agent.
func StartConnectTLS(client *api.Client, service string, log *zap.Logger) *ConnectTLS {
	if log == nil {
		log = zap.NewNop()
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &ConnectTLS{client: client, service: service, log: log.Named("connect").With(zap.String("connect_service", service)),
		ready: make(chan struct{}), cancel: cancel}
	c.wg.Go(func() { c.follow(ctx, "leaf certificate", c.fetchLeaf) })
	c.wg.Go(func() { c.follow(ctx, "CA roots", c.fetchRoots) })
	return c
}

// Close stops following.
func (c *ConnectTLS) Close() {
	c.cancel()
	c.wg.Wait()
}

// WaitReady waits until the leaf and the roots are loaded, or ctx ends.
func (c *ConnectTLS) WaitReady(ctx context.Context) error {
	select {
	case <-c.ready:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("consul connect: no leaf certificate for %q and CA roots from the agent yet: %w", c.service, ctx.Err())
	}
}

func (c *ConnectTLS) markReady() {
	if c.leaf.Load() != nil && c.roots.Load() != nil {
		c.once.Do(func() { close(c.ready) })
	}
}

// waitTime is each blocking query's wait; the agent's leaf endpoint
// allows up to 10 minutes.
const waitTime = 5 * time.Minute

// follow runs fetch as a blocking query loop: each answer that changed
// is applied; an error keeps what was loaded and retries with backoff.
func (c *ConnectTLS) follow(ctx context.Context, what string, fetch func(context.Context, uint64) (uint64, bool, error)) {
	bo := retry.New(250*time.Millisecond, 10*time.Second)
	var index uint64
	failing := false
	for ctx.Err() == nil {
		// The agent adds up to wait/16 of jitter; the deadline leaves
		// room for it and the answer.
		qctx, cancel := context.WithTimeout(ctx, waitTime+waitTime/16+10*time.Second)
		next, changed, err := fetch(qctx, index)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			if !failing {
				c.log.Warn("consul connect: cannot read the "+what+"; keeping the last ones", zap.Error(err))
			}
			failing = true
			if !retry.Sleep(ctx, bo.Next()) {
				return
			}
			continue
		}
		if failing {
			c.log.Info("consul connect: reading the " + what + " again")
		}
		failing = false
		bo.Reset()
		if next < index {
			next = 0 // the agent restarted: its index began again
		}
		if changed {
			c.markReady()
		}
		index = next
	}
}

func (c *ConnectTLS) fetchLeaf(ctx context.Context, index uint64) (uint64, bool, error) {
	q := (&api.QueryOptions{WaitIndex: index, WaitTime: waitTime}).WithContext(ctx)
	leaf, meta, err := c.client.Agent().ConnectCALeaf(c.service, q)
	if err != nil {
		return 0, false, err
	}
	if meta.LastIndex == index && c.leaf.Load() != nil {
		return index, false, nil
	}
	cert, err := tls.X509KeyPair([]byte(leaf.CertPEM), []byte(leaf.PrivateKeyPEM)) // the chain, intermediates included
	if err != nil {
		return 0, false, fmt.Errorf("leaf certificate: %w", err)
	}
	if old := c.leaf.Swap(&cert); old != nil {
		c.log.Info("consul connect: new leaf certificate", zap.String("serial", leaf.SerialNumber), zap.Time("valid_before", leaf.ValidBefore))
	}
	return meta.LastIndex, true, nil
}

func (c *ConnectTLS) fetchRoots(ctx context.Context, index uint64) (uint64, bool, error) {
	q := (&api.QueryOptions{WaitIndex: index, WaitTime: waitTime}).WithContext(ctx)
	list, meta, err := c.client.Agent().ConnectCARoots(q)
	if err != nil {
		return 0, false, err
	}
	if meta.LastIndex == index && c.roots.Load() != nil {
		return index, false, nil
	}
	pool := x509.NewCertPool()
	n := 0
	for _, r := range list.Roots {
		if pool.AppendCertsFromPEM([]byte(r.RootCertPEM)) {
			n++
		}
	}
	if n == 0 {
		return 0, false, errors.New("CA roots: none in the agent's answer")
	}
	if old := c.roots.Swap(pool); old != nil {
		c.log.Info("consul connect: CA roots changed", zap.Int("roots", n), zap.String("active", list.ActiveRootID))
	}
	return meta.LastIndex, true, nil
}

// ClientConfig dials instances of the Connect service dest (their
// sidecars, or the Connect-native service itself).
//
// TLS 1.2 at most: a destination enforces intentions while verifying
// rota's certificate, and under TLS 1.2 a denial fails the handshake (a
// failed connect, retried on the next target and counted) rather than
// the first read after it, as under TLS 1.3.
func (c *ConnectTLS) ClientConfig(dest string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		MaxVersion: tls.VersionTLS12,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			if l := c.leaf.Load(); l != nil {
				return l, nil
			}
			return nil, errors.New("consul connect: no leaf certificate from the agent yet")
		},
		// No host name check: Connect identifies services by SPIFFE ID,
		// which VerifyConnection checks after the chain.
		InsecureSkipVerify: true, //nolint:gosec // verified in VerifyConnection
		VerifyConnection: func(cs tls.ConnectionState) error {
			return c.verify(cs, dest)
		},
		// No session resumption: a destination checks intentions when
		// it verifies rota's certificate, which a resumed session
		// skips; a deny would not apply to resumed connections.
	}
}

// verify checks the peer's chain against the roots and its SPIFFE ID
// against dest, as Consul's own Connect clients do (the trust domain is
// the chain's to prove).
func (c *ConnectTLS) verify(cs tls.ConnectionState, dest string) error {
	roots := c.roots.Load()
	if roots == nil || len(cs.PeerCertificates) == 0 {
		return errors.New("consul connect: no CA roots to verify the peer with")
	}
	leaf := cs.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, cert := range cs.PeerCertificates[1:] {
		inter.AddCert(cert)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter}); err != nil {
		return fmt.Errorf("consul connect: peer certificate: %w", err)
	}
	if len(leaf.URIs) == 0 {
		return errors.New("consul connect: the peer's certificate has no SPIFFE ID")
	}
	u := leaf.URIs[0]
	if !strings.EqualFold(u.Scheme, "spiffe") || !strings.EqualFold(serviceOf(u.Path), dest) {
		return fmt.Errorf("consul connect: the peer is %s, not service %q", u, dest)
	}
	return nil
}

// serviceOf is the service a SPIFFE ID path names
// (/ns/<ns>/dc/<dc>/svc/<name>, /ap/<partition> possibly first).
func serviceOf(path string) string {
	i := strings.LastIndex(path, "/svc/")
	if i < 0 {
		return ""
	}
	return path[i+len("/svc/"):]
}
