// Package path owns the node's WireGuard transport: the one UDP socket that every datagram between
// this node and its peers goes through, exposed to wireguard-go as its conn.Bind. It wraps
// wireguard-go's own conn.StdNetBind, so WireGuard keeps its batched I/O (recvmmsg/sendmmsg, UDP
// GSO/GRO) unchanged, and demultiplexes from the same socket the datagrams that are not WireGuard —
// path probes and hole punching, which must leave from and arrive at the very socket (and NAT
// mapping) that WireGuard uses. Candidate paths per peer (LAN, hole-punched, relayed) and the choice
// among them will live here too; today every peer has the one path wireguard-go's endpoint names.
//
// # Demultiplexing
//
// A received datagram is WireGuard when it is a well-formed WireGuard message: its first byte is the
// message type, the next three bytes (reserved) are zero, and its length fits the type:
//
//	type 1 handshake initiation  exactly 148 bytes
//	type 2 handshake response    exactly  92 bytes
//	type 3 cookie reply          exactly  64 bytes
//	type 4 transport data        at least 32 bytes, and (length-16) a multiple of 16
//
// Every other non-empty datagram is not WireGuard: it is handed to Config.OnPacket (or dropped and
// counted without one) and hidden from wireguard-go by setting its size to 0, which wireguard-go
// skips (device/receive.go ignores sizes below MinMessageSize). An empty datagram is never seen:
// wireguard-go's receive contract reserves size 0 for "nothing here". A protocol sharing the socket
// therefore needs one rule to stay out of WireGuard's way: none of its datagrams may start with a
// byte 1..4 followed by three zero bytes. Bind.SendTo refuses a datagram that breaks the rule
// (whatever its length), since the receiver could hand it to WireGuard, which would drop it.
//
// The wrapper runs on wireguard-go's receive goroutines (one per address family), after the inner
// ReceiveFunc has filled a batch; it allocates nothing per packet and counts per batch.
//
// # Lifecycle
//
// NewBind opens nothing. wireguard-go calls Open when the device goes up and Close then Open again on
// every device.Up and port change: Close closes the inner Bind's sockets and nothing else, so state
// that outlives one socket (counters, and later candidate paths and punching) survives it. The Bind
// starts no goroutines of its own.
package path

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/conn"
)

// DefaultPort is the UDP port the node's WireGuard socket listens on unless configured otherwise.
// wireguard-go passes the port to Open (its listen_port); the Bind takes whatever it is given.
const DefaultPort = 51820

// Config configures a Bind. The zero value is usable: real sockets, no logging, non-WireGuard
// datagrams dropped and counted.
type Config struct {
	// Logger receives the Bind's logs; nil discards them.
	Logger *slog.Logger
	// Inner is the Bind that owns the sockets; nil → conn.NewStdNetBind(). Tests pass an in-memory one.
	Inner conn.Bind
	// OnPacket receives every datagram that is not WireGuard (called on the receive goroutine: must
	// not block; the slice is only valid during the call). nil → such datagrams are dropped and counted.
	OnPacket func(pkt []byte, from netip.AddrPort)
}

// Stats are the Bind's counters since NewBind; they survive Close and Open.
type Stats struct {
	// WireGuardIn counts received datagrams handed on to WireGuard.
	WireGuardIn uint64
	// OtherIn counts received datagrams that were not WireGuard (delivered to OnPacket or dropped).
	OtherIn uint64
	// OtherDropped counts the OtherIn datagrams that were dropped: no OnPacket, or a source
	// address that could not be read from the inner Bind's endpoint.
	OtherDropped uint64
}

// Bind is the node's conn.Bind. Its methods are safe for concurrent use.
type Bind struct {
	log      *slog.Logger
	inner    conn.Bind
	onPacket func(pkt []byte, from netip.AddrPort)

	port         atomic.Uint32 // the port the open inner Bind reported; 0 while closed
	wgIn         atomic.Uint64
	otherIn      atomic.Uint64
	otherDropped atomic.Uint64
	dropLog      logLimiter
}

var _ conn.Bind = (*Bind)(nil)

// NewBind returns a closed Bind; wireguard-go opens it (device.Up).
func NewBind(cfg Config) *Bind {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	inner := cfg.Inner
	if inner == nil {
		inner = conn.NewStdNetBind()
	}
	return &Bind{
		log:      log.With("component", "path"),
		inner:    inner,
		onPacket: cfg.OnPacket,
	}
}

