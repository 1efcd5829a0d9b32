package discovery

import (
	"cmp"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
)

// hashAttempts is how many hashed candidates AssignIPs tries for a service before it probes
// linearly; with a prefix that is not nearly full the first candidate almost always wins.
const hashAttempts = 16

// AssignIPs sets Service.IP for every service of s, so that every node, given the same catalog,
// computes the same service IPs, and a service keeps its IP across restarts.
//
// Headless and ExternalName services get none (the zero Addr). Every other service gets:
//
//  1. its ClusterIP, when that lies inside prefix and is usable. Usable means it is not the network
//     address of prefix, not the IPv4 broadcast address, and not one of reserved. When several
//     services claim the same ClusterIP, the first in namespace/name order keeps it and the others
//     are treated as if they had no ClusterIP.
//  2. otherwise a derived address. Services needing one are processed in namespace/name order. For
//     a service with key "namespace/name", candidate i (i = 0, 1, …, 15) is the prefix's network
//     address with its host bits replaced by the bits at the same positions of the first 4 (IPv4)
//     or 16 (IPv6) bytes of sha256("namespace/name#i"). The first usable candidate not already
//     taken (by step 1 or by an earlier service of step 2) wins.
//     If all 16 collide, the addresses following candidate 0 are probed in order, wrapping from the
//     end of prefix to its start, and the first usable free one wins.
//
// The result depends only on the services' namespaces, names, ClusterIPs and kinds, the prefix and
// the reserved addresses, never on the order of s.Services. Reserved addresses outside prefix are
// ignored. AssignIPs returns an error, leaving IPs unspecified, when prefix has too few usable
// addresses for the services, when prefix is invalid, or when s holds a nil service.
//
// AssignIPs modifies the services in place: call it before the snapshot is handed to consumers.
func AssignIPs(s *Snapshot, prefix netip.Prefix, reserved ...netip.Addr) error {
	if s == nil {
		return errors.New("assign service IPs: nil snapshot")
	}
	if !prefix.IsValid() {
		return fmt.Errorf("assign service IPs: invalid prefix %v", prefix)
	}
	if prefix.Addr().Is4In6() && prefix.Bits() >= 96 {
		prefix = netip.PrefixFrom(prefix.Addr().Unmap(), prefix.Bits()-96)
	}
	prefix = prefix.Masked()
	r := newIPRange(prefix)

	taken := make(map[netip.Addr]struct{}, len(s.Services)+len(reserved))
	for _, a := range reserved {
		a = a.Unmap()
		if r.usable(a) {
			taken[a] = struct{}{}
		}
	}

	var need []*Service
	for i, svc := range s.Services {
		if svc == nil {
			return fmt.Errorf("assign service IPs: service %d is nil", i)
		}
		svc.IP = netip.Addr{}
		if !svc.Headless && svc.ExternalName == "" {
			need = append(need, svc)
		}
	}
	slices.SortFunc(need, func(a, b *Service) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})

	derive := need[:0:0]
	for _, svc := range need {
		ip := svc.ClusterIP.Unmap()
		if _, dup := taken[ip]; !r.usable(ip) || dup {
			derive = append(derive, svc)
			continue
		}
		taken[ip] = struct{}{}
		svc.IP = ip
	}
	if len(derive) == 0 {
		return nil
	}

	if free, ok := r.free(len(taken)); ok && free < uint64(len(derive)) {
		return fmt.Errorf("assign service IPs: prefix %s is full: %d services need a derived address, %d usable addresses are free",
			prefix, len(derive), free)
	}
	for _, svc := range derive {
		ip, ok := r.derive(svc.Key(), taken)
		if !ok {
			return fmt.Errorf("assign service IPs: prefix %s is full: no free address for service %s", prefix, svc.Key())
		}
		taken[ip] = struct{}{}
		svc.IP = ip
	}
	return nil
}

// ipRange is a service prefix with the arithmetic AssignIPs needs.
type ipRange struct {
	prefix    netip.Prefix
	network   netip.Addr
	broadcast netip.Addr // zero for IPv6 and for IPv4 prefixes without one (/32)
	hostBits  int
	base      []byte // network address bytes (4 or 16)
	hostMask  []byte // 1 bits where the host part is
}

func newIPRange(p netip.Prefix) *ipRange {
	r := &ipRange{prefix: p, network: p.Addr(), hostBits: p.Addr().BitLen() - p.Bits()}
	r.base = p.Addr().AsSlice()
	r.hostMask = make([]byte, len(r.base))
	for i := range r.hostMask {
		netBits := p.Bits() - 8*i
		switch {
		case netBits <= 0:
			r.hostMask[i] = 0xff
		case netBits < 8:
			r.hostMask[i] = 0xff >> netBits
		}
	}
	if p.Addr().Is4() && r.hostBits > 0 {
		b := make([]byte, len(r.base))
		for i := range b {
			b[i] = r.base[i] | r.hostMask[i]
		}
		r.broadcast, _ = netip.AddrFromSlice(b)
	}
	return r
}

// usable reports whether a lies in the range and is neither its network nor its broadcast address.
func (r *ipRange) usable(a netip.Addr) bool {
	return a.IsValid() && r.prefix.Contains(a) && a != r.network && a != r.broadcast
}

// free returns how many usable addresses remain when taken of them are in use. ok is false when the
// range is so large that it cannot be full in practice (more than 2^62 addresses).
func (r *ipRange) free(taken int) (n uint64, ok bool) {
	if r.hostBits > 62 {
		return 0, false
	}
	total := uint64(1) << r.hostBits
	unusable := uint64(1) // the network address
	if r.broadcast.IsValid() {
		unusable++
	}
	if total <= unusable+uint64(taken) {
		return 0, true
	}
	return total - unusable - uint64(taken), true
}

// derive returns the address for key as documented on AssignIPs; ok is false when no usable address
// is free.
func (r *ipRange) derive(key string, taken map[netip.Addr]struct{}) (addr netip.Addr, ok bool) {
	var first netip.Addr
	buf := make([]byte, 0, len(key)+4)
	b := make([]byte, len(r.base))
	for i := range hashAttempts {
		buf = strconv.AppendInt(append(append(buf[:0], key...), '#'), int64(i), 10)
		h := sha256.Sum256(buf)
		for j := range b {
			b[j] = r.base[j] | h[j]&r.hostMask[j]
		}
		a, _ := netip.AddrFromSlice(b)
		if i == 0 {
			first = a
		}
		if _, dup := taken[a]; !dup && r.usable(a) {
			return a, true
		}
	}
	// Probe linearly from the first candidate, once around the range (ranges too large to count
	// cannot be full in practice).
	a := first
	for n := uint64(0); r.hostBits > 62 || n < uint64(1)<<r.hostBits; n++ {
		a = a.Next()
		if !a.IsValid() || !r.prefix.Contains(a) {
			a = r.network
		}
		if _, dup := taken[a]; !dup && r.usable(a) {
			return a, true
		}
	}
	return netip.Addr{}, false
}
