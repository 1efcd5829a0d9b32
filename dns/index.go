package dns

import (
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/edgewire/edgewire/discovery"
)

// index is the query-ready form of one catalog snapshot: every name of the cluster zone the server
// answers for, lowercased and fully qualified, mapped to its prepared records. buildIndex makes it;
// after that nothing modifies its records, so queries read it without locks. The one thing written
// later is the packed replies of the UDP fast path (udp.go), each packed on first use and
// published through an atomic pointer: two queries racing to pack one store identical bytes, and
// an Update, which swaps the whole index, swaps them with it. Every RR slice in it has len == cap,
// so a reply that appends to one (an OPT record, a CNAME chain) copies instead of writing into the
// shared array.
type index struct {
	zone    string           // "cluster.local."
	dotZone string           // ".cluster.local."
	names   map[string]*node // lowercase fqdn → records; parents are present as empty nodes
	soa     []mdns.RR        // the zone's SOA, for the authority section of negative answers
	skipped int              // services left out because their names are not DNS labels

	nxdomain atomic.Pointer[packedReply] // the NXDOMAIN reply of every missing name of the zone
}

// node holds the records of one name, by type. A node with no records is an empty non-terminal
// (a parent such as ns.svc.cluster.local.): it answers NODATA, not NXDOMAIN.
type node struct {
	a, aaaa  []mdns.RR
	cname    *mdns.CNAME
	srv      []mdns.RR
	srvExtra []mdns.RR // the A/AAAA records of the SRV targets
	ptr      []mdns.RR
	soa      []mdns.RR // apex only
	ns       []mdns.RR // apex only
	nsExtra  []mdns.RR
	zone     bool // the name is in the cluster zone (not a reverse name)

	wire [2]atomic.Pointer[packedReply] // packed A and AAAA replies, by wireSlot
}

// nsLabel is the name, under the zone, of the server itself in the apex NS record (as CoreDNS's
// kubernetes plugin names it).
const nsLabel = "ns.dns."

// builder accumulates an index. Its methods are only used by buildIndex.
type builder struct {
	idx  *index
	ttl  uint32
	seen map[netip.Addr]struct{} // scratch: addresses already added to the current name
	tgt  map[string]struct{}     // scratch: SRV targets already added to the current name
}

// buildIndex builds the records of snap for zone (lowercase, fully qualified). selfAddr, when
// valid, is the server's own address, published as ns.dns.<zone>.
func buildIndex(snap *discovery.Snapshot, zone string, ttl uint32, selfAddr netip.Addr, serial uint32) *index {
	nsvc, neps := 0, 0
	if snap != nil {
		nsvc = len(snap.Services)
		for _, svc := range snap.Services {
			neps += len(svc.Endpoints)
		}
	}
	b := &builder{
		idx: &index{
			zone:    zone,
			dotZone: "." + zone,
			names:   make(map[string]*node, 4+4*nsvc+2*neps),
		},
		ttl:  ttl,
		seen: make(map[netip.Addr]struct{}),
		tgt:  make(map[string]struct{}),
	}
	b.apex(selfAddr, serial)
	if snap != nil {
		for _, svc := range snap.Services {
			b.service(svc)
		}
	}
	for name, n := range b.idx.names {
		n.clip()
		n.zone = b.idx.inZone(name)
	}
	return b.idx
}

// clip makes every slice of n full (len == cap); see index.
func (n *node) clip() {
	n.a = slices.Clip(n.a)
	n.aaaa = slices.Clip(n.aaaa)
	n.srv = slices.Clip(n.srv)
	n.srvExtra = slices.Clip(n.srvExtra)
	n.ptr = slices.Clip(n.ptr)
}

// node returns the node of name, creating it (and nothing else) when absent.
func (b *builder) node(name string) *node {
	n := b.idx.names[name]
	if n == nil {
		n = &node{}
		b.idx.names[name] = n
	}
	return n
}

// parents creates the empty non-terminals between name and the zone apex.
func (b *builder) parents(name string) {
	for {
		i := strings.IndexByte(name, '.')
		if i < 0 || i == len(name)-1 {
			return
		}
		name = name[i+1:]
		if len(name) < len(b.idx.zone) {
			return
		}
		if _, ok := b.idx.names[name]; ok {
			return // its parents were created with it
		}
		b.idx.names[name] = &node{}
	}
}

func (b *builder) hdr(name string, t uint16) mdns.RR_Header {
	return mdns.RR_Header{Name: name, Rrtype: t, Class: mdns.ClassINET, Ttl: b.ttl}
}

