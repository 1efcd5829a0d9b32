// Package netstack owns the service netstack: a userspace gVisor TCP/IP stack (IPv4 and IPv6, TCP, UDP,
// ICMP) that terminates every TCP and UDP flow addressed to the service range and hands each one to a
// flow-handler hook (Dialer), splicing the flow to the connection the hook returns. It also owns the
// addresses the agent serves itself (the DNS IP): ListenTCP and ListenUDP bind there. The Stack is a
// wireguard-go tun.Device, so the overlay/tun splitter pumps packets between it and the kernel TUN: Write
// delivers IP packets into the stack, Read returns the packets the stack emits. It is the only package of
// edgewire that imports gVisor.
//
// Flows are capped per client (source address) and in total, TCP and UDP apart (Config.MaxTCPFlows and
// the fields after it; the defaults are shares of RLIMIT_NOFILE, see overlay/internal/flows): a TCP SYN
// over a cap gets a RST, a UDP datagram is dropped or, at the client's own cap, evicts that client's
// least recently active idle flow; each refusal is counted (FlowStats). A UDP flow's queue in the stack
// is bounded in bytes, and no flow holds a copy buffer while it waits for data.
package netstack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/internal/flows"
	"github.com/edgewire/edgewire/overlay/internal/ratelimit"
)

// Dialer is the flow-handler hook: the proxy implements it.
type Dialer interface {
	// DialFlow is called once per new TCP connection and once per new UDP flow (first datagram of a
	// new src/dst pair). It returns the upstream connection the stack splices the flow to. An error
	// refuses the flow: TCP gets a RST (connection refused when the Dialer is no Admitter, since the
	// stack then completes the client's handshake only after DialFlow; a reset of the established
	// connection otherwise, see Admitter), UDP's datagram is dropped (and counted).
	//
	// For UDP the returned net.Conn must keep datagram boundaries: one Write sends one datagram, one Read
	// returns one. ctx expires after Config.ConnectTimeout and when the Stack closes. DialFlow may be
	// called from many goroutines at once.
	DialFlow(ctx context.Context, proto discovery.Protocol, src, dst netip.AddrPort) (net.Conn, error)
}

// Admitter is an optional interface of a Dialer. AdmitFlow tells at once, without dialling, whether a
// new TCP flow has anywhere to go; a Dialer that implements it lets the Stack complete the client's
// handshake while DialFlow dials (see handleTCP). An error refuses the flow with a RST.
type Admitter interface {
	AdmitFlow(proto discovery.Protocol, src, dst netip.AddrPort) error
}

