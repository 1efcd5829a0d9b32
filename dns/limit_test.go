package dns

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

func TestSourceLimiter(t *testing.T) {
	a, b, c := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.3")
	type step struct {
		at          time.Duration
		ip          netip.Addr
		n           int // datagrams sent at once
		wantOK      int
		wantTracked bool
	}
	tests := []struct {
		name       string
		rate       int
		burst      int
		maxSources int
		steps      []step
	}{
		{
			name: "burst then the rate", rate: 10, burst: 5, maxSources: 4,
			steps: []step{
				{at: 0, ip: a, n: 8, wantOK: 5, wantTracked: true},
				{at: 100 * time.Millisecond, ip: a, n: 3, wantOK: 1, wantTracked: true},
				{at: 350 * time.Millisecond, ip: a, n: 3, wantOK: 2, wantTracked: true},
				{at: 10 * time.Second, ip: a, n: 9, wantOK: 5, wantTracked: true}, // refilled to the burst, no more
			},
		},
		{
			name: "sources are limited apart", rate: 10, burst: 2, maxSources: 4,
			steps: []step{
				{at: 0, ip: a, n: 5, wantOK: 2, wantTracked: true},
				{at: 0, ip: b, n: 5, wantOK: 2, wantTracked: true},
				{at: 0, ip: a, n: 1, wantOK: 0, wantTracked: true},
			},
		},
		{
			name: "sources beyond the map share one bucket", rate: 10, burst: 3, maxSources: 1,
			steps: []step{
				{at: 0, ip: a, n: 1, wantOK: 1, wantTracked: true},
				{at: 0, ip: b, n: 2, wantOK: 2, wantTracked: false},
				{at: 0, ip: c, n: 2, wantOK: 1, wantTracked: false}, // the third token of the shared bucket
			},
		},
		{
			name: "a sweep forgets the idle sources", rate: 10, burst: 3, maxSources: 1,
			steps: []step{
				{at: 0, ip: a, n: 3, wantOK: 3, wantTracked: true},
				{at: 50 * time.Millisecond, ip: b, n: 1, wantOK: 1, wantTracked: false}, // a is not refilled
				{at: 400 * time.Millisecond, ip: b, n: 1, wantOK: 1, wantTracked: true}, // a is, and is forgotten
				{at: 400 * time.Millisecond, ip: a, n: 1, wantOK: 1, wantTracked: false},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := newSourceLimiter(tc.rate, tc.burst, tc.maxSources)
			for i, st := range tc.steps {
				ok := 0
				for range st.n {
					b, tracked := l.bucket(st.ip, int64(st.at))
					if tracked != st.wantTracked {
						t.Fatalf("step %d: tracked %v, want %v", i, tracked, st.wantTracked)
					}
					if b.take(1) {
						ok++
					}
				}
				if ok != st.wantOK {
					t.Errorf("step %d (%v at %v): %d of %d allowed, want %d", i, st.ip, st.at, ok, st.n, st.wantOK)
				}
				if len(l.sources) > tc.maxSources {
					t.Fatalf("step %d: %d sources tracked, more than %d", i, len(l.sources), tc.maxSources)
				}
			}
		})
	}
}

// silentUpstream is a resolver that reads queries and never answers; the test reads them.
func silentUpstream(t *testing.T) net.PacketConn {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc
}

// awaitQueries reads n queries from a silent upstream and returns their names.
func awaitQueries(t *testing.T, up net.PacketConn, n int) []string {
	t.Helper()
	var names []string
	buf := make([]byte, 4096)
	for range n {
		up.SetReadDeadline(time.Now().Add(5 * time.Second))
		k, _, err := up.ReadFrom(buf)
		if err != nil {
			t.Fatalf("upstream got %d queries of %d: %v", len(names), n, err)
		}
		m := new(mdns.Msg)
		if err := m.Unpack(buf[:k]); err != nil {
			t.Fatalf("upstream got a bad query: %v", err)
		}
		names = append(names, m.Question[0].Name)
	}
	return names
}

// client is a UDP socket bound to a loopback address of its own, talking to the server.
type client struct {
	t    *testing.T
	conn *net.UDPConn
	buf  []byte
}

