package dns

import (
	"net"
	"net/netip"
	"sync"
	"time"
)

// Per-source limits of the UDP read loop, and the cap on TCP connections.
//
// Every datagram is charged to its source IP address before anything else is done with it: a
// token bucket per address, refilled at the source rate up to the burst. A query the loop cannot
// answer and hands to the workers costs slowCost tokens in all: an upstream exchange costs the
// node some ten times what a reply of the loop does, and the upstreams are shared. The buckets live in a
// map of at most maxSources addresses. A new address that finds the map full waits for a sweep,
// at most once per sweepInterval, that forgets the addresses whose buckets have refilled (an idle
// source costs nothing to forget: it would start again with a full bucket); when none has, the
// new address is charged to one bucket shared by every address left out, so a flood of spoofed
// or rotating addresses costs at most one source's rate. On a node every local process queries
// from the node's own addresses, so the rate is generous (Config.SourceRate): the limit keeps one
// source from starving the others, not a resolver from its queries.

const (
	// sweepInterval is the least time between two sweeps of a full source map.
	sweepInterval = 100 * time.Millisecond
	// slowCost is what a query handed to the workers costs its source, in datagrams.
	slowCost = 10
)

// bucket is one token bucket: tokens at time last (nanoseconds on the limiter's clock).
type bucket struct {
	tokens float64
	last   int64
}

// sourceLimiter holds the buckets of the sources. It is used by the read loop alone: no lock.
type sourceLimiter struct {
	rate, burst float64 // tokens per nanosecond, tokens
	max         int
	sources     map[netip.Addr]*bucket
	overflow    bucket // shared by the sources left out of a full map
	lastSweep   int64
}

func newSourceLimiter(perSecond, burst, maxSources int) *sourceLimiter {
	return &sourceLimiter{
		rate:      float64(perSecond) / float64(time.Second),
		burst:     float64(burst),
		max:       maxSources,
		sources:   make(map[netip.Addr]*bucket),
		overflow:  bucket{tokens: float64(burst)},
		lastSweep: -int64(sweepInterval),
	}
}

// bucket returns ip's bucket, refilled to now (nanoseconds, monotonic), and whether ip has a
// bucket of its own (tracked false: ip was left out of a full map and shares the overflow bucket).
// The bucket is valid until the next call.
func (l *sourceLimiter) bucket(ip netip.Addr, now int64) (b *bucket, tracked bool) {
	b = l.sources[ip]
	if b == nil {
		if len(l.sources) >= l.max && now-l.lastSweep >= int64(sweepInterval) {
			l.sweep(now)
		}
		if len(l.sources) >= l.max {
			b = &l.overflow
			b.refill(now, l.rate, l.burst)
			return b, false
		}
		b = &bucket{tokens: l.burst, last: now}
		l.sources[ip] = b
	}
	b.refill(now, l.rate, l.burst)
	return b, true
}

// sweep forgets the sources whose buckets are full again.
func (l *sourceLimiter) sweep(now int64) {
	l.lastSweep = now
	for ip, b := range l.sources {
		if b.tokens+float64(now-b.last)*l.rate >= l.burst {
			delete(l.sources, ip)
		}
	}
}

// refill adds the tokens earned since b.last.
func (b *bucket) refill(now int64, rate, burst float64) {
	if d := now - b.last; d > 0 {
		b.tokens = min(burst, b.tokens+float64(d)*rate)
		b.last = now
	}
}

// take takes n tokens if b holds them.
func (b *bucket) take(n float64) bool {
	if b.tokens < n {
		return false
	}
	b.tokens -= n
	return true
}

// limitListener accepts at most cap(slots) connections at a time: a connection accepted beyond
// that is closed at once and counted, so a client holding connections open cannot make the
// server start a goroutine per connection without bound, nor make the listener stop accepting.
type limitListener struct {
	net.Listener
	slots   chan struct{}
	refused func()
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		select {
		case l.slots <- struct{}{}:
			return &limitConn{Conn: c, slots: l.slots}, nil
		default:
			l.refused()
			c.Close()
		}
	}
}

// limitConn gives its slot back when closed.
type limitConn struct {
	net.Conn
	slots chan struct{}
	once  sync.Once
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { <-c.slots })
	return err
}
