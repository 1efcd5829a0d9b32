// Package tun owns the node's kernel TUN device (mesh0): it creates the device, sets its MTU, addresses
// and routes, and removes them again, all through netlink (never by running ip); and it owns the split of
// the packets the kernel sends to the device by destination prefix (Splitter): service range to the
// service netstack, overlay range to wireguard-go, and the way back. Both sides are wireguard-go
// tun.Devices.
//
// Service and DNS addresses are only routed to the device, never assigned to it: an address assigned to
// the kernel device is local to the kernel, which would then deliver packets to it itself instead of
// sending them through the TUN to the netstack that serves them. Config.Addrs is for addresses the kernel
// itself must own on the device (the node's overlay address).
package tun

import (
	"golang.org/x/sys/unix"

	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

// Offset is the headroom Read and Write of the kernel device need in front of each packet for the virtio
// net header (wireguard-go's device.MessageTransportHeaderSize, which is larger than the header).
const Offset = 16

// MaxPacketSize is the largest packet one Read buffer element must hold: with the kernel's offloads on,
// Write coalesces segments up to a 64 KiB super-packet.
const MaxPacketSize = 65535

const (
	defaultName = "mesh0"
	defaultMTU  = 1420
)

// Config configures the kernel TUN device. The zero value of each optional field selects the default
// named.
type Config struct {
	// Logger receives the device's logs; nil discards them.
	Logger *slog.Logger
	// Name of the device; "" means "mesh0".
	Name string
	// MTU of the device; 0 means 1420.
	MTU int
	// Addrs are assigned to the device: addresses the kernel itself owns there (the node's overlay
	// address). Do not put service or DNS addresses here (see the package doc): route them.
	Addrs []netip.Prefix
	// Routes are routed to the device (service CIDR, DNS IP/32, the overlay range).
	Routes []netip.Prefix
}

// Device is the kernel TUN device with the addresses and routes Open added.
type Device struct {
	log  *slog.Logger
	name string
	dev  wgtun.Device
	nl   *netlink.Handle // bound to the network namespace Open ran in
	link netlink.Link

	events chan wgtun.Event
	done   chan struct{} // closed when the event pump ends

	// mu guards all following fields.
	mu     sync.Mutex
	closed bool
	addrs  []*netlink.Addr  // addresses Open added
	routes []*netlink.Route // routes Open added
}

// txQueueLen is the TUN device's queue length, in packets.
const txQueueLen = 4096

// Open creates the TUN device, sets its MTU and queue length, adds Addrs, brings the link up and adds
// Routes, in the network namespace of the calling thread. On failure it removes what it added and
// returns an error saying what failed and how to fix it.
func Open(cfg Config) (_ *Device, err error) {
	if cfg.Name == "" {
		cfg.Name = defaultName
	}
	if cfg.MTU == 0 {
		cfg.MTU = defaultMTU
	}
	if len(cfg.Name) >= syscall.IFNAMSIZ {
		return nil, fmt.Errorf("tun: device name %q is longer than %d bytes", cfg.Name, syscall.IFNAMSIZ-1)
	}
	if cfg.MTU < 576 || cfg.MTU > MaxPacketSize {
		return nil, fmt.Errorf("tun %s: MTU %d out of range [576, %d]", cfg.Name, cfg.MTU, MaxPacketSize)
	}
	for _, p := range append(append([]netip.Prefix(nil), cfg.Addrs...), cfg.Routes...) {
		if !p.IsValid() {
			return nil, fmt.Errorf("tun %s: invalid prefix %v", cfg.Name, p)
		}
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}

	nl, err := netlink.NewHandle()
	if err != nil {
		return nil, fmt.Errorf("tun %s: open netlink: %w", cfg.Name, err)
	}
	if _, err := nl.LinkByName(cfg.Name); err == nil {
		nl.Close()
		return nil, fmt.Errorf("tun: device %s exists: is another agent running? (if not, delete it: ip link del %s)", cfg.Name, cfg.Name)
	} else if !errors.As(err, new(netlink.LinkNotFoundError)) {
		nl.Close()
		return nil, fmt.Errorf("tun %s: look up link: %w", cfg.Name, err)
	}

	dev, err := wgtun.CreateTUN(cfg.Name, cfg.MTU)
	if err != nil {
		nl.Close()
		hint := "run as root or with CAP_NET_ADMIN"
		if errors.Is(err, fs.ErrNotExist) {
			hint = "load the tun module (modprobe tun) or give the container /dev/net/tun"
		}
		return nil, fmt.Errorf("tun: create %s (open /dev/net/tun): %w (%s)", cfg.Name, err, hint)
	}
	d := &Device{
		log:    logger.With("component", "tun", "device", cfg.Name),
		name:   cfg.Name,
		dev:    dev,
		nl:     nl,
		events: make(chan wgtun.Event, 8),
		done:   make(chan struct{}),
	}
	go d.pumpEvents()
	defer func() {
		if err != nil {
			d.Close()
		}
	}()

	d.link, err = nl.LinkByName(cfg.Name)
	if err != nil {
		return nil, fmt.Errorf("tun %s: look up created link: %w", cfg.Name, err)
	}
	// The kernel queues packets for the agent's reader here; a burst beyond it is dropped before the
	// agent sees it, whoever sent it. A deeper queue than the TUN default (500) rides out the bursts
	// of a flood the agent's per-source limits then drop (about 6 MiB at most, of the kernel's memory).
	if err := nl.LinkSetTxQLen(d.link, txQueueLen); err != nil {
		return nil, fmt.Errorf("tun %s: set txqueuelen %d: %w", cfg.Name, txQueueLen, err)
	}
	for _, p := range cfg.Addrs {
		a := &netlink.Addr{IPNet: ipNet(p)}
		if p.Addr().Is6() {
			// A TUN has no link layer to detect duplicates on; without NODAD the address stays tentative
			// for a while and nothing can bind to it.
			a.Flags = unix.IFA_F_NODAD
		}
		if err := nl.AddrAdd(d.link, a); err != nil {
			return nil, fmt.Errorf("tun %s: add address %v: %w", cfg.Name, p, err)
		}
		d.addrs = append(d.addrs, a)
	}
	if err := nl.LinkSetUp(d.link); err != nil {
		return nil, fmt.Errorf("tun %s: set link up: %w", cfg.Name, err)
	}
	for _, p := range cfg.Routes {
		r := &netlink.Route{LinkIndex: d.link.Attrs().Index, Dst: ipNet(p.Masked()), Scope: netlink.SCOPE_LINK}
		if err := nl.RouteAdd(r); err != nil {
			if errors.Is(err, syscall.EEXIST) {
				return nil, fmt.Errorf("tun %s: add route %v: %w (another route to %v exists: remove it, or is another agent running?)", cfg.Name, p, err, p.Masked())
			}
			return nil, fmt.Errorf("tun %s: add route %v: %w", cfg.Name, p, err)
		}
		d.routes = append(d.routes, r)
	}
	d.log.Info("tun device up", "mtu", cfg.MTU, "addrs", cfg.Addrs, "routes", cfg.Routes)
	return d, nil
}

// Name returns the device's name.
func (d *Device) Name() string { return d.name }

// TUN returns the wireguard-go device to read packets from and write packets to, with offset at least
// Offset and buffers of Offset+MaxPacketSize bytes. Its Events are fed by the Device (which must consume
// the underlying events for the device to work); closing it closes the TUN (and so unblocks its readers)
// but leaves the cleanup to Device.Close.
func (d *Device) TUN() wgtun.Device { return kernelTUN{Device: d.dev, events: d.events} }

// Close removes the routes and addresses Open added, closes the TUN (the kernel then deletes the link)
// and waits for the Device's goroutine. It is idempotent.
func (d *Device) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	routes, addrs := d.routes, d.addrs
	d.routes, d.addrs = nil, nil
	d.mu.Unlock()

	var errs []error
	for i := len(routes) - 1; i >= 0; i-- {
		if err := d.nl.RouteDel(routes[i]); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("tun %s: delete route %v: %w", d.name, routes[i].Dst, err))
		}
	}
	for _, a := range addrs {
		if err := d.nl.AddrDel(d.link, a); err != nil && !errors.Is(err, syscall.EADDRNOTAVAIL) {
			errs = append(errs, fmt.Errorf("tun %s: delete address %v: %w", d.name, a.IPNet, err))
		}
	}
	// wireguard-go's device may have closed the TUN already (its Close closes the TUN it reads).
	if err := d.dev.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
		errs = append(errs, fmt.Errorf("tun %s: close: %w", d.name, err))
	}
	<-d.done
	d.nl.Close()
	return errors.Join(errs...)
}

// pumpEvents consumes the device's events (wireguard-go's listeners block until they are read) and
// forwards them to d.events without blocking; it ends when the TUN closes.
func (d *Device) pumpEvents() {
	defer close(d.done)
	defer close(d.events)
	for ev := range d.dev.Events() {
		select {
		case d.events <- ev:
		default:
		}
	}
}

// kernelTUN is the TUN as TUN returns it: the wireguard-go device, with Events fed by the Device.
type kernelTUN struct {
	wgtun.Device
	events chan wgtun.Event
}

func (k kernelTUN) Events() <-chan wgtun.Event { return k.events }

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().Unmap().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().Unmap().BitLen())}
}