func newClient(t *testing.T, from, server string) *client {
	t.Helper()
	conn, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(from), 0)),
		net.UDPAddrFromAddrPort(netip.MustParseAddrPort(server)))
	if err != nil {
		t.Fatalf("client from %s: %v", from, err)
	}
	t.Cleanup(func() { conn.Close() })
	return &client{t: t, conn: conn, buf: make([]byte, 65535)}
}

// send sends a query for name with the given ID.
func (c *client) send(name string, qtype uint16, id uint16) {
	c.t.Helper()
	q := query(name, qtype, 0)
	q.Id = id
	b, err := q.Pack()
	if err != nil {
		c.t.Fatal(err)
	}
	if _, err := c.conn.Write(b); err != nil {
		c.t.Fatal(err)
	}
}

// recv returns the next reply, or nil when none comes within wait.
func (c *client) recv(wait time.Duration) *mdns.Msg {
	c.t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(wait))
	n, err := c.conn.Read(c.buf)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil
		}
		c.t.Fatalf("read: %v", err)
	}
	m := new(mdns.Msg)
	if err := m.Unpack(c.buf[:n]); err != nil {
		c.t.Fatalf("reply does not parse: %v", err)
	}
	return m
}

// ask sends a query and returns its reply, failing the test when none comes within 5 s.
func (c *client) ask(name string, qtype uint16, id uint16) *mdns.Msg {
	c.t.Helper()
	c.send(name, qtype, id)
	for {
		m := c.recv(5 * time.Second)
		if m == nil {
			c.t.Fatalf("no reply to %s (id %d)", name, id)
		}
		if m.Id == id {
			return m
		}
	}
}

// TestQueueFull fills the workers' queue behind a silent upstream: the queries that do not fit are
// dropped and counted, and the read loop keeps answering the cluster's names.
func TestQueueFull(t *testing.T) {
	up := silentUpstream(t)
	s := newTestServer(t, Config{Upstreams: []string{up.LocalAddr().String()}, ForwardTimeout: time.Minute, Workers: 1, QueueLen: 2})
	udp, _ := startServer(t, s, true)
	c := newClient(t, "127.0.0.1", udp)

	c.send("x0.example.", mdns.TypeA, 1)
	awaitQueries(t, up, 1) // the one worker is busy
	const more = 9
	for i := range more {
		c.send(fmt.Sprintf("x%d.example.", i+1), mdns.TypeA, uint16(2+i))
	}
	waitFor(t, "the queries beyond the queue to be dropped", func() bool { return s.Stats().QueueFull == more-2 })
	if n := len(s.udp.work); n != 2 {
		t.Errorf("%d queries queued, want the queue's 2", n)
	}
	if m := c.ask("web.default.svc.cluster.local.", mdns.TypeA, 100); len(m.Answer) != 1 {
		t.Errorf("cluster name with the queue full: %s", describe(m))
	}
	st := s.Stats()
	if st.QueueFull != more-2 || st.Queries != 1 || st.Cluster != 1 {
		t.Errorf("stats %+v: want %d dropped for a full queue and the one cluster query answered", st, more-2)
	}
}

// TestQueueExpired lets a query wait for the worker longer than a client would: the worker drops it.
func TestQueueExpired(t *testing.T) {
	up := silentUpstream(t)
	clock := &fakeClock{t: time.Unix(1_700_000_000, 0)}
	s := newTestServer(t, Config{Upstreams: []string{up.LocalAddr().String()}, ForwardTimeout: 300 * time.Millisecond, Workers: 1})
	s.now = clock.Now
	udp, _ := startServer(t, s, true)
	c := newClient(t, "127.0.0.1", udp)

	c.send("first.example.", mdns.TypeA, 1)
	awaitQueries(t, up, 1)
	c.send("late.example.", mdns.TypeA, 2)
	waitFor(t, "the second query to be queued", func() bool { return len(s.udp.work) == 1 })
	clock.Advance(maxQueueWait + time.Second)
	if m := c.recv(5 * time.Second); m == nil || m.Id != 1 || m.Rcode != mdns.RcodeServerFailure {
		t.Fatalf("reply %s: want SERVFAIL for the first query, its upstream silent", describe(m))
	}
	waitFor(t, "the late query to expire", func() bool { return s.Stats().Expired == 1 })
	if st := s.Stats(); st.Queries != 1 || st.ServFail != 1 {
		t.Errorf("stats %+v: want 1 query (SERVFAIL) and 1 expired", st)
	}
	up.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if _, _, err := up.ReadFrom(make([]byte, 512)); err == nil {
		t.Errorf("the expired query reached the upstream")
	}
}

