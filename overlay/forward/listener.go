package forward

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/internal/flows"
	"github.com/edgewire/edgewire/overlay/internal/ratelimit"
)

// Defaults for the zero values of ListenerConfig.
const (
	DefaultListenDialTimeout = 5 * time.Second
	DefaultUDPIdleTimeout    = 60 * time.Second
	DefaultHeaderTimeout     = 5 * time.Second
)

// DefaultMaxTCPFlows returns the default of ListenerConfig.MaxTCPFlows for a file-descriptor limit
// fdLimit: fdLimit/5 (two descriptors a connection, so 40% of the limit), at least 64 and at most
// 8192. DefaultMaxUDPFlows is its UDP counterpart: fdLimit/10 (one descriptor a flow), at least 32
// and at most 4096. The per-peer defaults are half of these. At the load goals' limit of 20,000:
// 4,000 TCP connections (2,000 per peer) and 2,000 UDP flows (1,000 per peer).
func DefaultMaxTCPFlows(fdLimit int) int { return flows.DefaultTCP(fdLimit) }

// DefaultMaxUDPFlows: see DefaultMaxTCPFlows.
func DefaultMaxUDPFlows(fdLimit int) int { return flows.DefaultUDP(fdLimit) }

// ListenerConfig configures a Listener. Zero values mean the defaults written beside each field.
type ListenerConfig struct {
	// Logger receives the listener's logs; nil discards them.
	Logger *slog.Logger
	// Addr is the node's overlay address to listen on (required, not unspecified: UDP replies
	// leave from it, and clients accept replies only from the address they sent to).
	Addr netip.Addr
	// Port is the forward port, TCP and UDP; 0 means DefaultPort.
	Port uint16
	// Device is the interface both sockets are bound to with SO_BINDTODEVICE (mesh0), so only
	// packets that arrived through it reach them; "" binds to no device (tests on loopback).
	Device string
	// Allow reports whether target is a local endpoint of a known service for proto (required). It
	// is called for every TCP request and for the first datagram of every UDP flow, concurrently,
	// and must not block.
	Allow func(proto discovery.Protocol, target netip.AddrPort) bool
	// DialTimeout bounds the connection to a TCP target; 0 means DefaultListenDialTimeout.
	DialTimeout time.Duration
	// UDPIdleTimeout closes a UDP flow idle this long in both directions; 0 means
	// DefaultUDPIdleTimeout.
	UDPIdleTimeout time.Duration
	// HeaderTimeout bounds the wait for a TCP request's header; 0 means DefaultHeaderTimeout.
	HeaderTimeout time.Duration
	// MaxTCPFlows caps the TCP connections held at once, from accept (before the header) to the
	// end of the flow; 0 means DefaultMaxTCPFlows of the RLIMIT_NOFILE in force at NewListener. A
	// connection over a cap is answered status 5 (busy) and closed at once, and counted.
	MaxTCPFlows int
	// MaxTCPFlowsPerPeer caps the TCP connections held at once from one peer (one overlay
	// address); 0 means MaxTCPFlows/2. It is at most MaxTCPFlows.
	MaxTCPFlowsPerPeer int
	// MaxUDPFlows caps the UDP flows open at once; 0 means DefaultMaxUDPFlows of the RLIMIT_NOFILE
	// in force at NewListener. A datagram that would open one more is dropped and counted.
	MaxUDPFlows int
	// MaxUDPFlowsPerPeer caps the UDP flows of one peer; 0 means MaxUDPFlows/2. A datagram that
	// would open one more evicts the peer's least recently active flow if it is idle for
	// UDPEvictIdle, and is dropped and counted otherwise.
	MaxUDPFlowsPerPeer int
	// UDPEvictIdle is how long a flow must have been idle to be evicted for a new flow of the same
	// peer; 0 means UDPIdleTimeout/4.
	UDPEvictIdle time.Duration
}

// Stats are the Listener's counters since Start.
type Stats struct {
	TCPAccepted uint64 // TCP requests forwarded (status 0 sent)
	UDPAccepted uint64 // UDP flows opened
	Refused     uint64 // targets Allow refused: TCP requests (status 1) and UDP datagrams
	// BadHeader counts malformed, wrong-protocol and other-version headers, TCP and UDP, and TCP
	// connections that closed in the middle of a header or timed out before a whole one.
	BadHeader uint64
	// Unused counts TCP connections closed before their first byte: spares a Dialer did not need.
	Unused       uint64
	DialFailures uint64 // targets that could not be dialled (status 2 for TCP)
	UDPDropped   uint64 // UDP datagrams dropped on a failed send, either way
	ActiveTCP    uint64 // TCP flows being copied now
	ActiveUDP    uint64 // UDP flows open now
	BytesIn      uint64 // payload bytes from peers to targets
	BytesOut     uint64 // payload bytes from targets to peers

	// TCPBusyPeer and TCPBusyTotal count TCP connections refused with status 5 (busy) because the
	// peer held MaxTCPFlowsPerPeer connections, or the listener MaxTCPFlows.
	TCPBusyPeer, TCPBusyTotal uint64
	// UDPCapPeer and UDPCapTotal count datagrams dropped because they would have opened a flow
	// beyond MaxUDPFlowsPerPeer (no flow of the peer was idle enough to evict) or MaxUDPFlows.
	UDPCapPeer, UDPCapTotal uint64
	// UDPEvicted counts UDP flows closed to make room for a new flow of the same peer.
	UDPEvicted uint64
	// TCPConns is the TCP connections held now, from accept to close (ActiveTCP counts those of
	// them past their status 0).
	TCPConns uint64

	// The caps in force.
	MaxTCPFlows, MaxTCPFlowsPerPeer, MaxUDPFlows, MaxUDPFlowsPerPeer uint64
}

