package overlay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/ipc"
	wgtun "golang.zx2c4.com/wireguard/tun"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/forward"
	"github.com/edgewire/edgewire/overlay/identity"
	"github.com/edgewire/edgewire/overlay/path"
	"github.com/edgewire/edgewire/overlay/tun"
)

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

	// The parts below are what the engine otherwise creates on the host itself. nil means the real
	// one, which needs root (CAP_NET_ADMIN for the TUN, /var/run/wireguard for the UAPI socket);
	// tests and embedders pass their own to run agents in one process without root
	// (engine_test.go runs three over the in-memory network of overlay/path/pathtest).

	// OpenTUN creates the TUN device the agent reads the host's packets from: Name, MTU, the
	// overlay address in Addrs, and in Routes the service range, the DNS address and the overlay
	// range, all of which the host must send to the device. nil: the kernel TUN of overlay/tun
	// (tun.Open).
	OpenTUN func(tun.Config) (TUNDevice, error)
	// WireGuardSocket owns the node's WireGuard socket: the inner conn.Bind of the path Bind
	// (path.Config.Inner), opened by wireguard-go on ListenPort. nil: wireguard-go's
	// conn.StdNetBind, real UDP sockets.
	WireGuardSocket conn.Bind
	// Identity is the node's keys. nil: loaded from StateDir, or created there on the first start.
	Identity *identity.Identity
	// ListenUAPI opens the WireGuard UAPI listener of the interface name (WGInterface) that
	// `wg show` and `meshctl wg show` read. nil: wireguard-go's ipc.UAPIOpen and ipc.UAPIListen,
	// /var/run/wireguard/<name>.sock.
	ListenUAPI func(name string) (net.Listener, error)
	// ForwardListener creates the agent-to-agent forward listener on the overlay address. nil:
	// forward.NewListener, kernel sockets bound to the TUN. It may return a nil listener and a nil
	// error: the node then serves no flows from other nodes (forward opens kernel sockets only, so
	// an engine whose host is not the kernel has none yet).
	ForwardListener func(forward.ListenerConfig) (ForwardListener, error)
	// DialLocal connects to endpoints on this node and to endpoints of nodes outside the mesh.
	// nil: a net.Dialer.
	DialLocal func(ctx context.Context, network, address string) (net.Conn, error)
}

// TUNDevice is the agent's TUN device as the host sees it: the wireguard-go tun.Device that
// carries the packets the host sent to the device's routes (and takes the packets for the host),
// the interface name, and Close, which removes what was added to the host and closes the device.
// *tun.Device (the kernel TUN) is one. A device whose host is not the kernel also implements
// HostDialer, so that the readiness check reaches the DNS server the way the host's
// applications do.
type TUNDevice interface {
	TUN() wgtun.Device
	Name() string
	Close() error
}

// HostDialer dials from the host side of a TUNDevice.
type HostDialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// ForwardListener is the agent-to-agent forward listener (*forward.Listener).
type ForwardListener interface {
	Start() error
	Close() error
	Stats() forward.Stats
}

var (
	_ TUNDevice       = (*tun.Device)(nil)
	_ ForwardListener = (*forward.Listener)(nil)
)

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
	if c.OpenTUN == nil {
		c.OpenTUN = func(tc tun.Config) (TUNDevice, error) { return tun.Open(tc) }
	}
	if c.ListenUAPI == nil {
		c.ListenUAPI = listenUAPI
	}
	if c.ForwardListener == nil {
		c.ForwardListener = func(fc forward.ListenerConfig) (ForwardListener, error) { return forward.NewListener(fc) }
	}
	if c.DialLocal == nil {
		var d net.Dialer
		c.DialLocal = d.DialContext
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

// listenUAPI is wireguard-go's UAPI socket for interface name.
func listenUAPI(name string) (net.Listener, error) {
	f, err := ipc.UAPIOpen(name)
	if err != nil {
		return nil, fmt.Errorf("wireguard: UAPI socket for %s (another agent with the same --wg-interface?): %w", name, err)
	}
	ln, err := ipc.UAPIListen(name, f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("wireguard: UAPI listen %s: %w", name, err)
	}
	return ln, nil
}
