package etcd

import (
	"context"
	"slices"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// avoidFor is how long a member found stale is left out of a client's
// endpoints before it is tried again.
const avoidFor = 10 * time.Second

// Steering keeps a client off the etcd members its watches found stale: a
// member cut off from rota (or frozen) keeps its TCP connection up, so the
// client would go on sending requests and watches to it until its gRPC
// keepalive gives up, 15 s later. Avoid takes the member's endpoints out of
// the client's endpoint list for avoidFor, then puts them back. Safe for
// concurrent use; Close stops it.
type Steering struct {
	client *clientv3.Client
	all    []string // the configured endpoints
	log    *zap.Logger

	mu      sync.Mutex
	avoided map[string]time.Time // endpoint -> until when
	members map[uint64][]string  // member ID -> its client URLs, host:port
	timer   *time.Timer
	closed  bool
	wg      sync.WaitGroup // the member list fetched ahead
}

// NewSteering steers client, whose configured endpoints are the full set.
func NewSteering(client *clientv3.Client, log *zap.Logger) *Steering {
	if log == nil {
		log = zap.NewNop()
	}
	s := &Steering{client: client, all: slices.Clone(client.Endpoints()), log: log,
		avoided: map[string]time.Time{}, members: map[uint64][]string{}}
	// Learn the members now, while every one answers: a stale member is
	// what Avoid is for, and asking then may reach just that one.
	s.wg.Go(func() { s.memberURLs(0) })
	return s
}

// Avoid takes the endpoints of member out of the client's list for a
// while, unless that would leave none.
func (s *Steering) Avoid(member uint64) {
	if member == 0 || len(s.all) < 2 {
		return
	}
	urls := s.memberURLs(member)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	until := time.Now().Add(avoidFor)
	var hit []string
	for _, ep := range s.all {
		if slices.Contains(urls, hostPort(ep)) {
			s.avoided[ep] = until
			hit = append(hit, ep)
		}
	}
	if len(hit) == 0 {
		return
	}
	if !s.applyLocked() {
		for _, ep := range hit {
			delete(s.avoided, ep)
		}
		return
	}
	s.log.Warn("etcd member stopped answering; leaving it out for a while",
		zap.Strings("endpoints", hit), zap.Duration("for", avoidFor))
}

// applyLocked sets the client's endpoints to those not avoided; false
// (and no change) when none would be left.
func (s *Steering) applyLocked() bool {
	now := time.Now()
	var use []string
	var next time.Time
	for _, ep := range s.all {
		until, ok := s.avoided[ep]
		if ok && now.Before(until) {
			if next.IsZero() || until.Before(next) {
				next = until
			}
			continue
		}
		delete(s.avoided, ep)
		use = append(use, ep)
	}
	if len(use) == 0 {
		return false
	}
	s.client.SetEndpoints(use...)
	if s.timer != nil {
		s.timer.Stop()
		s.timer = nil
	}
	if !next.IsZero() {
		s.timer = time.AfterFunc(time.Until(next), func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			if !s.closed {
				s.applyLocked()
			}
		})
	}
	return true
}

// memberURLs are the client addresses (host:port) of member, from a cached
// member list refreshed when the member is not in it.
func (s *Steering) memberURLs(member uint64) []string {
	s.mu.Lock()
	urls, ok := s.members[member]
	s.mu.Unlock()
	if ok {
		return urls
	}
	ctx, cancel := context.WithTimeout(s.client.Ctx(), time.Second)
	defer cancel()
	resp, err := s.client.MemberList(ctx)
	if err != nil && member != 0 {
		// Maybe it went to the stale member itself: once more, which
		// the client's round robin sends elsewhere.
		ctx, cancel := context.WithTimeout(s.client.Ctx(), time.Second)
		defer cancel()
		resp, err = s.client.MemberList(ctx)
	}
	if err != nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range resp.Members {
		var hps []string
		for _, u := range m.ClientURLs {
			hps = append(hps, hostPort(u))
		}
		s.members[m.ID] = hps
	}
	return s.members[member]
}

// Close stops putting endpoints back.
func (s *Steering) Close() {
	s.mu.Lock()
	s.closed = true
	if s.timer != nil {
		s.timer.Stop()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// hostPort strips a URL's scheme: etcd endpoints are written both ways.
func hostPort(u string) string {
	if i := strings.Index(u, "://"); i >= 0 {
		u = u[i+3:]
	}
	return strings.TrimSuffix(u, "/")
}
