// Package overlay owns the node agent engine: its lifecycle, and the application of discovery
// snapshots to the service proxy and the DNS server. It wires the kernel TUN (overlay/tun), the
// service netstack (overlay/netstack), the load-balancing proxy (overlay/proxy), the DNS server (dns)
// and the control socket (overlay/control) together, and removes everything it added to the host when
// it stops.
//
// Lifecycle: New validates the Config and starts nothing; Run brings the agent up, serves until its
// context is done or `meshctl down` is asked, then tears everything down in reverse order and returns.
package overlay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/dns"
	"github.com/edgewire/edgewire/overlay/control"
	"github.com/edgewire/edgewire/overlay/forward"
	"github.com/edgewire/edgewire/overlay/identity"
	"github.com/edgewire/edgewire/overlay/netstack"
	"github.com/edgewire/edgewire/overlay/path"
	"github.com/edgewire/edgewire/overlay/proxy"
	"github.com/edgewire/edgewire/overlay/tun"
)

// Version is the agent's version, set by the build.
var Version = "dev"

// Config is the agent's configuration, parsed once by cmd/meshctl. Zero values mean the defaults
// written beside each field.
type Config struct {
	Logger *slog.Logger // nil: discard

	NodeName string // required
	// StateDir holds the node's keys and cached catalog; created 0700 if missing.
	StateDir string
	// ServiceCIDR is the range of service IPs routed to the TUN (default 9.251.0.0/16).
	ServiceCIDR netip.Prefix
	// DNSIP is the address the DNS server answers on, port 53 (default 169.254.96.16).
	DNSIP netip.Addr
	// ClusterDomain is the DNS zone of services (default cluster.local).
	ClusterDomain string
	// ControlSocket is the Unix socket `meshctl` verbs talk to (default /run/edgewire/meshctl.sock).
	ControlSocket string
	// TUNName is the name of the TUN device (default mesh0).
	TUNName string
	// MTU of the TUN device (default 1420).
	MTU int
	// UDPIdleTimeout closes a UDP flow idle this long in both directions (default 20s, as the
	// kernel's conntrack keeps an unanswered UDP flow 30s: long enough for request/response
	// protocols, short enough that a burst of flows from many ports is gone soon after it ends).
	UDPIdleTimeout time.Duration
	// ConnectTimeout bounds the connection to an endpoint, retries included (default 5s).
	ConnectTimeout time.Duration
	// ListenPort is the UDP port of the node's WireGuard socket (default 51820).
	ListenPort uint16
	// OverlayPrefix is the overlay range (default identity.DefaultOverlayPrefix, an IPv6 ULA /48);
	// each node's overlay address in it is derived from its WireGuard public key.
	OverlayPrefix netip.Prefix
	// WGInterface names the WireGuard UAPI socket, /var/run/wireguard/<WGInterface>.sock, that `wg show`
	// reads (default: TUNName).
	WGInterface string
	// WireGuardBuffers bounds wireguard-go's 64 KiB packet buffers (default DefaultWireGuardBuffers):
	// the most memory its queues can hold is this many times 64 KiB. Beyond it the TUN reader and
	// the socket receivers wait, and the kernel's queues drop (wgbuffers.go).
	WireGuardBuffers int
	// ForwardPort is the port, TCP and UDP, of the agent-to-agent forward listener on the overlay
	// address (default forward.DefaultPort).
	ForwardPort uint16

	// Relays are the mesh-relay servers to register with ("host:port" or a multiaddr with
	// /p2p/<peer ID>); none: peers come from the catalog alone and no NAT traversal happens.
	Relays []string
	// JoinToken admits the node to the relays. Never logged.
	JoinToken string

	// Upstreams are the resolvers ("ip:port") for names outside the cluster domain; none: SERVFAIL.
	Upstreams []string

	// Source supplies the catalog (required). SourceName describes it for `meshctl status`. When it
	// is a discovery.Publisher too (the Kubernetes source), the agent publishes its WireGuard key,
	// overlay address and LAN endpoints through it once WireGuard is up.
	Source     discovery.Source
	SourceName string

	// HealthAddr is the address of the HTTP health endpoint (/healthz, /readyz); "" = none.
	HealthAddr string
	// Pprof serves the Go profiler under /debug/pprof/ on HealthAddr (off by default: profiles
	// show what the agent is doing to anyone who can reach the address).
	Pprof bool

	// MaxTCPFlows caps the TCP flows held at once, by the service netstack (the flows this node's
	// applications open to services) and by the forward listener (the flows other agents bring to
	// this node's endpoints) each; their per-client caps follow (a quarter of it per client in the
	// netstack, half of it per peer in the listener). 0: each derives its cap from the
	// RLIMIT_NOFILE in force (netstack.DefaultMaxTCPFlows, forward.DefaultMaxTCPFlows).
	// MaxUDPFlows is the same for UDP flows (netstack.DefaultMaxUDPFlows,
	// forward.DefaultMaxUDPFlows).
	MaxTCPFlows int
	MaxUDPFlows int
	// DNSSourceRate is how many UDP datagrams per second one source address may send to the DNS
	// server (dns.Config.SourceRate; 0: dns.DefaultSourceRate; negative: no per-source limit).
	DNSSourceRate int
	// DNSMaxForwards bounds the DNS server's upstream exchanges in flight (dns.Config.MaxForwards;
	// 0: dns.DefaultMaxForwards).
	DNSMaxForwards int
}

