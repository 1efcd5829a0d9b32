package path

import (
	"net"
	"net/netip"
	"time"
)

// onLinkRefresh is how long the list of this node's subnets is reused.
const onLinkRefresh = 5 * time.Second

// onLinkCache answers whether an address is on one of this node's own subnets (an interface's
// prefix), re-reading the interfaces at most every onLinkRefresh. Not safe for concurrent use: the
// Manager calls it under its mutex.
type onLinkCache struct {
	read     time.Time
	prefixes []netip.Prefix
	// interfaces lists the prefixes; nil means the host's (tests replace it).
	interfaces func() ([]netip.Prefix, error)
}

// any reports whether one of addrs is on-link.
func (c *onLinkCache) any(now time.Time, addrs []netip.AddrPort) bool {
	if len(addrs) == 0 {
		return false
	}
	if c.read.IsZero() || now.Sub(c.read) >= onLinkRefresh {
		list := c.interfaces
		if list == nil {
			list = interfacePrefixes
		}
		if ps, err := list(); err == nil {
			c.prefixes = ps
		}
		c.read = now
	}
	for _, a := range addrs {
		for _, p := range c.prefixes {
			if p.Contains(a.Addr().Unmap()) {
				return true
			}
		}
	}
	return false
}

// InterfacePrefix is one address of a host interface with its prefix length (Prefix is not masked:
// its Addr is the interface's address).
type InterfacePrefix struct {
	Interface string
	Prefix    netip.Prefix
}

// InterfacePrefixes returns the addresses of the host's interfaces that are up, loopback excluded,
// IPv4-mapped addresses unmapped.
func InterfacePrefixes() ([]InterfacePrefix, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, err
	}
	var out []InterfacePrefix
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, err := ifc.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			ipn, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(ipn.IP)
			if !ok {
				continue
			}
			ones, _ := ipn.Mask.Size()
			out = append(out, InterfacePrefix{Interface: ifc.Name, Prefix: netip.PrefixFrom(ip.Unmap(), ones)})
		}
	}
	return out, nil
}

// interfacePrefixes returns the subnets of the host's up, non-loopback interfaces.
func interfacePrefixes() ([]netip.Prefix, error) {
	ips, err := InterfacePrefixes()
	if err != nil {
		return nil, err
	}
	out := make([]netip.Prefix, len(ips))
	for i, ip := range ips {
		out[i] = ip.Prefix.Masked()
	}
	return out, nil
}