// TestRateLimitedSource floods from one address while another gets its answers; a frozen clock
// makes the budgets exact.
func TestRateLimitedSource(t *testing.T) {
	tests := []struct {
		name          string
		maxSources    int
		wantUntracked bool // the second source shares the bucket of the sources left out
	}{
		{name: "sources tracked apart", maxSources: 4},
		{name: "second source beyond the map", maxSources: 1, wantUntracked: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			const burst, flood = 50, 500
			clock := &fakeClock{t: time.Unix(1_700_000_000, 0)}
			s := newTestServer(t, Config{SourceRate: 10, SourceBurst: burst, MaxSources: tc.maxSources})
			s.now = clock.Now
			udp, _ := startServer(t, s, true)
			flooder := newClient(t, "127.0.0.1", udp)
			other := newClient(t, "127.0.0.2", udp)

			// In rounds the socket buffers hold, each read by the server before the next.
			for sent := 0; sent < flood; {
				for range 50 {
					flooder.send("web.default.svc.cluster.local.", mdns.TypeA, uint16(sent))
					sent++
				}
				waitFor(t, "the round to be read", func() bool {
					st := s.Stats()
					return st.Queries+st.RateLimited == uint64(sent)
				})
			}
			st := s.Stats()
			if st.Queries != burst || st.RateLimited != flood-burst {
				t.Fatalf("stats %+v: want the burst (%d) answered and the other %d rate-limited", st, burst, flood-burst)
			}
			for i := range burst {
				if m := other.ask("web.default.svc.cluster.local.", mdns.TypeA, uint16(i)); len(m.Answer) != 1 {
					t.Fatalf("other source, query %d: %s", i, describe(m))
				}
			}
			wantUntracked := uint64(0)
			if tc.wantUntracked {
				wantUntracked = burst
			}
			if got := s.Stats().Untracked; got != wantUntracked {
				t.Errorf("untracked %d, want %d", got, wantUntracked)
			}
			clock.Advance(time.Second) // 10 more tokens
			if m := flooder.ask("web.default.svc.cluster.local.", mdns.TypeA, 9999); len(m.Answer) != 1 {
				t.Errorf("flooder after a second: %s", describe(m))
			}
		})
	}
}

// TestForwardCap holds MaxForwards exchanges at a silent upstream: the next query gets SERVFAIL at
// once, counted, without reaching the upstream.
func TestForwardCap(t *testing.T) {
	up := silentUpstream(t)
	s := newTestServer(t, Config{Upstreams: []string{up.LocalAddr().String()}, ForwardTimeout: time.Minute, Workers: 4, MaxForwards: 2})
	udp, _ := startServer(t, s, true)
	c := newClient(t, "127.0.0.1", udp)
	c.send("a.example.", mdns.TypeA, 1)
	c.send("b.example.", mdns.TypeA, 2)
	awaitQueries(t, up, 2)
	if m := c.ask("c.example.", mdns.TypeA, 3); m.Rcode != mdns.RcodeServerFailure {
		t.Fatalf("third query: %s, want SERVFAIL", describe(m))
	}
	// Lookup shares the cap.
	if m, err := s.Lookup(context.Background(), "d.example.", mdns.TypeA); err != nil || m.Rcode != mdns.RcodeServerFailure {
		t.Fatalf("lookup: %v %s, want SERVFAIL", err, describe(m))
	}
	st := s.Stats()
	if st.ForwardRefused != 2 || st.ServFail != 2 {
		t.Errorf("stats %+v: want 2 refused by the cap, answered SERVFAIL", st)
	}
	up.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if _, _, err := up.ReadFrom(make([]byte, 512)); err == nil {
		t.Errorf("a query beyond the cap reached the upstream")
	}
}

