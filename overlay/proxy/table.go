package proxy

import (
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/edgewire/edgewire/discovery"
)

// Policy is a load-balancing policy, spelled as in the discovery.AnnotationLBPolicy annotation.
type Policy string

// Policies understood in the discovery.AnnotationLBPolicy annotation.
const (
	PolicyRoundRobin Policy = "round-robin"
	PolicyRandom     Policy = "random"
	PolicySourceHash Policy = "source-hash"
)

// defaultAffinityTimeout is Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds.
const defaultAffinityTimeout = 10800 * time.Second

// table is one immutable generation of the service table. Only the atomics and the affinity maps
// it points to change after it is published.
//
// It is sized for catalogs of 10,000 services and 100,000 endpoints: per target (an endpoint
// address:port of a service port) it keeps one target in its port's array, one flow counter and a
// backend shared by every target at that address:port, about 100 bytes. What carries over to the
// next Update (flow counters, backends) is found through this table while the next one is built
// (see carry), not kept in maps between Updates.
type table struct {
	byDst    map[dstKey]*svcPort
	services []*svcEntry // in snapshot order, for Services
}

// dstKey is what a flow is looked up by.
type dstKey struct {
	addr  netip.Addr
	port  uint16
	proto discovery.Protocol
}

// svcEntry is one proxied service.
type svcEntry struct {
	svc    *discovery.Service
	policy Policy
	ports  []*svcPort
}

// svcPort is one proxied port of a service with its eligible endpoints.
type svcPort struct {
	svc    *discovery.Service
	port   discovery.ServicePort
	policy Policy
	// targets are the eligible endpoints in snapshot order. When the service prefers local
	// endpoints and has some, the first nLocal are those on this node and the rest follow; nLocal
	// is 0 otherwise.
	targets         []target
	nLocal          int
	rr              *atomic.Uint64 // round-robin counter, carried over Update
	affinity        *affinity      // nil without session affinity
	affinityTimeout time.Duration
}

// target is one eligible endpoint of a service port.
type target struct {
	addr    netip.AddrPort
	ep      *discovery.Endpoint
	epIndex int    // index in svc.Endpoints
	hash    uint64 // rendezvous key of addr
	backend *backend
	flows   *atomic.Uint64
}

// portKey names a service port across Updates.
type portKey struct {
	namespace, name string
	port            uint16
	proto           discovery.Protocol
}

// portState is what a service port keeps across Updates.
type portState struct {
	rr       atomic.Uint64
	affinity *affinity
}

func (t *table) lookup(dst netip.AddrPort, proto discovery.Protocol) *svcPort {
	return t.byDst[dstKey{addr: dst.Addr().Unmap(), port: dst.Port(), proto: proto}]
}

// scanLimit is the number of targets up to which a port's targets are searched by scanning them
// rather than through a map.
const scanLimit = 32

// carry finds, while a table is built, the state of the table it replaces: the previous targets of
// a service port (their flow counters and backends carry over), and the backends that are failing
// (for an endpoint that moves to another service).
type carry struct {
	ports   map[portKey]*oldPort
	failing map[netip.AddrPort]*backend
}

// oldPort is a service port of the previous table; byAddr indexes its targets once a search needs
// it (long lists only).
type oldPort struct {
	sp     *svcPort
	byAddr map[netip.AddrPort]*target
}

func newCarry(old *table) *carry {
	c := &carry{ports: make(map[portKey]*oldPort, len(old.byDst)), failing: map[netip.AddrPort]*backend{}}
	for _, e := range old.services {
		for _, sp := range e.ports {
			c.ports[keyOf(sp.svc, sp.port)] = &oldPort{sp: sp}
			for i := range sp.targets {
				if tg := &sp.targets[i]; tg.backend.failing() {
					c.failing[tg.addr] = tg.backend
				}
			}
		}
	}
	return c
}

func keyOf(svc *discovery.Service, sp discovery.ServicePort) portKey {
	return portKey{namespace: svc.Namespace, name: svc.Name, port: sp.Port, proto: sp.Protocol}
}

