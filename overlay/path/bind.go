// Package path owns the node's WireGuard transport and the choice of path to every peer: the one
// UDP socket that every datagram between this node and its peers goes through, exposed to
// wireguard-go as its conn.Bind, and the Manager that keeps each peer's candidate paths (LAN
// addresses, reflexive and peer-reflexive addresses, relays), probes them from that socket, punches
// holes through NATs, and tells wireguard-go which endpoint to use. The Bind wraps wireguard-go's
// own conn.StdNetBind, so WireGuard keeps its batched I/O (recvmmsg/sendmmsg, UDP GSO/GRO)
// unchanged, and demultiplexes from the same socket the datagrams that are not WireGuard — path
// probes, relay frames and punches, which must leave from and arrive at the very socket (and NAT
// mapping) that WireGuard uses.
//
// # Frames
//
// The datagrams that share the socket with WireGuard — BIND, BINDACK, DATA, PING, PONG — are the
// path frames of package relay (relay/wire.go documents their layout and flow). This package adds
// one thing: the key that MACs PING and PONG between two nodes is
// HMAC-SHA256(X25519(own private key, peer's public key), "edgewire path probe v1"), from their
// WireGuard static keys, so both sides derive it alone.
//
// # Synthetic endpoints
//
// wireguard-go and UAPI (Debian's `wg`, which crashes on anything but IP:port) see a peer reached
// through relay R (the relay's index in the agent's list) as the synthetic endpoint
//
//	127.3.(R+1).(ID>>16):(ID&0xffff)     e.g. node 5 on relay 0 is 127.3.1.0:5
//
// where ID is the peer's node ID on that relay. So R ranges over 0..254 (MaxRelays) and ID over
// 0..2^24-1 (MaxRelayNodeID); a peer whose ID is larger cannot be reached through that relay, and
// a real peer at an address in 127.3.0.0/16 cannot be addressed. Send to a synthetic endpoint
// wraps each datagram in a DATA frame for ID and sends the batch to relay R's UDP address from the
// WireGuard socket, in one inner Send with the frames back to back in one buffer, so StdNetBind
// still coalesces it with UDP GSO (see sendRelayed). A DATA frame received from a relay's UDP
// address is unwrapped in place: a WireGuard payload is moved to the start of its buffer, its
// size fixed, and its endpoint (a StdNetEndpoint, fresh per datagram) rewritten to the source
// node's synthetic endpoint, so wireguard-go sees ordinary WireGuard traffic, with no copy to
// another buffer and no allocation. When the Manager chose another path to that node (direct, or
// through another relay), the endpoint is that path's instead: wireguard-go roams to the source
// of every datagram, and must stay on the chosen path. (Only relayed datagrams can be presented
// so: a synthetic endpoint names one peer, while the public address and port a datagram comes
// from may be one peer's mapping towards this node and another's reflexive address, behind the
// same NAT. When wireguard-go roams to an address it then cannot send to, the failed send makes
// the Manager apply its choice again at once.) A PING or PONG payload goes to the packet handler
// from the synthetic endpoint, like a direct one.
//
// # Paths
//
// The Manager probes every candidate with PINGs: unconfirmed ones every probe interval, alive ones
// every 2.5 intervals; a PONG marks a candidate alive with its RTT, three missed probes in a row
// (re-probed after half an interval once one is missed) mark it dead. A valid PING from an
// address that is no candidate makes it a peer-reflexive candidate, answered and probed at once
// (ICE's triggered check: how a node behind a hard NAT reaches a public one); a PING from a
// candidate that has not answered yet triggers a probe too, even while an earlier probe waits for
// its PONG (the peer may have ignored it, not knowing this node yet). The choice is an
// alive LAN candidate, else an alive direct one, else a relay (alive first, then one whose BIND
// was answered); with none of these, an unconfirmed LAN or direct guess. The Manager applies the
// choice with SetEndpoint when it changes, and re-applies it at every roaming check (2.5
// intervals) if wireguard-go roamed away, and at once for every peer when a relay session goes
// away. A relayed peer with a reflexive address asks its relay for a punch (the first time a
// sixteenth of an interval after it appeared, or half an interval when one of its LAN addresses is
// on one of this node's subnets; then at most every 5 intervals); on the relay's signal both sides
// first open their own NAT mapping with a few datagrams whose TTL only passes their own router (a
// raw socket with the WireGuard socket's source port), then PING each other's reflexive and LAN
// addresses every 75ms (see DESIGN.md for why two masquerade NATs defeat a naive simultaneous
// punch). An unanswered BIND is repeated after an eighth of an interval, doubling up to one.
//
// # Failure detection
//
// Probes alone notice a dead path only after three missed probes of the alive re-check: seconds.
// Two signals make it faster while traffic flows. The Bind watches the endpoint the Manager
// applied for each peer (watch.go): WireGuard data or a handshake initiation sent there while no
// datagram came back from it for an eighth of a probe interval (250ms), or the peer's datagrams
// arriving through a relay although this node chose a direct path, raise a suspicion and wake the
// Manager (detect.go), which probes the path at once and again after every miss, each probe
// waiting three RTTs (at least a twentieth of an interval, 100ms): three misses in a row make it
// dead, and the choice moves on in the same step, about 0.6s after the first unanswered datagram
// at the defaults. A PONG ends the suspicion. A send that fails locally with a path error (EPERM
// from a firewall, ENETUNREACH, EHOSTUNREACH, ENETDOWN, EADDRNOTAVAIL, ENODEV, ENXIO: see
// pathError), whether WireGuard's or a probe's, counts as a lost probe at once. An idle peer sends
// nothing and costs no more than its probes; a one-way flow, which the peer does not answer, costs
// one PING per suspicion delay. The last 32 small datagrams (at most 256 bytes: SYNs, ACKs, small
// requests) sent to each watched endpoint are kept and sent again on the new path when the old
// one dies, so that a connection opened during the outage does not wait for TCP's 1s SYN
// retransmission; WireGuard's replay filter drops the copies of those that did arrive.
//
// # First packets
//
// wireguard-go sends a handshake initiation for the first packet to a peer and no other for 5s,
// even when that one went nowhere (the peer had no endpoint yet, or a guess that does not answer).
// So until one of a peer's paths answers (or a probe interval has passed), the Manager gives
// wireguard-go the peer's hold endpoint 127.3.0.(ID>>16):(ID&0xffff), and the Bind keeps the
// initiation sent there instead of sending it (hold.go; at most 4096 held). When a path answers,
// the Manager applies it and releases the held initiation to it: at once from the node with the
// lower key, and from the other only if the peer has sent nothing within a short wait (four RTTs,
// 100-500ms), since two crossing initiations would invalidate each other. The handshake then
// completes one round trip later and wireguard-go sends the packets it staged meanwhile.
//
// # Demultiplexing
//
// A received datagram is WireGuard when it is a well-formed WireGuard message: its first byte is the
// message type, the next three bytes (reserved) are zero, and its length fits the type:
//
//	type 1 handshake initiation  exactly 148 bytes
//	type 2 handshake response    exactly  92 bytes
//	type 3 cookie reply          exactly  64 bytes
//	type 4 transport data        at least 32 bytes (padding stops at the MTU: any length)
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
	"sync"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/conn"

	"github.com/edgewire/edgewire/overlay/internal/trim"
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
	// Trim, when set, asks the receivers to give the pages of their idle batch back to the kernel
	// (package trim); nil: never.
	Trim *trim.Trimmer
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
	// RelayedIn counts DATA frames received from a relay and unwrapped (WireGuard or probes).
	RelayedIn uint64
	// RelayedInDropped counts DATA frames from a relay that were malformed, empty, or named a node
	// ID no synthetic endpoint can hold.
	RelayedInDropped uint64
	// RelayedOut counts datagrams sent to a synthetic endpoint, wrapped in DATA frames.
	RelayedOut uint64
	// RelayedOutDropped counts datagrams for a synthetic endpoint whose relay has no session.
	RelayedOutDropped uint64
	// SendPathErrors counts WireGuard sends to a peer's chosen endpoint that failed locally with a
	// path error (EPERM, ENETUNREACH, ...: see pathError); each made the Manager count a lost probe.
	SendPathErrors uint64
	// Suspicions counts the times WireGuard data to a peer's chosen endpoint went unanswered for
	// the suspicion delay, or the peer's datagrams came through a relay instead, and the Manager
	// was woken to probe that path at once.
	Suspicions uint64
	// HeldInitiations counts handshake initiations wireguard-go sent to a hold endpoint, kept
	// instead of sent (hold.go); HeldReleased those sent on once a path answered; HeldDropped
	// those never sent (replaced by the peer's own initiation, too old, or beyond maxHeld) and the
	// other datagrams sent to a hold endpoint.
	HeldInitiations, HeldReleased, HeldDropped uint64
	// Replayed counts small datagrams sent to a path that died and sent again on the next one at
	// the failover (watch.go).
	Replayed uint64
}

