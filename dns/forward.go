package dns

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	mdns "github.com/miekg/dns"
)

// maxCacheTTL caps how long any upstream answer is cached.
const maxCacheTTL = 3600

var (
	// errNoUpstreams is why a name outside the cluster domain gets SERVFAIL when no upstream is
	// configured.
	errNoUpstreams = errors.New("no upstream resolvers configured")
	// errWouldWait is what resolve returns, told not to wait, instead of asking the upstreams.
	errWouldWait = errors.New("not cached: the upstreams must be asked")
	// errForwardCap is why an exchange was not started: Config.MaxForwards are in flight.
	errForwardCap = errors.New("too many upstream exchanges in flight")
)

// flight is one upstream exchange in flight, shared by every query of its question that arrives
// meanwhile. m and err are set before done is closed; m is never modified afterwards.
type flight struct {
	done    chan struct{}
	m       *mdns.Msg
	err     error
	waiters int // queries waiting for it; guarded by Server.flightMu
}

// forward answers q (a name outside the cluster domain; name is q.Name lowercased) from the cache
// or the upstreams, or with SERVFAIL when neither can. With wait false, a cache miss returns ok
// false, having counted nothing.
func (s *Server) forward(ctx context.Context, r *mdns.Msg, q mdns.Question, name string, opt *mdns.OPT, wait bool) (*mdns.Msg, bool) {
	do := opt != nil && opt.Do()
	m, hit, err := s.resolve(ctx, name, q.Qtype, q.Qclass, do, r.CheckingDisabled, wait)
	if errors.Is(err, errWouldWait) {
		return nil, false
	}
	if err != nil {
		s.servFail.Add(1)
		if !errors.Is(err, errNoUpstreams) && s.forwardLog.allow(s.now()) {
			s.logger.Warn("dns forward failed (rate-limited log)", "name", q.Name, "type", mdns.TypeToString[q.Qtype], "err", err)
		}
		m := rcodeReply(r, mdns.RcodeServerFailure)
		m.RecursionAvailable = len(s.upstreams) > 0
		return m, true
	}
	if hit {
		s.cacheHits.Add(1)
	} else {
		s.forwarded.Add(1)
	}
	m.Id = r.Id
	m.Response = true
	m.Opcode = mdns.OpcodeQuery
	m.RecursionDesired = r.RecursionDesired
	m.Question = []mdns.Question{q} // the client's spelling of the name
	return m, true
}

// resolve returns a private copy of the upstream answer to (name, qtype, qclass) with the given
// DO and CD bits, from the cache when it holds one (hit), else from the upstreams — unless wait is
// false: then errWouldWait; its OPT record is removed.
func (s *Server) resolve(ctx context.Context, name string, qtype, qclass uint16, do, cd, wait bool) (m *mdns.Msg, hit bool, err error) {
	if len(s.upstreams) == 0 {
		return nil, false, errNoUpstreams
	}
	key := cacheKey{name: strings.ToLower(name), qtype: qtype, qclass: qclass, do: do, cd: cd}
	if s.cache != nil {
		if m := s.cache.get(key, s.now()); m != nil {
			return m, true, nil
		}
	}
	if !wait {
		return nil, false, errWouldWait
	}
	m, err = s.exchangeShared(ctx, key)
	return m, false, err
}