// target returns the previous target at addr of the service port k, or nil.
func (c *carry) target(k portKey, addr netip.AddrPort) *target {
	o := c.ports[k]
	if o == nil {
		return nil
	}
	targets := o.sp.targets
	if len(targets) <= scanLimit {
		for i := range targets {
			if targets[i].addr == addr {
				return &targets[i]
			}
		}
		return nil
	}
	if o.byAddr == nil {
		o.byAddr = make(map[netip.AddrPort]*target, len(targets))
		for i := range targets {
			o.byAddr[targets[i].addr] = &targets[i]
		}
	}
	return o.byAddr[addr]
}

// buildTableLocked builds the table of snap, carrying over the state of endpoints and ports still
// present and dropping the rest.
func (p *Proxy) buildTableLocked(snap *discovery.Snapshot) *table {
	t := &table{byDst: map[dstKey]*svcPort{}}
	c := newCarry(p.table.Load())
	// backends are this table's by address:port, so that every target there shares one.
	backends := map[netip.AddrPort]*backend{}
	ports := make(map[portKey]*portState, len(p.ports))
	if snap == nil {
		snap = &discovery.Snapshot{}
	}
	for _, svc := range snap.Services {
		if svc == nil || !svc.IP.IsValid() || svc.Headless || svc.ExternalName != "" {
			continue
		}
		ip := svc.IP.Unmap()
		e := &svcEntry{svc: svc, policy: p.policyOf(svc)}
		for _, sport := range svc.Ports {
			if sport.Protocol != discovery.TCP && sport.Protocol != discovery.UDP {
				continue
			}
			key := dstKey{addr: ip, port: sport.Port, proto: sport.Protocol}
			if other, dup := t.byDst[key]; dup {
				p.log.Warn("service port clashes with another, ignored",
					"service", svc.Key(), "other", other.svc.Key(), "ip", ip, "port", sport.Port, "protocol", sport.Protocol)
				continue
			}
			pk := keyOf(svc, sport)
			ps := p.ports[pk]
			if ps == nil {
				ps = &portState{}
			}
			if svc.SessionAffinity {
				if ps.affinity == nil {
					ps.affinity = newAffinity()
				}
			} else {
				ps.affinity = nil
			}
			ports[pk] = ps

			sp := &svcPort{
				svc:      svc,
				port:     sport,
				policy:   e.policy,
				rr:       &ps.rr,
				affinity: ps.affinity,
			}
			if svc.SessionAffinity {
				sp.affinityTimeout = svc.AffinityTimeout
				if sp.affinityTimeout <= 0 {
					sp.affinityTimeout = defaultAffinityTimeout
				}
			}
			sp.targets = buildTargets(svc, ip, sport, pk, c, backends)
			if p.localNode != "" && svc.Annotations[discovery.AnnotationTopologyPreference] == "local" {
				sp.nLocal = localFirst(sp.targets, p.localNode)
			}
			t.byDst[key] = sp
			e.ports = append(e.ports, sp)
		}
		if len(e.ports) > 0 {
			t.services = append(t.services, e)
		}
	}
	p.ports = ports
	return t
}