// heldUpstream answers A queries with 192.0.2.1 once released, counting what it is asked.
type heldUpstream struct {
	pc      net.PacketConn
	release chan struct{}
	once    sync.Once
	mu      sync.Mutex
	asked   int
}

func (u *heldUpstream) open() { u.once.Do(func() { close(u.release) }) }

func startHeldUpstream(t *testing.T) *heldUpstream {
	u := &heldUpstream{pc: silentUpstream(t), release: make(chan struct{})}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, from, err := u.pc.ReadFrom(buf)
			if err != nil {
				return
			}
			q := new(mdns.Msg)
			if q.Unpack(buf[:n]) != nil {
				continue
			}
			u.mu.Lock()
			u.asked++
			u.mu.Unlock()
			<-u.release
			m := new(mdns.Msg)
			m.SetReply(q)
			m.Answer = []mdns.RR{mustRR(q.Question[0].Name + " 60 IN A 192.0.2.1")}
			b, _ := m.Pack()
			u.pc.WriteTo(b, from)
		}
	}()
	t.Cleanup(func() { u.open(); u.pc.Close(); <-done })
	return u
}

// TestForwardCoalesces asks one name five times while its exchange is held: one upstream query.
func TestForwardCoalesces(t *testing.T) {
	up := startHeldUpstream(t)
	s := newTestServer(t, Config{Upstreams: []string{up.pc.LocalAddr().String()}, CacheSize: -1})
	const n = 5
	replies := make(chan *mdns.Msg, n)
	for range n {
		go func() {
			m, err := s.Lookup(context.Background(), "same.example.", mdns.TypeA)
			if err != nil {
				t.Error(err)
			}
			replies <- m
		}()
	}
	key := cacheKey{name: "same.example.", qtype: mdns.TypeA, qclass: mdns.ClassINET}
	waitFor(t, "the lookups to wait for one exchange", func() bool {
		s.flightMu.Lock()
		defer s.flightMu.Unlock()
		f := s.flights[key]
		return f != nil && f.waiters == n-1
	})
	up.open()
	for range n {
		if m := <-replies; m == nil || len(m.Answer) != 1 {
			t.Errorf("reply %s: want the upstream's address", describe(m))
		}
	}
	up.mu.Lock()
	asked := up.asked
	up.mu.Unlock()
	if st := s.Stats(); asked != 1 || st.Forwarded != n || st.Coalesced != n-1 {
		t.Errorf("upstream asked %d times, stats %+v: want 1 exchange, %d forwarded, %d coalesced", asked, st, n, n-1)
	}
}

// TestMalformedFloodBounded floods random datagrams (through the rate limit) and checks every one
// is counted once and the server starts no goroutine for any.
func TestMalformedFloodBounded(t *testing.T) {
	s := newTestServer(t, Config{SourceRate: 2000})
	udp, _ := startServer(t, s, true)
	c := newClient(t, "127.0.0.1", udp)
	base := runtime.NumGoroutine()
	peak := base
	rng := rand.New(rand.NewPCG(1, 2))
	pkt := make([]byte, 512)
	const total, round = 10000, 50
	for sent := 0; sent < total; {
		for range round {
			n := rng.IntN(len(pkt))
			for i := range n {
				pkt[i] = byte(rng.Uint32())
			}
			if _, err := c.conn.Write(pkt[:n]); err != nil {
				t.Fatal(err)
			}
			sent++
		}
		waitFor(t, "the round to be read", func() bool { return counted(s.Stats()) == uint64(sent) })
		peak = max(peak, runtime.NumGoroutine())
		for c.recv(time.Millisecond) != nil {
		}
	}
	st := s.Stats()
	if st.RateLimited == 0 || st.FormErr+st.Dropped == 0 {
		t.Errorf("stats %+v: want datagrams rate-limited and malformed ones answered or dropped", st)
	}
	if peak > base {
		t.Errorf("goroutines rose from %d to %d during the flood", base, peak)
	}
}

// counted is the number of datagrams the server has read and accounted for.
func counted(st Stats) uint64 {
	return st.Queries + st.Dropped + st.RateLimited + st.QueueFull + st.Expired
}