// exchangeShared returns a private copy of the upstreams' answer to key (its OPT record removed,
// cached), from the exchange of key in flight when there is one, else from one it starts, unless
// MaxForwards exchanges are in flight.
func (s *Server) exchangeShared(ctx context.Context, key cacheKey) (*mdns.Msg, error) {
	s.flightMu.Lock()
	if f, ok := s.flights[key]; ok {
		f.waiters++
		s.flightMu.Unlock()
		select {
		case <-f.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if f.err != nil {
			return nil, f.err
		}
		s.coalesced.Add(1)
		return f.m.Copy(), nil
	}
	f := &flight{done: make(chan struct{})}
	s.flights[key] = f
	s.flightMu.Unlock()

	f.m, f.err = s.exchangeCapped(ctx, key)
	if f.err == nil {
		stripOPT(f.m)
		if s.cache != nil {
			s.cache.put(key, f.m, s.now())
		}
	}
	s.flightMu.Lock()
	delete(s.flights, key)
	s.flightMu.Unlock()
	close(f.done)
	if f.err != nil {
		return nil, f.err
	}
	return f.m.Copy(), nil
}

// exchangeCapped is exchange in one of the MaxForwards slots, or errForwardCap when none is free.
func (s *Server) exchangeCapped(ctx context.Context, key cacheKey) (*mdns.Msg, error) {
	select {
	case s.forwardSlots <- struct{}{}:
	default:
		s.forwardRefused.Add(1)
		return nil, errForwardCap
	}
	defer func() { <-s.forwardSlots }()
	return s.exchange(ctx, key)
}

// exchange asks the upstreams in order: over UDP, then over TCP when the UDP answer is truncated;
// on a network error, a timeout or SERVFAIL it moves on to the next one.
func (s *Server) exchange(ctx context.Context, key cacheKey) (*mdns.Msg, error) {
	q := new(mdns.Msg)
	q.SetQuestion(key.name, key.qtype)
	q.Question[0].Qclass = key.qclass
	q.CheckingDisabled = key.cd
	q.SetEdns0(ednsSize, key.do)
	var errs []error
	for _, up := range s.upstreams {
		m, err := s.exchangeWith(ctx, up, q)
		if err == nil && m.Rcode == mdns.RcodeServerFailure {
			err = errors.New("SERVFAIL")
		}
		if err == nil {
			return m, nil
		}
		errs = append(errs, fmt.Errorf("upstream %s: %w", up, err))
		if ctx.Err() != nil {
			break
		}
	}
	return nil, errors.Join(errs...)
}

// exchangeWith asks one upstream.
func (s *Server) exchangeWith(ctx context.Context, up string, q *mdns.Msg) (*mdns.Msg, error) {
	m, err := s.exchangeNet(ctx, "udp", up, q)
	if err != nil {
		return nil, fmt.Errorf("udp: %w", err)
	}
	if m.Truncated {
		if m, err = s.exchangeNet(ctx, "tcp", up, q); err != nil {
			return nil, fmt.Errorf("tcp after truncated udp answer: %w", err)
		}
	}
	if len(m.Question) != 1 || !strings.EqualFold(m.Question[0].Name, q.Question[0].Name) ||
		m.Question[0].Qtype != q.Question[0].Qtype || !m.Response {
		return nil, errors.New("answer does not match the question")
	}
	return m, nil
}

// exchangeNet runs one exchange over network, bounded by the forward timeout and aborted when ctx
// is canceled (Close).
func (s *Server) exchangeNet(ctx context.Context, network, up string, q *mdns.Msg) (*mdns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	q.Id = mdns.Id()
	c := &mdns.Client{Net: network, Timeout: s.timeout}
	co, err := c.DialContext(ctx, up)
	if err != nil {
		return nil, err
	}
	defer co.Close()
	stop := context.AfterFunc(ctx, func() { co.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	m, _, err := c.ExchangeWithConnContext(ctx, q, co)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%w (%w)", ctx.Err(), err)
		}
		return nil, err
	}
	return m, nil
}

// stripOPT removes the OPT record of an upstream answer; the reply to the client gets its own.
func stripOPT(m *mdns.Msg) {
	extra := m.Extra[:0]
	for _, rr := range m.Extra {
		if rr.Header().Rrtype != mdns.TypeOPT {
			extra = append(extra, rr)
		}
	}
	m.Extra = extra
}

// cacheKey identifies a cached upstream answer.
type cacheKey struct {
	name          string // lowercase fqdn
	qtype, qclass uint16
	do, cd        bool
}

type cacheEntry struct {
	msg     *mdns.Msg // never modified once stored
	stored  time.Time
	expires time.Time
}

// cache holds upstream answers for as long as their TTLs allow, at most size of them; when full,
// a random entry makes room (as CoreDNS's cache does).
type cache struct {
	size int

	mu      sync.Mutex // mu guards entries
	entries map[cacheKey]cacheEntry
}

func newCache(size int) *cache {
	return &cache{size: size, entries: make(map[cacheKey]cacheEntry)}
}

// get returns a copy of the entry for key, its TTLs decreased by the entry's age, or nil.
func (c *cache) get(key cacheKey, now time.Time) *mdns.Msg {
	c.mu.Lock()
	e, ok := c.entries[key]
	if ok && !now.Before(e.expires) {
		delete(c.entries, key)
		ok = false
	}
	c.mu.Unlock()
	if !ok {
		return nil
	}
	m := e.msg.Copy()
	age := uint32(now.Sub(e.stored) / time.Second)
	for _, sec := range [][]mdns.RR{m.Answer, m.Ns, m.Extra} {
		for _, rr := range sec {
			h := rr.Header()
			if h.Ttl > age {
				h.Ttl -= age
			} else {
				h.Ttl = 0
			}
		}
	}
	return m
}

// put stores m under key for its TTL (see cacheTTL); m must not be modified afterwards.
func (c *cache) put(key cacheKey, m *mdns.Msg, now time.Time) {
	ttl := cacheTTL(m)
	if ttl == 0 {
		return
	}
	e := cacheEntry{msg: m, stored: now, expires: now.Add(time.Duration(ttl) * time.Second)}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.entries[key]; !ok && len(c.entries) >= c.size {
		for k := range c.entries {
			delete(c.entries, k)
			break
		}
	}
	c.entries[key] = e
}

// cacheTTL returns how long m may be cached, in seconds, 0 for not at all: the least TTL of the
// answer records for a positive answer; for NXDOMAIN and NODATA the SOA's negative TTL (the lesser
// of its minimum and its own TTL, RFC 2308); capped at maxCacheTTL. Other rcodes, truncated answers
// and negative answers without a SOA are not cached.
func cacheTTL(m *mdns.Msg) uint32 {
	if m.Truncated {
		return 0
	}
	var ttl uint32 = maxCacheTTL
	switch {
	case m.Rcode == mdns.RcodeSuccess && len(m.Answer) > 0:
		for _, rr := range m.Answer {
			ttl = min(ttl, rr.Header().Ttl)
		}
	case m.Rcode == mdns.RcodeSuccess || m.Rcode == mdns.RcodeNameError:
		found := false
		for _, rr := range m.Ns {
			if soa, ok := rr.(*mdns.SOA); ok {
				ttl = min(ttl, soa.Minttl, soa.Hdr.Ttl)
				found = true
			}
		}
		if !found {
			return 0
		}
	default:
		return 0
	}
	return ttl
}

// len returns the number of entries (for tests).
func (c *cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}