type counters struct {
	tcpAccepted, udpAccepted, refused, badHeader, dialFailures, udpDropped atomic.Uint64
	activeTCP, activeUDP, bytesIn, bytesOut, unused                        atomic.Uint64
	tcpBusyPeer, tcpBusyTotal, udpCapPeer, udpCapTotal, udpEvicted         atomic.Uint64
}

// Listener is the server side: it serves forward requests on [Addr]:Port, TCP and UDP.
//
// States: new (NewListener) → serving (Start) → closed (Close). Close from new is fine; Start after
// Close fails; Start twice fails.
type Listener struct {
	cfg   ListenerConfig
	log   *slog.Logger
	stats counters

	logLimiter ratelimit.Limiter
	// bufs holds the buffers of TCP copies and UDP replies. A flow takes one only while data is
	// waiting, so memory follows the data in flight, not the flows open.
	bufs flows.Buffers
	// tcpTable holds a slot per TCP connection, from accept to close; udpTable one per UDP flow.
	tcpTable *flows.Table[flows.Counted]
	udpTable *flows.Table[*udpFlow]

	ctx    context.Context // cancelled by Close: aborts dials in progress
	cancel context.CancelFunc
	wg     sync.WaitGroup // every goroutine the Listener started

	// mu guards all following fields.
	mu       sync.Mutex
	started  bool
	closed   bool
	tcpLn    *net.TCPListener
	udpConn  *net.UDPConn
	tcpConns map[net.Conn]struct{} // both ends of every TCP request being served
	udpFlows map[udpKey]*udpFlow
}

// NewListener validates cfg and returns a Listener. It starts nothing and opens no socket.
func NewListener(cfg ListenerConfig) (*Listener, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if !cfg.Addr.IsValid() || cfg.Addr.IsUnspecified() {
		return nil, fmt.Errorf("forward listener: address %v: need the node's overlay address", cfg.Addr)
	}
	if cfg.Allow == nil {
		return nil, errors.New("forward listener: no Allow function")
	}
	if cfg.Port == 0 {
		cfg.Port = DefaultPort
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultListenDialTimeout
	}
	if cfg.UDPIdleTimeout <= 0 {
		cfg.UDPIdleTimeout = DefaultUDPIdleTimeout
	}
	if cfg.HeaderTimeout <= 0 {
		cfg.HeaderTimeout = DefaultHeaderTimeout
	}
	caps := flows.Caps{TCP: cfg.MaxTCPFlows, UDP: cfg.MaxUDPFlows,
		TCPPerOne: cfg.MaxTCPFlowsPerPeer, UDPPerOne: cfg.MaxUDPFlowsPerPeer}.WithDefaults(2)
	cfg.MaxTCPFlows, cfg.MaxUDPFlows = caps.TCP, caps.UDP
	cfg.MaxTCPFlowsPerPeer, cfg.MaxUDPFlowsPerPeer = caps.TCPPerOne, caps.UDPPerOne
	if cfg.UDPEvictIdle <= 0 {
		cfg.UDPEvictIdle = cfg.UDPIdleTimeout / 4
	}
	ctx, cancel := context.WithCancel(context.Background())
	l := &Listener{
		cfg:        cfg,
		log:        cfg.Logger.With("component", "forward"),
		logLimiter: ratelimit.Limiter{Every: time.Second},
		ctx:        ctx,
		cancel:     cancel,
		tcpTable:   flows.NewTable[flows.Counted](cfg.MaxTCPFlowsPerPeer, cfg.MaxTCPFlows),
		udpTable:   flows.NewTable[*udpFlow](cfg.MaxUDPFlowsPerPeer, cfg.MaxUDPFlows),
		tcpConns:   map[net.Conn]struct{}{},
		udpFlows:   map[udpKey]*udpFlow{},
	}
	return l, nil
}

// Addr returns the address the listener serves on.
func (l *Listener) Addr() netip.AddrPort { return netip.AddrPortFrom(l.cfg.Addr, l.cfg.Port) }

