package relay

import (
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	ma "github.com/multiformats/go-multiaddr"
)

// gate bounds what peers that have not registered can make the relay hold (the MaxUnauth* fields
// of Limits): their libp2p connections, in total and per source address, each closed unless a node
// registers on it within RegisterTimeout; and their control streams, in total and per source
// address. A connection is unauthenticated from its handshake until a node registers on it, and
// again once the last session on it has ended. Every refusal is counted (metrics.unauthRefused).
//
// The server feeds it libp2p's connection notifications (connected, disconnected), asks it before
// serving a stream (admitStream) and tells it about sessions (authenticated, sessionEnded). Its
// expiry timers are time.AfterFunc timers: no goroutine per connection while they wait.
type gate struct {
	limits  Limits
	metrics *metrics
	log     *slog.Logger
	wg      sync.WaitGroup // expiry callbacks that are closing a connection

	mu        sync.Mutex // guards all following fields
	closed    bool
	conns     map[network.Conn]*gateConn
	unauth    int // connections with no session
	unauthIP  map[netip.Prefix]int
	streams   int // streams being registered
	streamsIP map[netip.Prefix]int
}

// gateConn is a connection the gate tracks.
type gateConn struct {
	src      netip.Prefix
	sessions int         // live sessions registered on the connection
	pending  int         // streams registering on the connection, each under its own deadline
	timer    *time.Timer // closes the connection while sessions == 0; nil otherwise
	gen      int         // which timer is current; an older one that fires does nothing
}

// Reasons the gate refuses or closes a connection or a stream.
const (
	gateConnsTotal   = "conns_total"
	gateConnsPerIP   = "conns_per_ip"
	gateConnTimeout  = "conn_timeout"
	gateStreamsTotal = "streams_total"
	gateStreamsPerIP = "streams_per_ip"
)

func newGate(l Limits, m *metrics, log *slog.Logger) *gate {
	return &gate{
		limits:    l,
		metrics:   m,
		log:       log,
		conns:     map[network.Conn]*gateConn{},
		unauthIP:  map[netip.Prefix]int{},
		streamsIP: map[netip.Prefix]int{},
	}
}

// sourcePrefix is what the per-address limits count by: the IPv4 address, or the IPv6 /64 (one
// host's share of a typical IPv6 network). An address without an IP maps to the zero prefix, which
// all such addresses share.
func sourcePrefix(m ma.Multiaddr) netip.Prefix {
	ip, err := remoteIP(m)
	if err != nil {
		return netip.Prefix{}
	}
	bits := 32
	if !ip.Is4() {
		bits = 64
	}
	p, _ := ip.WithZone("").Prefix(bits)
	return p
}

// connected admits a new connection as unauthenticated, or closes it when a cap is reached. It is
// called from libp2p's Connected notification, before any stream of the connection is served.
func (g *gate) connected(c network.Conn) {
	src := sourcePrefix(c.RemoteMultiaddr())
	g.mu.Lock()
	if _, ok := g.conns[c]; ok || g.closed {
		g.mu.Unlock()
		return
	}
	var reason string
	switch {
	case g.unauth >= g.limits.MaxUnauthConns:
		reason = gateConnsTotal
	case g.unauthIP[src] >= g.limits.MaxUnauthConnsPerIP:
		reason = gateConnsPerIP
	default:
		gc := &gateConn{src: src}
		g.conns[c] = gc
		g.startUnauthLocked(c, gc)
	}
	g.mu.Unlock()
	if reason != "" {
		g.metrics.unauthRefused[reason].Add(1)
		// Closing dispatches the Disconnected notification asynchronously; the gate does not
		// track the connection, so that notification finds nothing to do.
		c.Close()
	}
}

// disconnected forgets a connection that closed.
func (g *gate) disconnected(c network.Conn) {
	g.mu.Lock()
	defer g.mu.Unlock()
	gc, ok := g.conns[c]
	if !ok {
		return
	}
	delete(g.conns, c)
	if gc.sessions == 0 {
		g.stopUnauthLocked(gc)
	}
}

