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
	svc     *discovery.Service
	port    discovery.ServicePort
	policy  Policy
	targets []*target
	// local and remote split targets by node when the service prefers local endpoints and has
	// some; both nil otherwise.
	local, remote   []*target
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
	svc   string
	port  uint16
	proto discovery.Protocol
}

// portState is what a service port keeps across Updates.
type portState struct {
	rr       atomic.Uint64
	affinity *affinity
	flows    map[netip.AddrPort]*atomic.Uint64
}

func (t *table) lookup(dst netip.AddrPort, proto discovery.Protocol) *svcPort {
	return t.byDst[dstKey{addr: dst.Addr().Unmap(), port: dst.Port(), proto: proto}]
}

// buildTableLocked builds the table of snap, carrying over the state of endpoints and ports still
// present and dropping the rest.
func (p *Proxy) buildTableLocked(snap *discovery.Snapshot) *table {
	t := &table{byDst: map[dstKey]*svcPort{}}
	backends := map[netip.AddrPort]*backend{}
	ports := map[portKey]*portState{}
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
			pk := portKey{svc: svc.Key(), port: sport.Port, proto: sport.Protocol}
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
			oldFlows := ps.flows
			ps.flows = map[netip.AddrPort]*atomic.Uint64{}
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
			for i := range svc.Endpoints {
				ep := &svc.Endpoints[i]
				addr, ok := targetAddr(ip, sport, ep)
				if !ok {
					continue
				}
				if _, dup := ps.flows[addr]; dup {
					continue
				}
				b := backends[addr]
				if b == nil {
					if b = p.backends[addr]; b == nil {
						b = &backend{}
					}
					backends[addr] = b
				}
				flows := oldFlows[addr]
				if flows == nil {
					flows = new(atomic.Uint64)
				}
				ps.flows[addr] = flows
				sp.targets = append(sp.targets, &target{
					addr:    addr,
					ep:      ep,
					epIndex: i,
					hash:    targetHash(addr),
					backend: b,
					flows:   flows,
				})
			}
			if p.localNode != "" && svc.Annotations[discovery.AnnotationTopologyPreference] == "local" {
				for _, tg := range sp.targets {
					if tg.ep.NodeName == p.localNode {
						sp.local = append(sp.local, tg)
					} else {
						sp.remote = append(sp.remote, tg)
					}
				}
				if len(sp.local) == 0 {
					sp.local, sp.remote = nil, nil
				}
			}
			t.byDst[key] = sp
			e.ports = append(e.ports, sp)
		}
		if len(e.ports) > 0 {
			t.services = append(t.services, e)
		}
	}
	p.backends = backends
	p.ports = ports
	return t
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
