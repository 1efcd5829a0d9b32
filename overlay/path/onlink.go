package path

import (
	"net/netip"
	"time"
)

// onLinkRefresh is how long the list of this node's subnets is reused.
const onLinkRefresh = 5 * time.Second

// onLinkCache answers whether an address is on one of this node's own subnets (an interface's
// prefix), re-reading the interfaces at most every onLinkRefresh. An address that is one of this
// node's own addresses does not count: every host of a fleet has the same docker0 or cni0
// address, which says nothing about sharing a LAN. Not safe for concurrent use: the Manager calls
// it under its mutex.
type onLinkCache struct {
	read     time.Time
	prefixes []netip.Prefix // unmasked: Addr is the interface's own address
	// interfaces lists the host's interface addresses; nil means InterfacePrefixes (tests
	// replace it).
	interfaces func() ([]InterfacePrefix, error)
}

// any reports whether one of addrs is on-link.
func (c *onLinkCache) any(now time.Time, addrs []netip.AddrPort) bool {
	if len(addrs) == 0 {
		return false
	}
	if c.read.IsZero() || now.Sub(c.read) >= onLinkRefresh {
		list := c.interfaces
		if list == nil {
			list = InterfacePrefixes
		}
		if ips, err := list(); err == nil {
			c.prefixes = c.prefixes[:0]
			for _, ip := range ips {
				c.prefixes = append(c.prefixes, ip.Prefix)
			}
		}
		c.read = now
	}
	for _, a := range addrs {
		if ip := a.Addr().Unmap(); !c.own(ip) && c.contains(ip) {
			return true
		}
	}
	return false
}

// own reports whether ip is one of this node's addresses.
func (c *onLinkCache) own(ip netip.Addr) bool {
	for _, p := range c.prefixes {
		if p.Addr() == ip {
			return true
		}
	}
	return false
}

// contains reports whether ip is on one of this node's subnets.
func (c *onLinkCache) contains(ip netip.Addr) bool {
	for _, p := range c.prefixes {
		if p.Masked().Contains(ip) {
			return true
		}
	}
	return false
}
