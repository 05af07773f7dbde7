package etcd

import (
	"context"
	"slices"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

const (
	// avoidFor is how long a member found stale is left out of a client's
	// endpoints before it is tried again.
	avoidFor = 10 * time.Second
	// askTimeout bounds the question every endpoint is asked: who are you?
	askTimeout = 300 * time.Millisecond
)

// Steering keeps a client off the etcd members its watches found stale: a
// member cut off from rota (or frozen) keeps its TCP connection up, so the
// client would go on sending requests and watches to it until its gRPC
// keepalive gives up, 15 s later. Refresh asks every endpoint which member
// answers there (etcd's Status), and takes out of the client's endpoint
// list, for avoidFor, those where the stale member answers or nobody does;
// then it puts them back. Asking the endpoints, rather than matching the
// member's advertised URLs, works behind proxies and DNS names too. Safe
// for concurrent use; Close stops it.
type Steering struct {
	client *clientv3.Client
	all    []string // the configured endpoints
	log    *zap.Logger

	// gate orders the asks against changes of the client's endpoint list:
	// etcd's client reads that list without its own lock when Status
	// dials one endpoint (client/v3 v3.7.3, Client.dial), so asks hold
	// gate shared and SetEndpoints holds it alone. Never taken under mu.
	gate    sync.RWMutex
	applied uint64 // under gate: the generation of the list last set

	mu      sync.Mutex
	avoided map[string]time.Time // endpoint -> until when
	timer   *time.Timer
	gen     uint64 // under mu: counts the lists computed
	closed  bool
}

// NewSteering steers client, whose configured endpoints are the full set.
func NewSteering(client *clientv3.Client, log *zap.Logger) *Steering {
	if log == nil {
		log = zap.NewNop()
	}
	return &Steering{client: client, all: slices.Clone(client.Endpoints()), log: log, avoided: map[string]time.Time{}}
}

// Refresh asks every endpoint which member answers there and leaves out of
// the client's list, for avoidFor, those that do not answer and those where
// member answers (the member a watch found stale; 0 for none); the others
// are put back at once, which undoes an earlier avoidance that outlived its
// reason (a leader killed after another member was avoided). It changes
// nothing when no endpoint would be left, and returns within about twice
// askTimeout (once for its asks, once for another refresh's).
func (s *Steering) Refresh(member uint64) {
	if len(s.all) < 2 {
		return
	}
	bad := make([]bool, len(s.all))
	var wg sync.WaitGroup
	s.gate.RLock()
	for i, ep := range s.all {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(s.client.Ctx(), askTimeout)
			defer cancel()
			st, err := s.client.Status(ctx, ep)
			bad[i] = err != nil || member != 0 && st.Header.MemberId == member
		})
	}
	wg.Wait()
	s.gate.RUnlock()
	use, gen := s.refreshed(bad)
	s.set(use, gen)
}

// refreshed records the answers and returns the endpoint list to set and
// its generation (nil when nothing changes).
func (s *Steering) refreshed(bad []bool) ([]string, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || !slices.Contains(bad, false) {
		return nil, 0
	}
	until := time.Now().Add(avoidFor)
	var hit []string
	changed := false
	for i, ep := range s.all {
		_, was := s.avoided[ep]
		if bad[i] {
			s.avoided[ep] = until
			hit = append(hit, ep)
		} else {
			delete(s.avoided, ep)
		}
		changed = changed || was != bad[i]
	}
	if !changed {
		return nil, 0
	}
	use, gen := s.nextLocked()
	if len(hit) > 0 {
		s.log.Warn("etcd members not answering; leaving them out for a while",
			zap.Strings("endpoints", hit), zap.Duration("for", avoidFor))
	} else {
		s.log.Info("every etcd member answers again")
	}
	return use, gen
}

// set gives the client the endpoint list use of generation gen, unless a
// newer one was set already (two refreshes, or a refresh and the timer,
// may race to here); nil use sets nothing.
func (s *Steering) set(use []string, gen uint64) {
	if use == nil {
		return
	}
	s.gate.Lock()
	defer s.gate.Unlock()
	if gen <= s.applied {
		return
	}
	s.applied = gen
	s.client.SetEndpoints(use...)
}

// nextLocked returns the endpoints not avoided, in a new generation, and
// arms the timer that puts the next avoided one back; nil when none would
// be left.
func (s *Steering) nextLocked() ([]string, uint64) {
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
		return nil, 0
	}
	s.gen++
	if s.timer != nil {
		s.timer.Stop()
		s.timer = nil
	}
	if !next.IsZero() {
		s.timer = time.AfterFunc(time.Until(next), func() {
			s.mu.Lock()
			var use []string
			var gen uint64
			if !s.closed {
				use, gen = s.nextLocked()
			}
			s.mu.Unlock()
			s.set(use, gen)
		})
	}
	return use, s.gen
}

// Close stops putting endpoints back.
func (s *Steering) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	if s.timer != nil {
		s.timer.Stop()
	}
}