// Config configures a Stack. The zero value of each optional field selects the default named.
type Config struct {
	// Logger receives the stack's logs; nil discards them.
	Logger *slog.Logger
	// Dialer is given every TCP and UDP flow to Prefixes. Required.
	Dialer Dialer
	// MTU of the device; 0 means 1420 (match the kernel TUN).
	MTU int
	// Prefixes are the service ranges whose flows go to Dialer. Packets to addresses outside Prefixes and
	// LocalAddrs are dropped and counted (Stats.DroppedNotServed).
	Prefixes []netip.Prefix
	// LocalAddrs are addresses the stack owns itself (the DNS IP): ListenTCP and ListenUDP bind there.
	// Flows to a LocalAddr on a port nobody listens on are refused by the stack (TCP RST, ICMP port
	// unreachable), never given to Dialer.
	LocalAddrs []netip.Addr
	// AdmitLocalUDP, when set, is asked for every UDP datagram to a LocalAddr before the stack queues
	// it (the agent's DNS server polices its sources there, dns.Server.AdmitDatagram, so a flood is
	// dropped before it fills the socket's buffer); false drops it, counted in Stats.DroppedPoliced.
	// It is called from Write's goroutine and must be quick.
	AdmitLocalUDP func(src netip.Addr, dst netip.AddrPort) bool
	// UDPIdleTimeout closes a UDP flow idle in both directions this long; 0 means 60s.
	UDPIdleTimeout time.Duration
	// ConnectTimeout is the deadline of DialFlow's ctx; 0 means 5s.
	ConnectTimeout time.Duration

	// MaxTCPFlows caps the TCP flows held at once, from the SYN being admitted (DialFlow already
	// holds a descriptor) to the end of the flow; 0 means DefaultMaxTCPFlows of the RLIMIT_NOFILE in
	// force at New. A SYN over a cap is answered with a RST, before AdmitFlow and DialFlow, and
	// counted (FlowStats.CapClient, CapTotal).
	MaxTCPFlows int
	// MaxTCPFlowsPerClient caps the TCP flows of one client (source address); 0 means
	// MaxTCPFlows/4. It is at most MaxTCPFlows.
	MaxTCPFlowsPerClient int
	// MaxUDPFlows caps the UDP flows held at once; 0 means DefaultMaxUDPFlows of the RLIMIT_NOFILE in
	// force at New. A datagram that would open one more is dropped and counted (FlowStats.CapTotal).
	MaxUDPFlows int
	// MaxUDPFlowsPerClient caps the UDP flows of one client; 0 means MaxUDPFlows/4. A datagram that
	// would open one more evicts the client's least recently active flow if that one is idle for
	// UDPEvictIdle (FlowStats.Evicted), and is dropped and counted otherwise (FlowStats.CapClient).
	MaxUDPFlowsPerClient int
	// UDPEvictIdle is how long a UDP flow must have been idle to be evicted for a new flow of the
	// same client; 0 means UDPIdleTimeout/4.
	UDPEvictIdle time.Duration
	// UDPQueueBytes bounds the datagrams a UDP flow queues in the stack for its upstream, in payload
	// bytes (one datagram more may pass the bound); 0 means DefaultUDPQueueBytes. Datagrams beyond
	// it are dropped and counted (FlowStats.QueueDrops). A flow gets this much while the flows' queues
	// together stay within UDPQueueBudget, and MinUDPQueueBytes beyond: a few flows ride out the
	// scheduling hiccups of a fast sender, and many flows cannot make the stack hold much.
	UDPQueueBytes int
	// UDPQueueBudget bounds the sum of the UDPQueueBytes given to open flows; 0 means
	// DefaultUDPQueueBudget. The most the queues can hold is this plus MinUDPQueueBytes a flow.
	UDPQueueBudget int
}

const (
	// DefaultUDPQueueBytes is the default of Config.UDPQueueBytes: Linux's default socket receive
	// buffer, some 150 datagrams of 1,400 bytes (5 ms at 30,000 a second).
	DefaultUDPQueueBytes = 208 << 10
	// DefaultUDPQueueBudget is the default of Config.UDPQueueBudget: 78 flows with full queues.
	DefaultUDPQueueBudget = 16 << 20
	// MinUDPQueueBytes is the queue of a flow opened when the budget is spent.
	MinUDPQueueBytes = 16 << 10
)

// DefaultMaxTCPFlows returns the default of Config.MaxTCPFlows for a file-descriptor limit fdLimit:
// fdLimit/5 (one upstream descriptor a flow), at least 64 and at most 8192. DefaultMaxUDPFlows is
// its UDP counterpart: fdLimit/10, at least 32 and at most 4096. The per-client defaults are a
// quarter of these. At the load goals' limit of 20,000: 4,000 TCP flows (1,000 per client) and
// 2,000 UDP flows (500 per client). See overlay/internal/flows for the whole budget.
func DefaultMaxTCPFlows(fdLimit int) int { return flows.DefaultTCP(fdLimit) }

// DefaultMaxUDPFlows: see DefaultMaxTCPFlows.
func DefaultMaxUDPFlows(fdLimit int) int { return flows.DefaultUDP(fdLimit) }

