// Package dns owns the mesh's embedded DNS server: it answers for the cluster domain (A/AAAA of
// services, the ready endpoint addresses of headless services, SRV for named ports, PTR for service
// IPs, CNAME for ExternalName services, NXDOMAIN/NODATA with the zone's SOA) from an immutable index
// rebuilt on every catalog snapshot, over UDP (with EDNS0 and truncation) and TCP, and forwards every
// other name to the host's upstream resolvers through a TTL-honouring cache. It also reads those
// upstreams from a resolv.conf.
//
// Server is an mdns.Handler (github.com/miekg/dns), so it can be tested in-process through a
// recorder; Start serves it on a PacketConn and a Listener handed in by the caller (in the agent,
// sockets of the gVisor service netstack at the DNS address). The server's work is bounded whatever
// arrives, and under overload it drops and counts (Stats) rather than stall: over UDP its own read
// loop charges every datagram to its source's rate, answers every query that needs no upstream and
// hands the rest to a fixed pool of workers through a bounded queue, whose replies one writer sends
// (udp.go, limit.go). TCP is served by miekg, with a cap on open connections and timeouts. The
// forwarder bounds its upstream exchanges in flight and shares one exchange among identical
// questions (forward.go).
package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/edgewire/edgewire/discovery"
)

// Defaults of Config.
const (
	DefaultDomain         = "cluster.local"
	DefaultTTL            = 5
	DefaultForwardTimeout = 2 * time.Second
	DefaultCacheSize      = 10000
	DefaultWorkers        = 32
	DefaultQueueLen       = 512
	DefaultMaxForwards    = 64
	DefaultSourceRate     = 10000
	DefaultMaxSources     = 4096
	DefaultMaxTCPConns    = 128
)

// The timeouts of TCP connections (miekg's defaults, made explicit): the first query must arrive
// within tcpReadTimeout of the accept, each next one within tcpIdleTimeout of the last reply, a
// reply must be written within tcpWriteTimeout, and a connection carries at most tcpMaxQueries.
const (
	tcpReadTimeout  = 2 * time.Second
	tcpIdleTimeout  = 8 * time.Second
	tcpWriteTimeout = 2 * time.Second
	tcpMaxQueries   = 128
)

// ednsSize is the UDP payload size the server advertises in its OPT records and the size of its
// UDP read buffer.
const ednsSize = 4096

// Config configures a Server. The zero value of each field means its default.
type Config struct {
	// Logger receives the server's logs; nil discards them.
	Logger *slog.Logger
	// Domain is the cluster domain (default "cluster.local"), matched case-insensitively.
	Domain string
	// TTL is the TTL of cluster answers and the negative TTL of the zone's SOA, in seconds
	// (default 5, as CoreDNS's kubernetes plugin).
	TTL uint32
	// Upstreams are the resolvers ("ip:port", IPv6 bracketed) that names outside the cluster
	// domain are forwarded to, tried in order. Empty: such names get SERVFAIL.
	Upstreams []string
	// ForwardTimeout bounds one exchange with one upstream (default 2 s).
	ForwardTimeout time.Duration
	// CacheSize bounds the number of cached upstream answers (default 10000); negative disables
	// the cache.
	CacheSize int
	// Addr is the server's own address (the agent's DNS IP). When valid, the apex NS record's
	// target ns.dns.<domain> resolves to it. Optional.
	Addr netip.Addr

	// Workers is the number of goroutines answering the UDP queries that need an upstream
	// (forwarding cache misses, CNAMEs chased out of the zone) (default 32). Every other UDP query
	// is answered on the read loop.
	Workers int
	// QueueLen bounds the UDP queries waiting for a worker (default 512); one that does not fit is
	// dropped (Stats.QueueFull).
	QueueLen int
	// MaxForwards bounds the upstream exchanges in flight, UDP, TCP and Lookup together, and so
	// the upstream sockets open (default 64); a query that would start one more gets SERVFAIL
	// (Stats.ForwardRefused).
	MaxForwards int
	// SourceRate is how many UDP datagrams per second one source IP address may send (default
	// 10000); beyond, they are dropped before being parsed (Stats.RateLimited). A query that needs
	// an upstream costs 10 (at most 1000 a second). Each admitted datagram costs the node's one
	// TUN reader the netstack's and the server's work, so under a flood the rate is what the
	// reader spends on the flooder instead of draining the TUN for everyone else. Every process of a node queries from the
	// node's own addresses, so the default is well above the thousands a second a busy node's
	// resolvers ask, and a small part of the 300,000 and more the read loop answers over loopback
	// (BenchmarkUDPThroughput): one flooding source cannot starve the others. Negative: no
	// per-source limit.
	SourceRate int
	// SourceBurst is how many datagrams a source may send at once above its rate (default
	// SourceRate: one second's worth).
	SourceBurst int
	// MaxSources bounds the source addresses whose rates are tracked (default 4096); addresses
	// beyond it share one rate (Stats.Untracked).
	MaxSources int
	// MaxTCPConns bounds the TCP connections served at once (default 128); one accepted beyond it
	// is closed at once (Stats.TCPRefused).
	MaxTCPConns int
}