func (c *Config) setDefaults() error {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.NodeName == "" {
		return errors.New("node name is empty (set --node-name)")
	}
	if c.Source == nil {
		return errors.New("no catalog source (set --services-file)")
	}
	if c.StateDir == "" {
		c.StateDir = "/var/lib/edgewire"
	}
	if !c.ServiceCIDR.IsValid() {
		c.ServiceCIDR = netip.MustParsePrefix("9.251.0.0/16")
	}
	c.ServiceCIDR = c.ServiceCIDR.Masked()
	if !c.DNSIP.IsValid() {
		c.DNSIP = netip.MustParseAddr("169.254.96.16")
	}
	if c.ClusterDomain == "" {
		c.ClusterDomain = "cluster.local"
	}
	if c.ControlSocket == "" {
		c.ControlSocket = "/run/edgewire/meshctl.sock"
	}
	if c.TUNName == "" {
		c.TUNName = "mesh0"
	}
	if c.MTU == 0 {
		c.MTU = 1420
	}
	if c.MTU < 1280 || c.MTU > 65535 {
		return fmt.Errorf("mtu %d: must be 1280-65535", c.MTU)
	}
	if c.ListenPort == 0 {
		c.ListenPort = path.DefaultPort
	}
	if !c.OverlayPrefix.IsValid() {
		c.OverlayPrefix = identity.DefaultOverlayPrefix
	}
	if err := identity.CheckOverlayPrefix(c.OverlayPrefix); err != nil {
		return fmt.Errorf("overlay prefix: %w", err)
	}
	c.OverlayPrefix = c.OverlayPrefix.Masked()
	if c.WGInterface == "" {
		c.WGInterface = c.TUNName
	}
	if c.ForwardPort == 0 {
		c.ForwardPort = forward.DefaultPort
	}
	if c.WireGuardBuffers == 0 {
		c.WireGuardBuffers = DefaultWireGuardBuffers
	}
	if c.WireGuardBuffers < minWireGuardBuffers {
		return fmt.Errorf("wireguard buffers %d (--wireguard-buffers): at least %d, what the device's receivers and TUN reader hold", c.WireGuardBuffers, minWireGuardBuffers)
	}
	if c.UDPIdleTimeout == 0 {
		c.UDPIdleTimeout = DefaultUDPIdleTimeout
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = 5 * time.Second
	}
	return nil
}

// DefaultUDPIdleTimeout is the default of Config.UDPIdleTimeout.
const DefaultUDPIdleTimeout = 20 * time.Second

// DefaultWireGuardBuffers is the default of Config.WireGuardBuffers: 48 MiB of buffers at most, of
// which the device's receivers and TUN reader hold 384 (24 MiB) while idle.
const DefaultWireGuardBuffers = 768

// minWireGuardBuffers is what wireguard-go holds while idle: a batch for each of the Bind's two
// receive functions and one for the TUN reader (3 x 128), plus room for a batch in flight.
const minWireGuardBuffers = 512

// Agent is one node's agent.
type Agent struct {
	cfg    Config
	logger *slog.Logger

	proxy *proxy.Proxy
	dns   *dns.Server
	meshP atomic.Pointer[mesh] // set by Run once the identity is loaded

	started  time.Time
	snap     atomic.Pointer[discovery.Snapshot]
	snapTime atomic.Pointer[time.Time]
	stack    atomic.Pointer[netstack.Stack]

	health *health // nil without HealthAddr
	// release asks releaseMemory to return freed memory to the kernel (a catalog was applied).
	release  chan struct{}
	releases atomic.Uint64 // memory releases (memory.go)

	downOnce sync.Once
	down     chan struct{}
}