const (
	defaultMTU            = 1420
	defaultUDPIdleTimeout = 60 * time.Second
	defaultConnectTimeout = 5 * time.Second

	nicID = tcpip.NICID(1)
	// tcpMaxInFlight bounds TCP handshakes waiting for DialFlow; SYNs beyond it are ignored (the client
	// retransmits).
	tcpMaxInFlight = 1024
	// tcpBufMax is the largest TCP send and receive buffer auto-tuning may grow to.
	tcpBufMax = 4 << 20
)

// FlowStats counts the flows of one transport protocol.
type FlowStats struct {
	Opened  uint64 // flows spliced to an upstream connection
	Active  uint64 // flows open now
	Refused uint64 // flows DialFlow refused (or that could not be set up)
	// BytesUp counts payload bytes from clients to upstream connections, BytesDown the other way.
	BytesUp, BytesDown uint64
	// DroppedDatagrams counts UDP datagrams lost with a refused flow or too big to relay (UDP only).
	DroppedDatagrams uint64
	// CapClient counts flows refused because their client held its cap of flows (a TCP SYN answered
	// with a RST; a UDP datagram dropped), CapTotal because the stack held its total cap.
	CapClient, CapTotal uint64
	// Evicted counts UDP flows closed to make room for a new flow of the same client (UDP only).
	Evicted uint64
	// QueueDrops counts UDP datagrams dropped because their flow's queue held UDPQueueBytes (UDP
	// only).
	QueueDrops uint64
	// Held is the flows holding a slot now, including those still being dialled.
	Held uint64
	// Max and MaxPerClient are the caps in force.
	Max, MaxPerClient uint64
}

// Stats is a snapshot of the Stack's counters.
type Stats struct {
	TCP, UDP FlowStats
	// PacketsIn counts packets written into the stack and accepted; PacketsOut packets read out of it.
	PacketsIn, PacketsOut uint64
	// DroppedMalformed counts packets written in that are not IPv4/IPv6 or are truncated.
	DroppedMalformed uint64
	// DroppedNotServed counts packets written in whose destination is neither in Prefixes nor LocalAddrs.
	DroppedNotServed uint64
	// DroppedOutbound counts packets the stack emitted that did not fit the reader's buffer.
	DroppedOutbound uint64
	// DroppedPoliced counts UDP datagrams to a LocalAddr that AdmitLocalUDP refused.
	DroppedPoliced uint64
}

type flowCounters struct {
	opened, active, refused, bytesUp, bytesDown, droppedDatagrams atomic.Uint64
	capClient, capTotal, evicted, queueDrops                      atomic.Uint64
}

func snapshot[F flows.Flow](c *flowCounters, t *flows.Table[F]) FlowStats {
	perClient, total := t.Caps()
	return FlowStats{
		Opened:           c.opened.Load(),
		Active:           c.active.Load(),
		Refused:          c.refused.Load(),
		BytesUp:          c.bytesUp.Load(),
		BytesDown:        c.bytesDown.Load(),
		DroppedDatagrams: c.droppedDatagrams.Load(),
		CapClient:        c.capClient.Load(),
		CapTotal:         c.capTotal.Load(),
		Evicted:          c.evicted.Load(),
		QueueDrops:       c.queueDrops.Load(),
		Held:             uint64(t.Len()),
		Max:              uint64(total),
		MaxPerClient:     uint64(perClient),
	}
}

// Stack is the service netstack. It is a tun.Device (see device.go).
//
// States: built (New) → started (Start) → closed (Close). Packets may be written and read once built;
// UDP flows are reaped only once started. Close may be called in any state, more than once.
type Stack struct {
	log    *slog.Logger
	cfg    Config
	ipstk  *stack.Stack
	link   *linkEndpoint
	events chan tun.Event

	ctx    context.Context // canceled by Close
	cancel context.CancelFunc
	down   atomic.Bool // set by Close before anything is torn down; checked by Read and Write

	tcpStats, udpStats                                  flowCounters
	packetsIn, packetsOut                               atomic.Uint64
	droppedMalformed, droppedNotServed, droppedOutbound atomic.Uint64
	droppedPoliced                                      atomic.Uint64
	logLimiter                                          ratelimit.Limiter
	// bufs holds the buffers flows take while data waits (see tcp.go, udp.go); tcpTable and udpTable
	// hold a slot per flow, against the caps.
	bufs     flows.Buffers
	tcpTable *flows.Table[flows.Counted]
	udpTable *flows.Table[*flow]
	// udpQueued is the UDP queue budget open flows hold (reserveUDPQueue).
	udpQueued atomic.Int64

	closeOnce sync.Once
	wg        sync.WaitGroup // every goroutine the Stack starts or adopts (gVisor's TCP handler goroutines)

	// mu guards all following fields.
	mu      sync.Mutex
	closed  bool
	started bool
	flows   map[*flow]struct{} // open TCP and UDP flows
}