// limits are the bounds of Config with their defaults applied.
type limits struct {
	workers, queueLen, writeQueueLen, maxForwards int
	sourceRate, sourceBurst, maxSources           int
	maxTCPConns                                   int
}

// newLimits applies the defaults of cfg's bounds and checks them.
func newLimits(cfg Config) (limits, error) {
	l := limits{
		workers:       cfg.Workers,
		queueLen:      cfg.QueueLen,
		writeQueueLen: writeQueueLen,
		maxForwards:   cfg.MaxForwards,
		sourceRate:    cfg.SourceRate,
		sourceBurst:   cfg.SourceBurst,
		maxSources:    cfg.MaxSources,
		maxTCPConns:   cfg.MaxTCPConns,
	}
	if l.sourceRate == 0 {
		l.sourceRate = DefaultSourceRate
	}
	for _, f := range []struct {
		name string
		v    *int
		def  int
	}{
		{"workers", &l.workers, DefaultWorkers},
		{"queue length", &l.queueLen, DefaultQueueLen},
		{"max forwards", &l.maxForwards, DefaultMaxForwards},
		{"source burst", &l.sourceBurst, max(l.sourceRate, 1)},
		{"max sources", &l.maxSources, DefaultMaxSources},
		{"max TCP conns", &l.maxTCPConns, DefaultMaxTCPConns},
	} {
		if *f.v < 0 {
			return limits{}, fmt.Errorf("dns: negative %s %d", f.name, *f.v)
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	return l, nil
}

// Stats are the server's counters since New. Every query handled is counted in Queries and in
// exactly one of Cluster, Forwarded, CacheHits, FormErr, NotImp, ServFail and Refused; NXDomain
// counts a subset of Cluster, Coalesced a subset of Forwarded. Datagrams dropped (Dropped,
// RateLimited, QueueFull, Expired) were never handled and are not in Queries: every datagram read
// is counted once, in Queries or in one of them. ReplyDropped counts replies of handled queries
// that were not sent; ForwardRefused, Untracked, TCPRefused and ReadErrors count events, not
// queries.
type Stats struct {
	Queries   uint64 // queries handled, including the malformed ones answered with FORMERR/NOTIMP
	Cluster   uint64 // answered from the cluster records (positive, NODATA or NXDOMAIN)
	NXDomain  uint64 // NXDOMAIN answers for names in the cluster domain
	Forwarded uint64 // answered by an upstream (cache misses)
	CacheHits uint64 // answered from the forwarding cache
	FormErr   uint64 // malformed queries answered with FORMERR (or BADVERS for EDNS versions > 0)
	NotImp    uint64 // queries of an unsupported opcode answered with NOTIMP
	ServFail  uint64 // outside names no upstream answered (none configured, MaxForwards reached)
	Refused   uint64 // cluster names asked in a class other than IN/ANY

	// Dropped counts UDP datagrams that get no reply because none is possible or safe: shorter
	// than a DNS header, or responses (QR set: answering could start a loop with another server).
	Dropped uint64
	// RateLimited counts UDP datagrams dropped unread because their source was over SourceRate.
	RateLimited uint64
	// QueueFull counts UDP queries needing an upstream dropped because QueueLen were waiting.
	QueueFull uint64
	// Expired counts UDP queries dropped after waiting for a worker longer than their client would.
	Expired uint64
	// ReplyDropped counts UDP replies not sent: the writer's queue was full, or the write failed.
	ReplyDropped uint64
	// ForwardRefused counts upstream exchanges not started because MaxForwards were in flight: the
	// query got SERVFAIL (a CNAME chased out of the zone, the CNAME alone).
	ForwardRefused uint64
	// Coalesced counts forwarded answers taken from an identical question's exchange in flight.
	Coalesced uint64
	// Untracked counts UDP datagrams from sources beyond MaxSources, limited together.
	Untracked uint64
	// TCPRefused counts TCP connections closed on accept because MaxTCPConns were open.
	TCPRefused uint64
	// ReadErrors counts failed reads of the UDP conn other than its closing.
	ReadErrors uint64
	// Policed counts UDP datagrams refused by AdmitDatagram before they reached the socket (they
	// were never read, so they are in no other counter).
	Policed uint64
}

// Server is the DNS server. Its methods are safe for concurrent use.
//
// States: new → (Start) → serving → (Close) → closed; Close also goes straight from new to closed.
// Update, ServeDNS, Lookup and Stats work in every state (Lookup fails once closed).
type Server struct {
	logger    *slog.Logger
	zone      string // lowercase fqdn
	dotZone   string
	ttl       uint32
	self      netip.Addr
	upstreams []string
	timeout   time.Duration
	cache     *cache // nil when disabled
	now       func() time.Time
	limits    limits

	forwardSlots chan struct{} // one token per upstream exchange in flight

	flightMu sync.Mutex           // flightMu guards flights
	flights  map[cacheKey]*flight // the upstream exchanges in flight, by question

	idx atomic.Pointer[index]

	ctx    context.Context // canceled by Close: aborts upstream exchanges
	cancel context.CancelFunc
	wg     sync.WaitGroup // the serving goroutines started by Start

	queries, cluster, nxdomain, forwarded, cacheHits             atomic.Uint64
	formErr, notImp, servFail, refused, dropped                  atomic.Uint64
	rateLimited, queueFull, expired, replyDropped                atomic.Uint64
	forwardRefused, coalesced, untracked, tcpRefused, readErrors atomic.Uint64
	policed                                                      atomic.Uint64

	admit *admission // nil when SourceRate < 0

	forwardLog, writeLog, readLog, limitLog rateLimit

	mu      sync.Mutex // mu guards all following fields
	started bool
	closed  bool
	udp     *udpServer
	tcp     *mdns.Server
}

var _ mdns.Handler = (*Server)(nil)

// New validates cfg and returns a server with an empty catalog. It starts nothing.
func New(cfg Config) (*Server, error) {
	domain := strings.TrimSuffix(strings.ToLower(cfg.Domain), ".")
	if domain == "" {
		domain = DefaultDomain
	}
	if _, ok := mdns.IsDomainName(domain); !ok || strings.Contains(domain, "..") || !isDNSName(domain) {
		return nil, fmt.Errorf("dns: domain %q is not a domain name", cfg.Domain)
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.ForwardTimeout < 0 {
		return nil, fmt.Errorf("dns: negative forward timeout %v", cfg.ForwardTimeout)
	}
	if cfg.ForwardTimeout == 0 {
		cfg.ForwardTimeout = DefaultForwardTimeout
	}
	if cfg.CacheSize == 0 {
		cfg.CacheSize = DefaultCacheSize
	}
	lim, err := newLimits(cfg)
	if err != nil {
		return nil, err
	}
	ups := make([]string, 0, len(cfg.Upstreams))
	for _, u := range cfg.Upstreams {
		ap, err := netip.ParseAddrPort(u)
		if err != nil {
			return nil, fmt.Errorf("dns: upstream %q: want ip:port: %w", u, err)
		}
		if ap.Port() == 0 {
			return nil, fmt.Errorf("dns: upstream %q: port 0", u)
		}
		ups = append(ups, ap.String())
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		logger:    logger.With("component", "dns"),
		zone:      domain + ".",
		dotZone:   "." + domain + ".",
		ttl:       cfg.TTL,
		self:      cfg.Addr,
		upstreams: ups,
		timeout:   cfg.ForwardTimeout,
		now:       time.Now,
		limits:    lim,
		ctx:       ctx,
		cancel:    cancel,

		forwardSlots: make(chan struct{}, lim.maxForwards),
		flights:      make(map[cacheKey]*flight),
	}
	if cfg.CacheSize > 0 {
		s.cache = newCache(cfg.CacheSize)
	}
	if lim.sourceRate > 0 {
		s.admit = &admission{limiter: newSourceLimiter(lim.sourceRate, lim.sourceBurst, lim.maxSources), epoch: time.Now()}
	}
	s.idx.Store(buildIndex(nil, s.zone, s.ttl, s.self, serialNow(s.now())))
	return s, nil
}

// isDNSName reports whether every label of the dotted name d is a valid label.
func isDNSName(d string) bool {
	for l := range strings.SplitSeq(d, ".") {
		if !isLabel(l) {
			return false
		}
	}
	return true
}

// Update replaces the cluster records with those of snap (nil: an empty catalog). Queries see
// either the old records or the new ones, never a mix. snap is not modified or retained.
func (s *Server) Update(snap *discovery.Snapshot) {
	start := time.Now()
	idx := buildIndex(snap, s.zone, s.ttl, s.self, serialNow(s.now()))
	s.idx.Store(idx)
	if idx.skipped > 0 {
		s.logger.Warn("services without a DNS name skipped", "count", idx.skipped)
	}
	s.logger.Debug("records updated", "names", len(idx.names), "took", time.Since(start))
}

// Start serves DNS on pc (UDP) and ln (TCP) until Close; either may be nil, not both. The server
// owns pc and ln from then on: Close closes them (as does a failed Start). Start returns once both
// are being served.
func (s *Server) Start(pc net.PacketConn, ln net.Listener) error {
	if pc == nil && ln == nil {
		return errors.New("dns: start: no packet conn and no listener")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("dns: start: %w", net.ErrClosed)
	}
	if s.started {
		return errors.New("dns: start: already started")
	}
	s.started = true
	if pc != nil {
		u, err := s.newUDPServer(pc)
		if err != nil {
			pc.Close()
			if ln != nil {
				ln.Close()
			}
			return fmt.Errorf("dns: serve udp %v: %w", pc.LocalAddr(), err)
		}
		u.start(&s.wg)
		s.udp = u
		s.logger.Info("dns serving", "net", "udp", "addr", pc.LocalAddr(), "workers", s.limits.workers,
			"queue", s.limits.queueLen, "source_rate", s.limits.sourceRate)
	}
	if ln != nil {
		lim := &limitListener{Listener: ln, slots: make(chan struct{}, s.limits.maxTCPConns),
			refused: func() { s.tcpRefused.Add(1) }}
		srv := &mdns.Server{
			Handler:        s,
			Listener:       lim,
			MsgAcceptFunc:  s.accept,
			MsgInvalidFunc: s.invalid,
			ReadTimeout:    tcpReadTimeout,
			WriteTimeout:   tcpWriteTimeout,
			IdleTimeout:    func() time.Duration { return tcpIdleTimeout },
			MaxTCPQueries:  tcpMaxQueries,
		}
		if err := s.serveLocked(srv, "tcp", ln.Addr()); err != nil {
			s.shutdownLocked()
			return err
		}
		s.tcp = srv
	}
	return nil
}

// serveLocked runs srv in a goroutine and waits until it serves or fails to start.
func (s *Server) serveLocked(srv *mdns.Server, network string, addr net.Addr) error {
	started := make(chan struct{})
	failed := make(chan error, 1)
	srv.NotifyStartedFunc = func() { close(started) }
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		err := srv.ActivateAndServe()
		select {
		case <-started:
			if err != nil {
				s.logger.Error("dns serving stopped", "net", network, "addr", addr, "err", err)
			}
		default:
			if err == nil {
				err = errors.New("stopped before serving")
			}
			failed <- err
		}
	}()
	select {
	case <-started:
		s.logger.Info("dns serving", "net", network, "addr", addr, "max_conns", s.limits.maxTCPConns)
		return nil
	case err := <-failed:
		return fmt.Errorf("dns: serve %s %v: %w", network, addr, err)
	}
}

// Close stops serving, closes the conns given to Start, aborts upstream exchanges in flight and
// waits for every goroutine the server started. It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.cancel()
	err := s.shutdownLocked()
	s.mu.Unlock()
	s.wg.Wait()
	return err
}

// shutdownLocked stops serving UDP and TCP and forgets the servers.
func (s *Server) shutdownLocked() error {
	var errs []error
	if s.udp != nil {
		if err := s.udp.stop(); err != nil {
			errs = append(errs, err)
		}
		s.udp = nil
	}
	if s.tcp != nil {
		if err := s.tcp.Shutdown(); err != nil {
			errs = append(errs, fmt.Errorf("shut tcp down: %w", err))
		}
		s.tcp = nil
	}
	if len(errs) > 0 {
		return fmt.Errorf("dns: close: %w", errors.Join(errs...))
	}
	return nil
}

// Stats returns a copy of the counters.
func (s *Server) Stats() Stats {
	return Stats{
		Queries:   s.queries.Load(),
		Cluster:   s.cluster.Load(),
		NXDomain:  s.nxdomain.Load(),
		Forwarded: s.forwarded.Load(),
		CacheHits: s.cacheHits.Load(),
		FormErr:   s.formErr.Load(),
		NotImp:    s.notImp.Load(),
		ServFail:  s.servFail.Load(),
		Refused:   s.refused.Load(),

		Dropped:        s.dropped.Load(),
		RateLimited:    s.rateLimited.Load(),
		Policed:        s.policed.Load(),
		QueueFull:      s.queueFull.Load(),
		Expired:        s.expired.Load(),
		ReplyDropped:   s.replyDropped.Load(),
		ForwardRefused: s.forwardRefused.Load(),
		Coalesced:      s.coalesced.Load(),
		Untracked:      s.untracked.Load(),
		TCPRefused:     s.tcpRefused.Load(),
		ReadErrors:     s.readErrors.Load(),
	}
}

// Lookup runs one query for name (made fully qualified) and qtype through the handler, in-process,
// as if it came over TCP (no truncation), and returns the reply. It is what `meshctl resolve`
// shows. ctx bounds upstream exchanges.
func (s *Server) Lookup(ctx context.Context, name string, qtype uint16) (*mdns.Msg, error) {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return nil, fmt.Errorf("dns: lookup %s: %w", name, net.ErrClosed)
	}
	if name == "" {
		return nil, errors.New("dns: lookup: empty name")
	}
	fq := mdns.Fqdn(name)
	if _, ok := mdns.IsDomainName(fq); !ok {
		return nil, fmt.Errorf("dns: lookup %q: not a domain name", name)
	}
	r := new(mdns.Msg)
	r.SetQuestion(fq, qtype)
	m := s.reply(ctx, r, true)
	if m == nil {
		return nil, fmt.Errorf("dns: lookup %s: no reply", name)
	}
	return m, nil
}