// Bind is the node's conn.Bind. Its methods are safe for concurrent use.
type Bind struct {
	log      *slog.Logger
	inner    conn.Bind
	onPacket atomic.Pointer[func(pkt []byte, from netip.AddrPort)] // nil: drop
	trim     *trim.Trimmer                                         // nil: never
	relays   atomic.Pointer[relayTable]                            // nil: no relay sessions
	// preferred maps a peer's synthetic relay endpoints to the path this node chose for it, while
	// that path answers: see unwrapRelayed.
	preferred atomic.Pointer[map[netip.AddrPort]netip.AddrPort]
	// watch holds the endpoints the Manager applied, whose traffic is watched (watch.go).
	watch atomic.Pointer[watchTable]
	holds holdTable // initiations sent to hold endpoints (hold.go)
	// roamed is the last unwatched address a WireGuard send failed to with a path error, and
	// what failed (watch.go).
	roamed roamed

	batchPool sync.Pool // *relayBatch

	port         atomic.Uint32 // the port the open inner Bind reported; 0 while closed
	wgIn         atomic.Uint64
	otherIn      atomic.Uint64
	otherDropped atomic.Uint64
	dropLog      logLimiter

	relayedIn, relayedInDropped, relayedOut, relayedOutDropped atomic.Uint64
	sendErrs, suspicions                                       atomic.Uint64
	heldIn, heldReleased, heldDropped                          atomic.Uint64
	replayed                                                   atomic.Uint64
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
	b := &Bind{
		log:   log.With("component", "path"),
		inner: inner,
		trim:  cfg.Trim,
	}
	b.setHandler(cfg.OnPacket)
	return b
}