var _ tun.Device = (*Stack)(nil)

// New builds the stack: protocols, options, the NIC, addresses, routes and flow forwarders. It starts no
// goroutine.
func New(cfg Config) (*Stack, error) {
	if cfg.Dialer == nil {
		return nil, errors.New("netstack: Config.Dialer is required")
	}
	if cfg.MTU == 0 {
		cfg.MTU = defaultMTU
	}
	if cfg.MTU < 1280 || cfg.MTU > 65535 {
		return nil, fmt.Errorf("netstack: MTU %d out of range [1280, 65535]", cfg.MTU)
	}
	if cfg.UDPIdleTimeout <= 0 {
		cfg.UDPIdleTimeout = defaultUDPIdleTimeout
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = defaultConnectTimeout
	}
	cfg = flowDefaults(cfg)
	for _, p := range cfg.Prefixes {
		if !p.IsValid() {
			return nil, fmt.Errorf("netstack: invalid service prefix %v", p)
		}
	}
	cfg.Prefixes = append([]netip.Prefix(nil), cfg.Prefixes...)
	for i, p := range cfg.Prefixes {
		cfg.Prefixes[i] = p.Masked()
	}
	cfg.LocalAddrs = append([]netip.Addr(nil), cfg.LocalAddrs...)
	for i, a := range cfg.LocalAddrs {
		if !a.IsValid() {
			return nil, fmt.Errorf("netstack: invalid local address %v", a)
		}
		cfg.LocalAddrs[i] = a.Unmap()
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}

	ipstk := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	ctx, cancel := context.WithCancel(context.Background())
	s := &Stack{
		log:    logger.With("component", "netstack"),
		cfg:    cfg,
		ipstk:  ipstk,
		link:   newLinkEndpoint(cfg.MTU),
		events: make(chan tun.Event, 1),
		ctx:    ctx,
		cancel: cancel,
		flows:  make(map[*flow]struct{}),

		tcpTable: flows.NewTable[flows.Counted](cfg.MaxTCPFlowsPerClient, cfg.MaxTCPFlows),
		udpTable: flows.NewTable[*flow](cfg.MaxUDPFlowsPerClient, cfg.MaxUDPFlows),
	}
	s.logLimiter.Every = time.Second
	if err := s.setup(); err != nil {
		cancel()
		ipstk.Close()
		ipstk.Wait()
		return nil, err
	}
	s.events <- tun.EventUp
	return s, nil
}

// timeWaitTimeout is how long the stack keeps a closed connection in TIME_WAIT.
const timeWaitTimeout = 10 * time.Millisecond