// Open opens the inner Bind on port (0: any) and returns its receive functions, each wrapped to
// take the datagrams that are not WireGuard out of the batch (see the package doc).
func (b *Bind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fns, actual, err := b.inner.Open(port)
	if err != nil {
		return nil, 0, fmt.Errorf("path: open udp port %d: %w", port, err)
	}
	wrapped := make([]conn.ReceiveFunc, len(fns))
	for i, fn := range fns {
		wrapped[i] = b.wrapReceive(fn)
	}
	b.port.Store(uint32(actual))
	b.log.Debug("bind open", "port", actual, "receivers", len(fns))
	return wrapped, actual, nil
}

// Close closes the inner Bind, after which the receive functions Open returned report
// net.ErrClosed. It closes nothing else (wireguard-go calls it on every device.Up), and it may be
// called any number of times.
func (b *Bind) Close() error {
	b.port.Store(0)
	if err := b.inner.Close(); err != nil {
		return fmt.Errorf("path: close: %w", err)
	}
	return nil
}

// SetMark sets SO_MARK on the inner Bind's sockets.
func (b *Bind) SetMark(mark uint32) error {
	if err := b.inner.SetMark(mark); err != nil {
		return fmt.Errorf("path: set mark %#x: %w", mark, err)
	}
	return nil
}

// Send sends WireGuard's datagrams through the inner Bind. Its errors are the inner Bind's,
// unwrapped: this is the hot path, and wireguard-go inspects them (net.ErrClosed, UDP GSO errors).
func (b *Bind) Send(bufs [][]byte, ep conn.Endpoint) error {
	return b.inner.Send(bufs, ep)
}

// ParseEndpoint parses an endpoint of the inner Bind.
func (b *Bind) ParseEndpoint(s string) (conn.Endpoint, error) {
	ep, err := b.inner.ParseEndpoint(s)
	if err != nil {
		return nil, fmt.Errorf("path: parse endpoint %q: %w", s, err)
	}
	return ep, nil
}

// BatchSize is the inner Bind's batch size.
func (b *Bind) BatchSize() int { return b.inner.BatchSize() }

// SendTo sends one datagram that is not WireGuard to `to` from the same socket WireGuard uses, so
// it leaves through the same NAT mapping. It fails while the Bind is closed, for an empty datagram
// (the receiver could not see it) and for a datagram shaped like a WireGuard message (the receiver
// would hand it to WireGuard; see the package doc).
func (b *Bind) SendTo(pkt []byte, to netip.AddrPort) error {
	switch {
	case !to.IsValid():
		return fmt.Errorf("path: send to %v: invalid address", to)
	case len(pkt) == 0:
		return fmt.Errorf("path: send to %s: empty datagram", to)
	case looksLikeWireGuard(pkt):
		return fmt.Errorf("path: send to %s: %d-byte datagram of type %d is shaped like WireGuard", to, len(pkt), pkt[0])
	case b.port.Load() == 0:
		return fmt.Errorf("path: send to %s: %w", to, net.ErrClosed)
	}
	ep, err := b.inner.ParseEndpoint(to.String())
	if err != nil {
		return fmt.Errorf("path: send to %s: parse endpoint: %w", to, err)
	}
	if err := b.inner.Send([][]byte{pkt}, ep); err != nil {
		return fmt.Errorf("path: send to %s: %w", to, err)
	}
	return nil
}

// Port is the UDP port Open bound, or 0 while the Bind is not open.
func (b *Bind) Port() uint16 { return uint16(b.port.Load()) }

// Stats returns the Bind's counters.
func (b *Bind) Stats() Stats {
	return Stats{
		WireGuardIn:  b.wgIn.Load(),
		OtherIn:      b.otherIn.Load(),
		OtherDropped: b.otherDropped.Load(),
	}
}

// looksLikeWireGuard reports whether pkt starts like a WireGuard message (a type byte 1..4 and
// three zero reserved bytes), whatever its length: the prefix a non-WireGuard protocol must avoid.
func looksLikeWireGuard(pkt []byte) bool {
	return len(pkt) >= 4 && pkt[0] >= 1 && pkt[0] <= 4 && pkt[1]|pkt[2]|pkt[3] == 0
}