// accept is the miekg MsgAcceptFunc, also used by the UDP read loop: it decides from the header
// alone. Unlike miekg's default, a message that is a response gets FORMERR rather than silence
// over TCP (the UDP loop drops responses before asking), as does one with a question count other
// than 1, and every rejection is counted.
func (s *Server) accept(dh mdns.Header) mdns.MsgAcceptAction {
	action := acceptAction(dh)
	switch action {
	case mdns.MsgReject:
		s.queries.Add(1)
		s.formErr.Add(1)
	case mdns.MsgRejectNotImplemented:
		s.queries.Add(1)
		s.notImp.Add(1)
	}
	return action
}

// acceptAction is what accept decides, without counting.
func acceptAction(dh mdns.Header) mdns.MsgAcceptAction {
	const qr = 1 << 15
	opcode := int(dh.Bits>>11) & 0xF
	switch {
	case dh.Bits&qr != 0, dh.Qdcount != 1, dh.Ancount > 1, dh.Nscount > 1, dh.Arcount > 2:
		return mdns.MsgReject
	case opcode != mdns.OpcodeQuery:
		return mdns.MsgRejectNotImplemented
	}
	return mdns.MsgAccept
}

// invalid is the miekg MsgInvalidFunc, also used by the UDP read loop. It is called for a packet
// shorter than a header (no reply is sent) and for an accepted header whose body does not parse
// (FORMERR is sent).
func (s *Server) invalid(m []byte, err error) {
	if len(m) < 12 {
		s.dropped.Add(1)
		return
	}
	s.queries.Add(1)
	s.formErr.Add(1)
}

// rateLimit lets one log line through per interval.
type rateLimit struct{ last atomic.Int64 }

const logInterval = 10 * time.Second

func (r *rateLimit) allow(now time.Time) bool {
	last := r.last.Load()
	if now.UnixNano()-last < int64(logInterval) {
		return false
	}
	return r.last.CompareAndSwap(last, now.UnixNano())
}