// buildTargets returns the targets of service port sport of svc (service IP ip, key pk), one per
// eligible endpoint address:port, with the flow counters of the previous table's targets at the
// same address:port of the same service port, and the backends of backends, the previous table or
// new ones (recorded in backends).
func buildTargets(svc *discovery.Service, ip netip.Addr, sport discovery.ServicePort, pk portKey, c *carry,
	backends map[netip.AddrPort]*backend) []target {
	targets := make([]target, 0, len(svc.Endpoints))
	var seen map[netip.AddrPort]struct{} // for long lists; short ones are scanned
	if len(svc.Endpoints) > scanLimit {
		seen = make(map[netip.AddrPort]struct{}, len(svc.Endpoints))
	}
	fresh := 0
	for i := range svc.Endpoints {
		ep := &svc.Endpoints[i]
		addr, ok := targetAddr(ip, sport, ep)
		if !ok || hasTarget(targets, seen, addr) {
			continue
		}
		tg := target{addr: addr, ep: ep, epIndex: i, hash: targetHash(addr)}
		prev := c.target(pk, addr)
		if prev != nil {
			tg.flows = prev.flows
		} else {
			fresh++
		}
		tg.backend = backends[addr]
		if tg.backend == nil {
			switch {
			case prev != nil:
				tg.backend = prev.backend
			case c.failing[addr] != nil:
				tg.backend = c.failing[addr]
			default:
				tg.backend = &backend{}
			}
			backends[addr] = tg.backend
		}
		targets = append(targets, tg)
	}
	// New flow counters in one array.
	counters := make([]atomic.Uint64, fresh)
	for i := range targets {
		if targets[i].flows == nil {
			targets[i].flows = &counters[0]
			counters = counters[1:]
		}
	}
	return targets
}

// hasTarget reports whether targets holds addr, through seen (recording addr there) when it is
// not nil.
func hasTarget(targets []target, seen map[netip.AddrPort]struct{}, addr netip.AddrPort) bool {
	if seen != nil {
		if _, dup := seen[addr]; dup {
			return true
		}
		seen[addr] = struct{}{}
		return false
	}
	for i := range targets {
		if targets[i].addr == addr {
			return true
		}
	}
	return false
}

// localFirst moves the targets on node before the others, keeping the order within each group, and
// returns how many are on node.
func localFirst(targets []target, node string) int {
	local := 0
	for i := range targets {
		if targets[i].ep.NodeName == node {
			local++
		}
	}
	if local == 0 || local == len(targets) {
		return local
	}
	sorted := make([]target, 0, len(targets))
	for _, tg := range targets {
		if tg.ep.NodeName == node {
			sorted = append(sorted, tg)
		}
	}
	for _, tg := range targets {
		if tg.ep.NodeName != node {
			sorted = append(sorted, tg)
		}
	}
	copy(targets, sorted)
	return local
}

// policyOf returns the policy a service asks for, logging an unknown one.
func (p *Proxy) policyOf(svc *discovery.Service) Policy {
	v, ok := svc.Annotations[discovery.AnnotationLBPolicy]
	if !ok || v == "" {
		return PolicyRoundRobin
	}
	switch pol := Policy(v); pol {
	case PolicyRoundRobin, PolicyRandom, PolicySourceHash:
		return pol
	default:
		p.log.Warn("unknown load-balancing policy, using round-robin",
			"service", svc.Key(), "annotation", discovery.AnnotationLBPolicy, "policy", v)
		return PolicyRoundRobin
	}
}

// eligible reports whether an endpoint may take new flows.
func eligible(ep *discovery.Endpoint) bool {
	return ep.Ready && !ep.Terminating
}

// endpointAddr picks the endpoint address for a service IP: the first of the same family, else the
// first valid one.
func endpointAddr(svcIP netip.Addr, ep *discovery.Endpoint) (netip.Addr, bool) {
	var first netip.Addr
	for _, a := range ep.Addresses {
		a = a.Unmap()
		if !a.IsValid() || a.IsUnspecified() {
			continue
		}
		if a.Is4() == svcIP.Is4() {
			return a, true
		}
		if !first.IsValid() {
			first = a
		}
	}
	return first, first.IsValid()
}

// targetAddr returns where a flow to service port sp goes on ep, or false when ep is not eligible
// for it.
func targetAddr(svcIP netip.Addr, sp discovery.ServicePort, ep *discovery.Endpoint) (netip.AddrPort, bool) {
	if !eligible(ep) {
		return netip.AddrPort{}, false
	}
	addr, ok := endpointAddr(svcIP, ep)
	if !ok {
		return netip.AddrPort{}, false
	}
	port, ok := sp.TargetFor(ep)
	if !ok || port == 0 {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(addr, port), true
}