// authenticated records a session registered on c: c stops counting as unauthenticated.
func (g *gate) authenticated(c network.Conn) {
	g.mu.Lock()
	defer g.mu.Unlock()
	gc, ok := g.conns[c]
	if !ok {
		return
	}
	gc.sessions++
	if gc.sessions == 1 {
		g.stopUnauthLocked(gc)
	}
}

// sessionEnded records the end of a session authenticated on c. A connection left without
// sessions counts as unauthenticated again (even over the caps, which bound new connections) and
// is closed unless a node registers on it within RegisterTimeout.
func (g *gate) sessionEnded(c network.Conn) {
	g.mu.Lock()
	defer g.mu.Unlock()
	gc, ok := g.conns[c]
	if !ok || gc.sessions == 0 {
		return
	}
	gc.sessions--
	if gc.sessions == 0 && !g.closed {
		g.startUnauthLocked(c, gc)
	}
}

// startUnauthLocked counts gc as unauthenticated and arms its expiry.
func (g *gate) startUnauthLocked(c network.Conn, gc *gateConn) {
	g.unauth++
	g.unauthIP[gc.src]++
	gc.gen++
	gen := gc.gen
	gc.timer = time.AfterFunc(g.limits.RegisterTimeout, func() { g.expire(c, gc, gen) })
}

// stopUnauthLocked stops counting gc as unauthenticated and disarms its expiry.
func (g *gate) stopUnauthLocked(gc *gateConn) {
	g.unauth--
	if g.unauthIP[gc.src]--; g.unauthIP[gc.src] <= 0 {
		delete(g.unauthIP, gc.src)
	}
	if gc.timer != nil {
		gc.timer.Stop()
		gc.timer = nil
	}
}

// expire closes c if it is still unauthenticated under the timer of generation gen. While a
// stream registers on c, that stream's deadline (RegisterTimeout too) decides, and a refusal closes
// c: the timer waits another RegisterTimeout.
func (g *gate) expire(c network.Conn, gc *gateConn, gen int) {
	g.mu.Lock()
	if g.closed || g.conns[c] != gc || gc.sessions > 0 || gc.gen != gen {
		g.mu.Unlock()
		return
	}
	if gc.pending > 0 {
		gc.gen++
		gen := gc.gen
		gc.timer = time.AfterFunc(g.limits.RegisterTimeout, func() { g.expire(c, gc, gen) })
		g.mu.Unlock()
		return
	}
	g.wg.Add(1)
	g.mu.Unlock()
	defer g.wg.Done()
	g.metrics.unauthRefused[gateConnTimeout].Add(1)
	g.log.Debug("closing a connection on which no node registered", "peer", c.RemotePeer().String(),
		"addr", c.RemoteMultiaddr().String(), "after", g.limits.RegisterTimeout)
	c.Close()
}

// admitStream admits a control stream on c for registration. It returns the refusal reason when a
// cap is reached; otherwise release, which the caller must call once when the registration has
// succeeded or failed.
func (g *gate) admitStream(c network.Conn) (release func(), reason string) {
	src := sourcePrefix(c.RemoteMultiaddr())
	g.mu.Lock()
	defer g.mu.Unlock()
	switch {
	case g.streams >= g.limits.MaxUnauthStreams:
		return nil, gateStreamsTotal
	case g.streamsIP[src] >= g.limits.MaxUnauthStreamsPerIP:
		return nil, gateStreamsPerIP
	}
	g.streams++
	g.streamsIP[src]++
	gc := g.conns[c]
	if gc != nil {
		gc.pending++
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			g.mu.Lock()
			defer g.mu.Unlock()
			g.streams--
			if g.streamsIP[src]--; g.streamsIP[src] <= 0 {
				delete(g.streamsIP, src)
			}
			if gc != nil {
				gc.pending--
			}
		})
	}, ""
}

// counts returns the unauthenticated connections and the streams being registered.
func (g *gate) counts() (conns, streams int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.unauth, g.streams
}

// close disarms every timer and waits for the expiry callbacks that are closing a connection.
func (g *gate) close() {
	g.mu.Lock()
	g.closed = true
	for _, gc := range g.conns {
		if gc.timer != nil {
			gc.timer.Stop()
		}
	}
	g.mu.Unlock()
	g.wg.Wait()
}