func (s *Stack) setup() error {
	sack := tcpip.TCPSACKEnabled(true)
	moderate := tcpip.TCPModerateReceiveBufferOption(true)
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: tcp.DefaultReceiveBufferSize, Max: tcpBufMax}
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: tcp.DefaultSendBufferSize, Max: tcpBufMax}
	// A flow the endpoint closes first leaves the stack's side in TIME_WAIT. gVisor lets a new SYN
	// reuse a TIME_WAIT connection only when a listener exists, and the forwarder is none: a client
	// reusing its source port within TIME_WAIT would have its SYN dropped. On a TUN to the local
	// kernel no stray old segment can arrive late, so TIME_WAIT can be all but skipped.
	timeWait := tcpip.TCPTimeWaitTimeoutOption(timeWaitTimeout)
	for _, o := range []struct {
		name string
		opt  tcpip.SettableTransportProtocolOption
	}{
		{"SACK", &sack},
		{"receive buffer moderation", &moderate},
		{"receive buffer range", &rcv},
		{"send buffer range", &snd},
		{"TIME_WAIT timeout", &timeWait},
	} {
		if err := s.ipstk.SetTransportProtocolOption(tcp.ProtocolNumber, o.opt); err != nil {
			return fmt.Errorf("netstack: set TCP %s: %v", o.name, err)
		}
	}

	if err := s.ipstk.CreateNIC(nicID, s.link); err != nil {
		return fmt.Errorf("netstack: create NIC: %v", err)
	}
	// Promiscuous: accept packets to any address (every service IP), not only assigned ones.
	// Spoofing: send replies from those unassigned addresses.
	if err := s.ipstk.SetPromiscuousMode(nicID, true); err != nil {
		return fmt.Errorf("netstack: set promiscuous mode: %v", err)
	}
	if err := s.ipstk.SetSpoofing(nicID, true); err != nil {
		return fmt.Errorf("netstack: set spoofing: %v", err)
	}
	for _, a := range s.cfg.LocalAddrs {
		pa := tcpip.ProtocolAddress{
			Protocol:          networkProtocol(a),
			AddressWithPrefix: tcpip.AddrFromSlice(a.AsSlice()).WithPrefix(),
		}
		if err := s.ipstk.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); err != nil {
			return fmt.Errorf("netstack: add local address %v: %v", a, err)
		}
	}
	// Every reply leaves through the one NIC, whatever the client's address: default routes for both
	// families (they cover the service prefixes and LocalAddrs). Inbound filtering by destination is done
	// in Write, before a packet reaches the stack.
	s.ipstk.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})

	tcpFwd := tcp.NewForwarder(s.ipstk, 0, tcpMaxInFlight, s.handleTCP)
	s.ipstk.SetTransportProtocolHandler(tcp.ProtocolNumber, func(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
		if s.isLocal(id.LocalAddress) {
			return false // nobody listens: the stack answers with a RST
		}
		return tcpFwd.HandlePacket(id, pkt)
	})
	udpFwd := udp.NewForwarder(s.ipstk, s.handleUDP)
	s.ipstk.SetTransportProtocolHandler(udp.ProtocolNumber, func(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
		if s.isLocal(id.LocalAddress) {
			return false // nobody listens: the stack answers with ICMP port unreachable
		}
		return udpFwd.HandlePacket(id, pkt)
	})
	return nil
}

// Start starts the UDP idle reaper. It returns an error if the Stack is closed or already started.
func (s *Stack) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("netstack: start: %w", net.ErrClosed)
	}
	if s.started {
		return errors.New("netstack: already started")
	}
	s.started = true
	s.wg.Add(1)
	go s.reapUDP()
	return nil
}

// ListenTCP listens for TCP connections on ap, whose address must be one of Config.LocalAddrs.
func (s *Stack) ListenTCP(ap netip.AddrPort) (net.Listener, error) {
	fa, proto, err := s.localFullAddr(ap)
	if err != nil {
		return nil, fmt.Errorf("netstack: listen tcp %v: %w", ap, err)
	}
	l, err := gonet.ListenTCP(s.ipstk, fa, proto)
	if err != nil {
		return nil, fmt.Errorf("netstack: listen tcp %v: %w", ap, err)
	}
	return l, nil
}

// ListenUDP binds a UDP socket to ap, whose address must be one of Config.LocalAddrs.
func (s *Stack) ListenUDP(ap netip.AddrPort) (net.PacketConn, error) {
	fa, proto, err := s.localFullAddr(ap)
	if err != nil {
		return nil, fmt.Errorf("netstack: listen udp %v: %w", ap, err)
	}
	c, err := gonet.DialUDP(s.ipstk, &fa, nil, proto)
	if err != nil {
		return nil, fmt.Errorf("netstack: listen udp %v: %w", ap, err)
	}
	return c, nil
}