// New validates cfg and builds the agent. It starts nothing and touches nothing on the host.
func New(cfg Config) (*Agent, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, fmt.Errorf("agent config: %w", err)
	}
	logger := cfg.Logger
	d, err := dns.New(dns.Config{
		Logger:      logger,
		Domain:      cfg.ClusterDomain,
		Upstreams:   cfg.Upstreams,
		SourceRate:  cfg.DNSSourceRate,
		MaxForwards: cfg.DNSMaxForwards,
	})
	if err != nil {
		return nil, fmt.Errorf("agent config: dns: %w", err)
	}
	a := &Agent{
		cfg:    cfg,
		logger: logger.With("component", "agent"),
		dns:    d,
		down:   make(chan struct{}),
		// Buffered: apply never waits for releaseMemory.
		release: make(chan struct{}, 1),
	}
	// The proxy dials endpoints through the mesh, which exists once Run has loaded the identity.
	a.proxy = proxy.New(proxy.Config{Logger: logger, Dialer: (*meshDialer)(a), LocalNode: cfg.NodeName})
	a.snap.Store(&discovery.Snapshot{})
	return a, nil
}

// Run brings the agent up and serves until ctx is done or Down is called; then it removes the TUN
// and its routes, stops every goroutine it started and returns. An error from bringing up any part
// is returned after undoing what was already done.
func (a *Agent) Run(ctx context.Context) (err error) {
	a.started = time.Now()
	cfg := a.cfg
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	id, created, err := identity.LoadOrCreate(cfg.StateDir)
	if err != nil {
		return fmt.Errorf("node identity: %w", err)
	}
	overlayAddr, err := identity.OverlayAddr(cfg.OverlayPrefix, id.WireGuardPublic)
	if err != nil {
		return fmt.Errorf("node identity: %w", err)
	}
	a.logger.Info("node identity", "created", created, "wireguard_public_key", id.WireGuardPublic.String(),
		"overlay", overlayAddr, "state_dir", cfg.StateDir)
	m := newMesh(&cfg, id, overlayAddr)
	a.meshP.Store(m)

	var cleanups []func() error
	defer func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			if cerr := cleanups[i](); cerr != nil {
				a.logger.Warn("shutdown", "err", cerr)
				err = errors.Join(err, cerr)
			}
		}
	}()

	if cfg.HealthAddr != "" {
		h, err := startHealth(cfg.HealthAddr, cfg.Pprof)
		if err != nil {
			return err
		}
		cleanups = append(cleanups, h.close)
		a.health = h
		h.set("waiting for the first catalog", nil)
	}

	// The catalog first: an agent with a broken catalog file should fail before touching the host.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var memWG sync.WaitGroup
	memWG.Go(func() { a.releaseMemory(ctx) })
	cleanups = append(cleanups, func() error {
		cancel()
		memWG.Wait()
		return nil
	})
	first := make(chan struct{})
	var firstOnce sync.Once
	srcErr := make(chan error, 1)
	go func() {
		srcErr <- cfg.Source.Run(ctx, func(s *discovery.Snapshot) {
			a.apply(s)
			firstOnce.Do(func() { close(first) })
		})
	}()
	cleanups = append(cleanups, func() error {
		cancel()
		return <-srcErr
	})
	select {
	case <-first:
	case err := <-srcErr:
		srcErr <- nil // the cleanup above reads it again
		if err == nil {
			return errors.New("catalog source stopped before its first snapshot")
		}
		return fmt.Errorf("catalog: %w", err)
	case <-ctx.Done():
		return nil
	}

	stack, err := netstack.New(netstack.Config{
		Logger:     cfg.Logger,
		Dialer:     a.proxy,
		MTU:        cfg.MTU,
		Prefixes:   []netip.Prefix{cfg.ServiceCIDR},
		LocalAddrs: []netip.Addr{cfg.DNSIP},
		// A DNS flood is dropped per source before it fills the DNS socket's buffer.
		AdmitLocalUDP: func(src netip.Addr, dst netip.AddrPort) bool {
			return dst.Port() != 53 || a.dns.AdmitDatagram(src)
		},
		UDPIdleTimeout: cfg.UDPIdleTimeout,
		ConnectTimeout: cfg.ConnectTimeout,
		MaxTCPFlows:    cfg.MaxTCPFlows,
		MaxUDPFlows:    cfg.MaxUDPFlows,
	})
	if err != nil {
		return fmt.Errorf("service netstack: %w", err)
	}
	cleanups = append(cleanups, stack.Close)
	if err := stack.Start(); err != nil {
		return fmt.Errorf("service netstack: %w", err)
	}
	a.stack.Store(stack)

	dnsAP := netip.AddrPortFrom(cfg.DNSIP, 53)
	pc, err := stack.ListenUDP(dnsAP)
	if err != nil {
		return fmt.Errorf("dns: listen udp %s: %w", dnsAP, err)
	}
	ln, err := stack.ListenTCP(dnsAP)
	if err != nil {
		pc.Close()
		return fmt.Errorf("dns: listen tcp %s: %w", dnsAP, err)
	}
	if err := a.dns.Start(pc, ln); err != nil {
		pc.Close()
		ln.Close()
		return fmt.Errorf("dns: %w", err)
	}
	cleanups = append(cleanups, a.dns.Close)

	dev, err := tun.Open(tun.Config{
		Logger: cfg.Logger,
		Name:   cfg.TUNName,
		MTU:    cfg.MTU,
		Addrs:  []netip.Prefix{netip.PrefixFrom(overlayAddr, overlayAddr.BitLen())},
		Routes: []netip.Prefix{cfg.ServiceCIDR, netip.PrefixFrom(cfg.DNSIP, cfg.DNSIP.BitLen()), cfg.OverlayPrefix},
	})
	if err != nil {
		return err
	}
	splitter := tun.NewSplitter(cfg.Logger, dev.TUN())
	splitter.Route(cfg.ServiceCIDR, stack)
	splitter.Route(netip.PrefixFrom(cfg.DNSIP, cfg.DNSIP.BitLen()), stack)
	overlayDev := splitter.Overlay()
	// Closing the TUN (after removing its routes) unblocks wireguard-go's reader of it, which then
	// closes its device; mesh.close waits for that. DNS stops before the stack it listens on. Closing the
	// stack unblocks the splitter's reader of
	// it; only then can the splitter be waited for.
	cleanups = append(cleanups, func() error {
		derr := dev.Close()
		return errors.Join(derr, m.close(), a.dns.Close(), stack.Close(), splitter.Close())
	})
	if err := splitter.Start(); err != nil {
		return fmt.Errorf("tun %s: %w", dev.Name(), err)
	}
	// Relays the catalog names (the Kubernetes relay Secret, or its cached copy) join --relay.
	m.addRelays(a.snap.Load().Relays)
	if err := m.start(overlayDev, dev.Name()); err != nil {
		return err
	}
	m.apply(a.snap.Load())
	if p, ok := cfg.Source.(discovery.Publisher); ok {
		self := discovery.Self{WireGuardKey: id.WireGuardPublic.String(), Overlay: overlayAddr, Endpoints: m.interfaceEndpoints()}
		a.logger.Info("publishing this node's WireGuard key and endpoints", "endpoints", self.Endpoints)
		p.Publish(self)
	}

	ctl := control.NewServer(cfg.ControlSocket, (*backend)(a), cfg.Logger)
	if err := ctl.Start(); err != nil {
		return err
	}
	cleanups = append(cleanups, ctl.Close)

	if a.health != nil {
		dnsAddr := dnsAP.String()
		a.health.set("", func(ctx context.Context) error { return dns.Probe(ctx, dnsAddr, cfg.ClusterDomain) })
	}
	a.logger.Info("agent up",
		"node", cfg.NodeName, "tun", dev.Name(), "service_cidr", cfg.ServiceCIDR,
		"dns", dnsAP, "control_socket", cfg.ControlSocket, "upstreams", cfg.Upstreams)

	select {
	case <-ctx.Done():
		a.logger.Info("shutting down", "reason", context.Cause(ctx))
	case <-a.down:
		a.logger.Info("shutting down", "reason", "meshctl down")
	}
	return nil
}

