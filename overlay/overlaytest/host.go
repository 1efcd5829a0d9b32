// Package overlaytest owns what tests need to run the agent engine (package overlay) in one process
// without root: Host, a userspace stand-in for a node's kernel — its TCP/IP stack, with the agent's
// TUN device as its only link.
//
// Each agent of a test gets its own Host through overlay.Config.OpenTUN. The Host plays the role
// the kernel plays for a real agent: applications on the node (the test) dial service IPs, the DNS
// address and other nodes' overlay addresses from it, and it sends those packets into the TUN,
// where the agent's splitter reads them; what the agent writes to the TUN arrives at the Host's
// sockets. Packets between agents cross their WireGuard devices and whatever network the test gives
// their WireGuard sockets (overlay/path/pathtest).
package overlaytest

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"

	wgtun "golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/netstack"

	"github.com/edgewire/edgewire/overlay/tun"
)

// Host is a node's network stack in userspace (gVisor, through wireguard-go's tun/netstack) whose
// one link is the agent's TUN. It has the method set of overlay.TUNDevice and overlay.HostDialer.
type Host struct {
	name string
	dev  *onceClose
	net  *netstack.Net
}

// NewHost creates the Host of a TUN configured by cfg (what the agent asks of overlay.Config.OpenTUN):
// it holds cfg.Addrs and the extra addresses (the node's own IPv4 address, which the host uses as
// the source of its flows to service IPs, as a kernel would use its LAN address) and routes
// everything to the TUN, cfg.Routes included.
func NewHost(cfg tun.Config, extra ...netip.Addr) (*Host, error) {
	addrs := make([]netip.Addr, 0, len(cfg.Addrs)+len(extra))
	for _, p := range cfg.Addrs {
		addrs = append(addrs, p.Addr())
	}
	addrs = append(addrs, extra...)
	mtu := cfg.MTU
	if mtu == 0 {
		mtu = 1420
	}
	dev, n, err := netstack.CreateNetTUN(addrs, nil, mtu)
	if err != nil {
		return nil, fmt.Errorf("overlaytest: host stack for %s: %w", cfg.Name, err)
	}
	return &Host{name: cfg.Name, dev: &onceClose{Device: dev}, net: n}, nil
}

// TUN is the device the agent reads the host's packets from.
func (h *Host) TUN() wgtun.Device { return h.dev }

// Name is the TUN's name from the agent's tun.Config.
func (h *Host) Name() string { return h.name }

// Close closes the host stack and its TUN; later calls do nothing.
func (h *Host) Close() error { return h.dev.Close() }

// DialContext dials from the host, like a net.Dialer on the node. address must be an IP literal.
func (h *Host) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	c, err := h.net.DialContext(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("overlaytest: %s: dial %s %s: %w", h.name, network, address, err)
	}
	return c, nil
}

// ListenTCP listens on the host at addr.
func (h *Host) ListenTCP(addr netip.AddrPort) (net.Listener, error) {
	ln, err := h.net.ListenTCPAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("overlaytest: %s: listen tcp %s: %w", h.name, addr, err)
	}
	return ln, nil
}

// ListenUDP opens a UDP socket on the host at addr.
func (h *Host) ListenUDP(addr netip.AddrPort) (net.PacketConn, error) {
	pc, err := h.net.ListenUDPAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("overlaytest: %s: listen udp %s: %w", h.name, addr, err)
	}
	return pc, nil
}

// onceClose makes the tun/netstack device's Close idempotent: the agent's splitter and wireguard-go
// may both close it, and tun/netstack panics on a second Close.
type onceClose struct {
	wgtun.Device
	once sync.Once
	err  error
}

func (o *onceClose) Close() error {
	o.once.Do(func() { o.err = o.Device.Close() })
	return o.err
}