// TestTCPConnCap holds MaxTCPConns connections open: the next one is closed at accept, counted,
// and a slot freed serves again.
func TestTCPConnCap(t *testing.T) {
	s := newTestServer(t, Config{MaxTCPConns: 2})
	_, tcp := startServer(t, s, true)
	dial := func() *mdns.Conn {
		t.Helper()
		co, err := mdns.DialTimeout("tcp", tcp, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { co.Close() })
		return co
	}
	askTCP := func(co *mdns.Conn) error {
		co.SetDeadline(time.Now().Add(5 * time.Second))
		if err := co.WriteMsg(query("web.default.svc.cluster.local.", mdns.TypeA, 0)); err != nil {
			return err
		}
		m, err := co.ReadMsg()
		if err == nil && len(m.Answer) != 1 {
			err = fmt.Errorf("reply %s", describe(m))
		}
		return err
	}
	first, second := dial(), dial()
	third := dial()
	waitFor(t, "the third connection to be refused", func() bool { return s.Stats().TCPRefused == 1 })
	if err := askTCP(third); err == nil {
		t.Errorf("the refused connection was answered")
	}
	for i, co := range []*mdns.Conn{first, second} {
		if err := askTCP(co); err != nil {
			t.Fatalf("connection %d: %v", i+1, err)
		}
	}
	first.Close()
	waitFor(t, "a freed slot to serve a new connection", func() bool { return askTCP(dial()) == nil })
}