// Down asks Run to return. It is safe to call more than once and from any goroutine.
func (a *Agent) Down() {
	a.downOnce.Do(func() { close(a.down) })
}

// apply makes snapshot s the agent's catalog. It is called by the source, one call at a time.
func (a *Agent) apply(s *discovery.Snapshot) {
	start := time.Now()
	if err := discovery.AssignIPs(s, a.cfg.ServiceCIDR, a.cfg.DNSIP); err != nil {
		a.logger.Error("catalog rejected: service IPs", "err", err)
		return
	}
	a.proxy.Update(s)
	a.dns.Update(s)
	a.snap.Store(s)
	if m := a.meshP.Load(); m != nil {
		m.apply(s)
	}
	now := time.Now()
	a.snapTime.Store(&now)
	var eps int
	for _, svc := range s.Services {
		eps += len(svc.Endpoints)
	}
	a.logger.Info("catalog applied", "services", len(s.Services), "endpoints", eps,
		"nodes", len(s.Nodes), "took", time.Since(start))
	select {
	case a.release <- struct{}{}:
	default:
	}
}

// The proxy admits flows before it dials them: the netstack completes a client's handshake while the
// proxy dials.
var _ netstack.Admitter = (*proxy.Proxy)(nil)

// meshDialer is the proxy's EndpointDialer: the mesh once it exists.
type meshDialer Agent

func (d *meshDialer) DialEndpoint(ctx context.Context, proto discovery.Protocol, ep *discovery.Endpoint, addr netip.AddrPort) (net.Conn, error) {
	m := (*Agent)(d).meshP.Load()
	if m == nil {
		return nil, errors.New("agent not running")
	}
	return m.DialEndpoint(ctx, proto, ep, addr)
}
