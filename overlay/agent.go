// Package overlay owns the node agent engine: its lifecycle, and the application of discovery
// snapshots to the service proxy and the DNS server. It wires the kernel TUN (overlay/tun), the
// service netstack (overlay/netstack), the load-balancing proxy (overlay/proxy), the DNS server (dns)
// and the control socket (overlay/control) together, and removes everything it added to the host when
// it stops.
//
// Lifecycle: New validates the Config and starts nothing; Run brings the agent up, serves until its
// context is done or `meshctl down` is asked, then tears everything down in reverse order and returns.
// The parts that touch the host (the TUN, the WireGuard socket, the identity, the UAPI socket, the
// forward listener, local dials) come from the Config; nil means the real one (config.go).
//
// # States
//
// Run takes the agent through these states; every arrow but the last can also go to stopping,
// when ctx is done, Down is called or a part fails to start:
//
//	new ──Run──► identity ──► catalog ──► data plane ──► mesh ──► up ──ctx/Down──► stopping ──► stopped
//
//	identity    the keys (Config.Identity or StateDir) and the overlay address
//	catalog     the source runs; Run waits for its first snapshot. Every snapshot, then and later,
//	            goes to the proxy and the DNS server at once and is kept as the latest (a.snap)
//	data plane  service netstack, DNS server on it, TUN and splitter; from here flows to endpoints
//	            on this node are served, flows to other nodes fail until up
//	mesh        wireguard-go, the path manager, the relay client and the forward listener start;
//	            the mesh is private to Run: snapshots that arrive meanwhile are only kept
//	up          the mesh is published (a.meshP) and given the latest snapshot, both under
//	            a.applyMu, so it sees every snapshot after that in order and never a half-started
//	            mesh; the control socket serves; /readyz checks a live round trip
//	stopping    everything started is closed in reverse order, and waited for
//
// Nothing but Run writes the mesh's parts (bind, paths, relays, dev, listener): they are set before
// the mesh is published, so the catalog source, the relay client and the control socket read them
// without a lock.
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
	"github.com/edgewire/edgewire/overlay/identity"
	"github.com/edgewire/edgewire/overlay/netstack"
	"github.com/edgewire/edgewire/overlay/proxy"
	"github.com/edgewire/edgewire/overlay/tun"
)

// Version is the agent's version, set by the build.
var Version = "dev"

// Agent is one node's agent.
type Agent struct {
	cfg    Config
	logger *slog.Logger

	proxy *proxy.Proxy
	dns   *dns.Server
	// meshP is the mesh once it is up (see States); applyMu orders its publication with apply.
	meshP   atomic.Pointer[mesh]
	applyMu sync.Mutex

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
	id, err := a.identity()
	if err != nil {
		return err
	}
	overlayAddr, err := identity.OverlayAddr(cfg.OverlayPrefix, id.WireGuardPublic)
	if err != nil {
		return fmt.Errorf("node identity: %w", err)
	}
	a.logger.Info("node overlay address", "overlay", overlayAddr)
	// The mesh stays private to Run until it is up: see States.
	m := newMesh(&cfg, id, overlayAddr)

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
		if err == nil && ctx.Err() != nil {
			// Stopped while waiting: the source returned because ctx is done, and this select
			// may see that before ctx.Done.
			return nil
		}
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

	dev, err := cfg.OpenTUN(tun.Config{
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
	a.publish(m)
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
		var dial func(ctx context.Context, network, address string) (net.Conn, error) // nil: the host's
		if hd, ok := dev.(HostDialer); ok {
			dial = hd.DialContext
		}
		a.health.set("", func(ctx context.Context) error { return dns.Probe(ctx, dial, dnsAddr, cfg.ClusterDomain) })
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

// identity returns the node's keys: Config.Identity, or those in StateDir (created there on the
// first start).
func (a *Agent) identity() (*identity.Identity, error) {
	if a.cfg.Identity != nil {
		a.logger.Info("node identity", "wireguard_public_key", a.cfg.Identity.WireGuardPublic.String(), "from", "config")
		return a.cfg.Identity, nil
	}
	if err := os.MkdirAll(a.cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	id, created, err := identity.LoadOrCreate(a.cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("node identity: %w", err)
	}
	a.logger.Info("node identity", "created", created, "wireguard_public_key", id.WireGuardPublic.String(),
		"state_dir", a.cfg.StateDir)
	return id, nil
}

// publish makes the started mesh m the agent's and gives it the latest snapshot, under applyMu:
// a snapshot that apply kept before is applied here, and one that apply gets after this goes to
// m after it, never before.
func (a *Agent) publish(m *mesh) {
	a.applyMu.Lock()
	defer a.applyMu.Unlock()
	a.meshP.Store(m)
	m.apply(a.snap.Load())
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
	a.applyMu.Lock()
	a.snap.Store(s)
	if m := a.meshP.Load(); m != nil {
		m.apply(s)
	}
	a.applyMu.Unlock()
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

// Until the mesh is up, endpoints on this node are dialled directly (the service netstack serves
// before the mesh starts) and endpoints on other nodes fail.
func (d *meshDialer) DialEndpoint(ctx context.Context, proto discovery.Protocol, ep *discovery.Endpoint, addr netip.AddrPort) (net.Conn, error) {
	a := (*Agent)(d)
	m := a.meshP.Load()
	if m != nil {
		return m.DialEndpoint(ctx, proto, ep, addr)
	}
	if ep.NodeName != "" && ep.NodeName != a.cfg.NodeName {
		return nil, fmt.Errorf("endpoint %s on node %s: the mesh is not up yet", addr, ep.NodeName)
	}
	network := "tcp"
	if proto == discovery.UDP {
		network = "udp"
	}
	return a.cfg.DialLocal(ctx, network, addr.String())
}