func TestLimitDefaults(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want limits
	}{
		{name: "zero config", want: limits{workers: DefaultWorkers, queueLen: DefaultQueueLen, writeQueueLen: writeQueueLen,
			maxForwards: DefaultMaxForwards, sourceRate: DefaultSourceRate, sourceBurst: DefaultSourceRate,
			maxSources: DefaultMaxSources, maxTCPConns: DefaultMaxTCPConns}},
		{name: "burst follows the rate", cfg: Config{SourceRate: 300}, want: limits{workers: DefaultWorkers, queueLen: DefaultQueueLen,
			writeQueueLen: writeQueueLen, maxForwards: DefaultMaxForwards, sourceRate: 300, sourceBurst: 300,
			maxSources: DefaultMaxSources, maxTCPConns: DefaultMaxTCPConns}},
		{name: "given values kept", cfg: Config{Workers: 3, QueueLen: 4, MaxForwards: 5, SourceRate: 6, SourceBurst: 7, MaxSources: 8, MaxTCPConns: 9},
			want: limits{workers: 3, queueLen: 4, writeQueueLen: writeQueueLen, maxForwards: 5, sourceRate: 6, sourceBurst: 7, maxSources: 8, maxTCPConns: 9}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := newLimits(tc.cfg)
			if err != nil || got != tc.want {
				t.Errorf("newLimits = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
	// A negative rate turns the limiter off.
	s := newTestServer(t, Config{SourceRate: -1})
	startServer(t, s, true)
	if s.udp.limiter != nil {
		t.Errorf("limiter present with SourceRate -1")
	}
}

// blockingConn is a PacketConn whose reads come from a channel (a datagram, or an error to return)
// and whose writes wait for a gate, or fail with writeErr when set.
type blockingConn struct {
	in       chan any
	writeErr error
	gate     chan struct{}
	writing  chan struct{} // gets a value when a write starts waiting
	closed   chan struct{}
	once     sync.Once
}

func newBlockingConn() *blockingConn {
	return &blockingConn{in: make(chan any, 16), gate: make(chan struct{}), writing: make(chan struct{}, 16), closed: make(chan struct{})}
}

var blockingAddr = &net.UDPAddr{IP: net.IPv4(127, 0, 0, 9), Port: 5353}

func (c *blockingConn) ReadFrom(b []byte) (int, net.Addr, error) {
	select {
	case p := <-c.in:
		if err, ok := p.(error); ok {
			return 0, nil, err
		}
		return copy(b, p.([]byte)), blockingAddr, nil
	case <-c.closed:
		return 0, nil, net.ErrClosed
	}
}

func (c *blockingConn) WriteTo(b []byte, _ net.Addr) (int, error) {
	if c.writeErr != nil {
		return 0, c.writeErr
	}
	c.writing <- struct{}{}
	select {
	case <-c.gate:
		return len(b), nil
	case <-c.closed:
		return 0, net.ErrClosed
	}
}

func (c *blockingConn) Close() error { c.once.Do(func() { close(c.closed) }); return nil }
func (c *blockingConn) LocalAddr() net.Addr {
	return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 8), Port: 53}
}
func (c *blockingConn) SetDeadline(time.Time) error      { return nil }
func (c *blockingConn) SetReadDeadline(time.Time) error  { return nil }
func (c *blockingConn) SetWriteDeadline(time.Time) error { return nil }

// TestWriterQueueFull blocks the writer in a write: the workers' replies beyond its queue are
// dropped and counted.
func TestWriterQueueFull(t *testing.T) {
	up := startUpstream(t, false)
	s := newTestServer(t, Config{Upstreams: []string{up.addr}, CacheSize: -1})
	s.limits.writeQueueLen = 1
	conn := newBlockingConn()
	if err := s.Start(conn, nil); err != nil {
		t.Fatal(err)
	}
	ask := func(id uint16) {
		q := query("example.com.", mdns.TypeA, 0)
		q.Id = id
		b, err := q.Pack()
		if err != nil {
			t.Fatal(err)
		}
		conn.in <- b
	}
	ask(1)
	<-conn.writing // the writer holds the first reply
	ask(2)
	waitFor(t, "the second reply to be queued", func() bool { return len(s.udp.out) == 1 })
	ask(3)
	waitFor(t, "the third reply to be dropped", func() bool { return s.Stats().ReplyDropped == 1 })
	if st := s.Stats(); st.Forwarded != 3 {
		t.Errorf("stats %+v: want the 3 queries answered", st)
	}
	close(conn.gate)
}

// TestWildcardUDP serves on a socket bound to every address: the replies leave from the address
// the query came to.
func TestWildcardUDP(t *testing.T) {
	s := newTestServer(t, Config{})
	pc, err := net.ListenPacket("udp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(pc, nil); err != nil {
		pc.Close()
		t.Fatal(err)
	}
	if _, ok := s.udp.conn.(sessionConn); !ok {
		t.Fatalf("conn %T, want a sessionConn", s.udp.conn)
	}
	port := pc.LocalAddr().(*net.UDPAddr).Port
	for _, dst := range []string{"127.0.0.1", "127.0.0.3"} {
		t.Run(dst, func(t *testing.T) {
			// An unconnected socket: it shows where the reply came from.
			c, err := net.ListenPacket("udp4", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			b, err := query("web.default.svc.cluster.local.", mdns.TypeA, 0).Pack()
			if err != nil {
				t.Fatal(err)
			}
			to := &net.UDPAddr{IP: net.ParseIP(dst), Port: port}
			if _, err := c.WriteTo(b, to); err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 512)
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				t.Fatalf("no reply: %v", err)
			}
			if from.String() != to.String() {
				t.Errorf("reply from %v, want %v", from, to)
			}
			if m := mustUnpack(t, buf[:n]); len(m.Answer) != 1 {
				t.Errorf("reply %s", describe(m))
			}
		})
	}
}

// TestConnErrors checks that failed reads and writes are counted and the loop goes on.
func TestConnErrors(t *testing.T) {
	s := newTestServer(t, Config{})
	conn := newBlockingConn()
	conn.writeErr = errors.New("no route")
	if err := s.Start(conn, nil); err != nil {
		t.Fatal(err)
	}
	b, err := query("web.default.svc.cluster.local.", mdns.TypeA, 0).Pack()
	if err != nil {
		t.Fatal(err)
	}
	const reads = 3
	for range reads {
		conn.in <- errors.New("connection refused")
	}
	conn.in <- b
	waitFor(t, "the reply's write to fail", func() bool { return s.Stats().ReplyDropped == 1 })
	if st := s.Stats(); st.ReadErrors != reads || st.Queries != 1 {
		t.Errorf("stats %+v: want %d read errors and the query answered", st, reads)
	}
}
