package path

import (
	"net"
	"net/netip"
)

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