// apex creates the zone apex with its SOA and NS records.
func (b *builder) apex(selfAddr netip.Addr, serial uint32) {
	zone := b.idx.zone
	nsName := nsLabel + zone
	soa := &mdns.SOA{
		Hdr:     b.hdr(zone, mdns.TypeSOA),
		Ns:      nsName,
		Mbox:    "hostmaster." + zone,
		Serial:  serial,
		Refresh: 7200,
		Retry:   1800,
		Expire:  86400,
		Minttl:  b.ttl,
	}
	b.idx.soa = []mdns.RR{soa}
	apex := b.node(zone)
	apex.soa = b.idx.soa
	apex.ns = []mdns.RR{&mdns.NS{Hdr: b.hdr(zone, mdns.TypeNS), Ns: nsName}}
	self := b.node(nsName)
	b.parents(nsName)
	if selfAddr.IsValid() {
		b.addAddr(self, nsName, selfAddr)
		apex.nsExtra = append(apex.nsExtra, addrRR(b, nsName, selfAddr))
	}
}

// addrRR returns the A or AAAA record of addr at name.
func addrRR(b *builder, name string, addr netip.Addr) mdns.RR {
	addr = addr.Unmap()
	if addr.Is4() {
		v := addr.As4()
		return &mdns.A{Hdr: b.hdr(name, mdns.TypeA), A: net.IP(v[:])}
	}
	v := addr.As16()
	return &mdns.AAAA{Hdr: b.hdr(name, mdns.TypeAAAA), AAAA: net.IP(v[:])}
}

// addAddr adds the A or AAAA record of addr to n (named name) and returns it.
func (b *builder) addAddr(n *node, name string, addr netip.Addr) mdns.RR {
	rr := addrRR(b, name, addr)
	if rr.Header().Rrtype == mdns.TypeA {
		n.a = append(n.a, rr)
	} else {
		n.aaaa = append(n.aaaa, rr)
	}
	return rr
}

// addPTR points the reverse name of addr at target, unless the address already has a PTR (the
// first service in snapshot order keeps it; service IPs are added before endpoint addresses of the
// same service, and the snapshot order makes the choice deterministic).
func (b *builder) addPTR(addr netip.Addr, target string) {
	rev := reverseName(addr)
	n := b.node(rev)
	if len(n.ptr) > 0 {
		return
	}
	n.ptr = append(n.ptr, &mdns.PTR{Hdr: b.hdr(rev, mdns.TypePTR), Ptr: target})
}

// service adds the records of one service.
func (b *builder) service(svc *discovery.Service) {
	if svc == nil || !isLabel(svc.Name) || !isLabel(svc.Namespace) {
		b.idx.skipped++
		return
	}
	name := strings.ToLower(svc.Name) + "." + strings.ToLower(svc.Namespace) + ".svc." + b.idx.zone
	n := b.node(name)
	b.parents(name)
	switch {
	case svc.ExternalName != "":
		target := strings.ToLower(mdns.Fqdn(svc.ExternalName))
		if _, ok := mdns.IsDomainName(target); !ok || target == "." {
			b.idx.skipped++
			return
		}
		n.cname = &mdns.CNAME{Hdr: b.hdr(name, mdns.TypeCNAME), Target: target}
	case svc.Headless:
		b.headless(svc, name, n)
	case svc.IP.IsValid():
		rr := b.addAddr(n, name, svc.IP)
		b.addPTR(svc.IP, name)
		for _, p := range svc.Ports {
			if !isLabel(p.Name) {
				continue
			}
			srvName := "_" + strings.ToLower(p.Name) + "._" + strings.ToLower(string(p.Protocol)) + "." + name
			sn := b.node(srvName)
			b.parents(srvName)
			sn.srv = append(sn.srv, &mdns.SRV{Hdr: b.hdr(srvName, mdns.TypeSRV), Priority: 0, Weight: 100, Port: p.Port, Target: name})
			sn.srvExtra = append(sn.srvExtra, rr)
		}
	}
}