// Start listens on [Addr]:Port, TCP and UDP, bound to Device, and serves both in goroutines until
// Close. It fails if either socket cannot be opened, leaving nothing open.
func (l *Listener) Start() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return fmt.Errorf("forward listener %s: %w", l.Addr(), net.ErrClosed)
	}
	if l.started {
		return fmt.Errorf("forward listener %s: already started", l.Addr())
	}
	lc := net.ListenConfig{Control: l.bindToDevice}
	addr := l.Addr().String()
	ln, err := lc.Listen(l.ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("forward listener: %w", err)
	}
	pc, err := lc.ListenPacket(l.ctx, "udp", addr)
	if err != nil {
		ln.Close()
		return fmt.Errorf("forward listener: %w", err)
	}
	l.started = true
	l.tcpLn = ln.(*net.TCPListener)
	l.udpConn = pc.(*net.UDPConn)
	l.wg.Add(2)
	go l.acceptTCP(l.tcpLn)
	go l.readUDP(l.udpConn)
	l.log.Info("forward listener up", "addr", addr, "device", l.cfg.Device,
		"max_tcp", l.cfg.MaxTCPFlows, "max_tcp_per_peer", l.cfg.MaxTCPFlowsPerPeer,
		"max_udp", l.cfg.MaxUDPFlows, "max_udp_per_peer", l.cfg.MaxUDPFlowsPerPeer)
	return nil
}

// bindToDevice is the sockets' Control hook: SO_BINDTODEVICE to cfg.Device, if any.
func (l *Listener) bindToDevice(network, address string, c syscall.RawConn) error {
	if l.cfg.Device == "" {
		return nil
	}
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE, l.cfg.Device)
	}); err != nil {
		return fmt.Errorf("%s %s: bind to device %q: %w", network, address, l.cfg.Device, err)
	}
	if serr != nil {
		return fmt.Errorf("%s %s: bind to device %q: %w", network, address, l.cfg.Device, serr)
	}
	return nil
}

// Stats returns the listener's counters.
func (l *Listener) Stats() Stats {
	c := &l.stats
	return Stats{
		TCPAccepted:  c.tcpAccepted.Load(),
		UDPAccepted:  c.udpAccepted.Load(),
		Refused:      c.refused.Load(),
		BadHeader:    c.badHeader.Load(),
		Unused:       c.unused.Load(),
		DialFailures: c.dialFailures.Load(),
		UDPDropped:   c.udpDropped.Load(),
		ActiveTCP:    c.activeTCP.Load(),
		ActiveUDP:    c.activeUDP.Load(),
		BytesIn:      c.bytesIn.Load(),
		BytesOut:     c.bytesOut.Load(),

		TCPBusyPeer:  c.tcpBusyPeer.Load(),
		TCPBusyTotal: c.tcpBusyTotal.Load(),
		UDPCapPeer:   c.udpCapPeer.Load(),
		UDPCapTotal:  c.udpCapTotal.Load(),
		UDPEvicted:   c.udpEvicted.Load(),
		TCPConns:     uint64(l.tcpTable.Len()),

		MaxTCPFlows:        uint64(l.cfg.MaxTCPFlows),
		MaxTCPFlowsPerPeer: uint64(l.cfg.MaxTCPFlowsPerPeer),
		MaxUDPFlows:        uint64(l.cfg.MaxUDPFlows),
		MaxUDPFlowsPerPeer: uint64(l.cfg.MaxUDPFlowsPerPeer),
	}
}

// Close stops serving, closes every flow and waits for every goroutine the Listener started. It is
// idempotent; every call returns after the goroutines have ended.
func (l *Listener) Close() error {
	l.mu.Lock()
	var err error
	if !l.closed {
		l.closed = true
		l.cancel()
		if l.tcpLn != nil {
			err = errors.Join(err, l.tcpLn.Close())
		}
		if l.udpConn != nil {
			err = errors.Join(err, l.udpConn.Close())
		}
		for c := range l.tcpConns {
			c.Close()
		}
		for _, f := range l.udpFlows {
			f.conn.Close()
		}
	}
	l.mu.Unlock()
	l.wg.Wait()
	if err != nil {
		return fmt.Errorf("forward listener %s: close: %w", l.Addr(), err)
	}
	return nil
}

// track adds c to the conns Close closes; it returns false, having closed c, once Close has begun.
func (l *Listener) track(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		c.Close()
		return false
	}
	l.tcpConns[c] = struct{}{}
	return true
}

func (l *Listener) untrack(c net.Conn) {
	l.mu.Lock()
	delete(l.tcpConns, c)
	l.mu.Unlock()
	c.Close()
}

// logf logs a per-request or per-datagram event at most once per second, with the number of events
// suppressed since the last one.
func (l *Listener) logf(level slog.Level, msg string, args ...any) {
	if n, ok := l.logLimiter.Allow(); ok {
		if n > 0 {
			args = append(args, "suppressed", n)
		}
		l.log.Log(context.Background(), level, msg, args...)
	}
}