// setHandler replaces the handler of datagrams that are not WireGuard (nil: drop and count).
func (b *Bind) setHandler(h func(pkt []byte, from netip.AddrPort)) {
	if h == nil {
		b.onPacket.Store(nil)
		return
	}
	b.onPacket.Store(&h)
}

// handler is the current handler of datagrams that are not WireGuard, or nil.
func (b *Bind) handler() func(pkt []byte, from netip.AddrPort) {
	if h := b.onPacket.Load(); h != nil {
		return *h
	}
	return nil
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

// Send sends WireGuard's datagrams through the inner Bind; to a synthetic endpoint it wraps each
// in a DATA frame and sends them to that endpoint's relay (see the package doc). Errors from the
// inner Bind are returned unwrapped: this is the hot path, and wireguard-go inspects them
// (net.ErrClosed, UDP GSO errors). A send to a watched endpoint is noted (watch.go).
func (b *Bind) Send(bufs [][]byte, ep conn.Endpoint) error {
	var err error
	if to, ok := syntheticOf(ep); ok {
		if holdPrefix.Contains(to.Addr()) {
			return b.hold(bufs, to)
		}
		err = b.sendRelayed(bufs, to)
	} else {
		err = b.inner.Send(bufs, ep)
	}
	if w := b.watch.Load(); w != nil {
		b.noteSend(w, bufs, ep, err)
	}
	return err
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
	if _, _, ok := ParseSynthetic(to); ok {
		if err := b.sendRelayed([][]byte{pkt}, to); err != nil {
			return fmt.Errorf("path: send to %s: %w", to, err)
		}
		return nil
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

		RelayedIn:         b.relayedIn.Load(),
		RelayedInDropped:  b.relayedInDropped.Load(),
		RelayedOut:        b.relayedOut.Load(),
		RelayedOutDropped: b.relayedOutDropped.Load(),
		SendPathErrors:    b.sendErrs.Load(),
		Suspicions:        b.suspicions.Load(),
		HeldInitiations:   b.heldIn.Load(),
		HeldReleased:      b.heldReleased.Load(),
		HeldDropped:       b.heldDropped.Load(),
		Replayed:          b.replayed.Load(),
	}
}

// looksLikeWireGuard reports whether pkt starts like a WireGuard message (a type byte 1..4 and
// three zero reserved bytes), whatever its length: the prefix a non-WireGuard protocol must avoid.
func looksLikeWireGuard(pkt []byte) bool {
	return len(pkt) >= 4 && pkt[0] >= 1 && pkt[0] <= 4 && pkt[1]|pkt[2]|pkt[3] == 0
}