// headless adds the records of a headless service: the ready endpoints' addresses at the service
// name, a name per endpoint (its hostname, or its address with dashes), and SRV records per named
// port pointing at those names with the endpoint's port (clients of a headless service connect to
// the endpoints directly).
func (b *builder) headless(svc *discovery.Service, name string, n *node) {
	clear(b.seen)
	for i := range svc.Endpoints {
		ep := &svc.Endpoints[i]
		if !ep.Ready {
			continue
		}
		hostname := ""
		if ep.Hostname != "" && isLabel(ep.Hostname) {
			hostname = strings.ToLower(ep.Hostname) + "." + name
		}
		for _, addr := range ep.Addresses {
			if !addr.IsValid() {
				continue
			}
			addr = addr.Unmap()
			if _, dup := b.seen[addr]; !dup {
				b.seen[addr] = struct{}{}
				b.addAddr(n, name, addr)
			}
			epName := hostname
			if epName == "" {
				epName = dashed(addr) + "." + name
			}
			en := b.node(epName)
			if !hasAddr(en, addr) {
				b.addAddr(en, epName, addr)
			}
			b.addPTR(addr, epName)
		}
	}
	for _, p := range svc.Ports {
		if !isLabel(p.Name) {
			continue
		}
		srvName := "_" + strings.ToLower(p.Name) + "._" + strings.ToLower(string(p.Protocol)) + "." + name
		sn := b.node(srvName)
		b.parents(srvName)
		clear(b.tgt)
		for i := range svc.Endpoints {
			ep := &svc.Endpoints[i]
			if !ep.Ready {
				continue
			}
			port, ok := p.TargetFor(ep)
			if !ok {
				continue
			}
			if ep.Hostname != "" && isLabel(ep.Hostname) {
				b.addSRV(sn, srvName, strings.ToLower(ep.Hostname)+"."+name, port)
				continue
			}
			for _, addr := range ep.Addresses {
				if addr.IsValid() {
					b.addSRV(sn, srvName, dashed(addr.Unmap())+"."+name, port)
				}
			}
		}
	}
}

// addSRV adds one SRV record to sn unless target:port is already there, with the target's
// addresses as additional records.
func (b *builder) addSRV(sn *node, srvName, target string, port uint16) {
	key := target + ":" + strconv.Itoa(int(port))
	if _, dup := b.tgt[key]; dup {
		return
	}
	b.tgt[key] = struct{}{}
	sn.srv = append(sn.srv, &mdns.SRV{Hdr: b.hdr(srvName, mdns.TypeSRV), Priority: 0, Weight: 100, Port: port, Target: target})
	if tn := b.idx.names[target]; tn != nil {
		sn.srvExtra = append(sn.srvExtra, tn.a...)
		sn.srvExtra = append(sn.srvExtra, tn.aaaa...)
	}
}

func hasAddr(n *node, addr netip.Addr) bool {
	ip := net.IP(addr.AsSlice())
	for _, rr := range n.a {
		if rr.(*mdns.A).A.Equal(ip) {
			return true
		}
	}
	for _, rr := range n.aaaa {
		if rr.(*mdns.AAAA).AAAA.Equal(ip) {
			return true
		}
	}
	return false
}

// isLabel reports whether s can be one DNS label: 1 to 63 bytes of letters, digits, '-' and '_'.
// Kubernetes names are stricter; a static file may hold anything, and a service whose name cannot
// be a label has no DNS name.
func isLabel(s string) bool {
	if len(s) == 0 || len(s) > 63 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return false
		}
	}
	return true
}

// dashed returns the label CoreDNS gives an endpoint without a hostname: its address with '.'
// (IPv4) or ':' (IPv6) replaced by '-', e.g. 10-244-1-5 or fd00--1.
func dashed(addr netip.Addr) string {
	s := addr.WithZone("").String()
	if addr.Is4() {
		return strings.ReplaceAll(s, ".", "-")
	}
	return strings.ReplaceAll(s, ":", "-")
}

// reverseName returns the in-addr.arpa. or ip6.arpa. name of addr.
func reverseName(addr netip.Addr) string {
	addr = addr.Unmap()
	if addr.Is4() {
		v := addr.As4()
		buf := make([]byte, 0, len("255.255.255.255.in-addr.arpa."))
		for i := 3; i >= 0; i-- {
			buf = strconv.AppendUint(buf, uint64(v[i]), 10)
			buf = append(buf, '.')
		}
		return string(append(buf, "in-addr.arpa."...))
	}
	const hexDigits = "0123456789abcdef"
	v := addr.As16()
	buf := make([]byte, 0, 64+len("ip6.arpa."))
	for i := 15; i >= 0; i-- {
		buf = append(buf, hexDigits[v[i]&0xf], '.', hexDigits[v[i]>>4], '.')
	}
	return string(append(buf, "ip6.arpa."...))
}

// serialNow is the SOA serial of an index built now.
func serialNow(now time.Time) uint32 { return uint32(now.Unix()) }