func (s *Stack) localFullAddr(ap netip.AddrPort) (tcpip.FullAddress, tcpip.NetworkProtocolNumber, error) {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return tcpip.FullAddress{}, 0, net.ErrClosed
	}
	a := ap.Addr().Unmap()
	if !ap.IsValid() || !s.isLocal(tcpip.AddrFromSlice(a.AsSlice())) {
		return tcpip.FullAddress{}, 0, fmt.Errorf("address %v is not one of the stack's local addresses %v", ap.Addr(), s.cfg.LocalAddrs)
	}
	return tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFromSlice(a.AsSlice()), Port: ap.Port()}, networkProtocol(a), nil
}

// Stats returns a snapshot of the counters.
func (s *Stack) Stats() Stats {
	return Stats{
		TCP:              snapshot(&s.tcpStats, s.tcpTable),
		UDP:              s.udpSnapshot(),
		PacketsIn:        s.packetsIn.Load(),
		PacketsOut:       s.packetsOut.Load(),
		DroppedMalformed: s.droppedMalformed.Load(),
		DroppedNotServed: s.droppedNotServed.Load(),
		DroppedOutbound:  s.droppedOutbound.Load(),
		DroppedPoliced:   s.droppedPoliced.Load(),
	}
}

// Close closes every flow, the stack and the device, and waits for every goroutine the Stack started.
// Read and Write return net.ErrClosed afterwards. Close is idempotent; listeners returned by ListenTCP and
// ListenUDP should be closed by their owners first (the stack's endpoints are torn down regardless).
func (s *Stack) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		flows := make([]*flow, 0, len(s.flows))
		for f := range s.flows {
			flows = append(flows, f)
		}
		s.mu.Unlock()

		s.down.Store(true)
		s.cancel() // aborts DialFlow calls and unblocks Read
		for _, f := range flows {
			f.close()
		}
		// Tears down every endpoint, which also fails the TCP handshakes a handler may be waiting on.
		s.ipstk.Close()
		s.wg.Wait()
		s.ipstk.Wait()
		s.link.Close()
		close(s.events)
	})
	return nil
}

// enter registers a goroutine with s.wg unless the Stack is closed; the caller must call s.wg.Done
// when it returns true.
func (s *Stack) enter() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	return true
}

// addFlow records f so Close can close it. It returns false (and f must be closed) if the Stack is
// closed.
func (s *Stack) addFlow(f *flow) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.flows[f] = struct{}{}
	return true
}

func (s *Stack) removeFlow(f *flow) {
	s.mu.Lock()
	delete(s.flows, f)
	s.mu.Unlock()
}

func (s *Stack) isLocal(a tcpip.Address) bool {
	for _, l := range s.cfg.LocalAddrs {
		if l.BitLen() == a.BitLen() && tcpip.AddrFromSlice(l.AsSlice()) == a {
			return true
		}
	}
	return false
}

// logf logs a per-flow or per-packet event at most once per second (rate-limited), with the number of
// events suppressed since the last one.
func (s *Stack) logf(level slog.Level, msg string, args ...any) {
	if n, ok := s.logLimiter.Allow(); ok {
		if n > 0 {
			args = append(args, "suppressed", n)
		}
		s.log.Log(context.Background(), level, msg, args...)
	}
}

// flow is one spliced TCP connection or UDP flow; close closes both sides.
type flow struct {
	client, upstream io.Closer
	udp              bool
	lastActive       atomic.Int64 // UnixNano of the last datagram either way (UDP only)
	once             sync.Once
}

func (f *flow) close() {
	f.once.Do(func() {
		f.client.Close()
		f.upstream.Close()
	})
}

func networkProtocol(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Is4() {
		return ipv4.ProtocolNumber
	}
	return ipv6.ProtocolNumber
}

func addrPort(a tcpip.Address, port uint16) netip.AddrPort {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return netip.AddrPortFrom(ip, port)
}
