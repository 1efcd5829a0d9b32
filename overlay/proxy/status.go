package proxy

import (
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/edgewire/edgewire/discovery"
)

// ServiceStatus describes one proxied service, for `meshctl services`.
type ServiceStatus struct {
	Namespace       string     `json:"namespace"`
	Name            string     `json:"name"`
	IP              netip.Addr `json:"ip"`
	Policy          Policy     `json:"policy"`
	SessionAffinity bool       `json:"sessionAffinity"`
	// AffinityTimeoutSeconds is the session affinity timeout in force (0 without affinity).
	AffinityTimeoutSeconds int64        `json:"affinityTimeoutSeconds,omitempty"`
	Ports                  []PortStatus `json:"ports"`
	// EndpointsReady counts endpoints that are Ready and not Terminating; EndpointsTotal all of them.
	EndpointsReady int              `json:"endpointsReady"`
	EndpointsTotal int              `json:"endpointsTotal"`
	Endpoints      []EndpointStatus `json:"endpoints"`
}

// PortStatus describes one proxied port of a service.
type PortStatus struct {
	Name     string             `json:"name,omitempty"`
	Protocol discovery.Protocol `json:"protocol"`
	Port     uint16             `json:"port"`
	// Eligible counts the endpoints that can take flows on this port.
	Eligible int `json:"eligible"`
	// AffinityClients counts the client IPs remembered for session affinity.
	AffinityClients int `json:"affinityClients,omitempty"`
}

// EndpointStatus describes one endpoint of a service.
type EndpointStatus struct {
	Address     netip.Addr `json:"address,omitzero"`
	Node        string     `json:"node,omitempty"`
	Zone        string     `json:"zone,omitempty"`
	Ready       bool       `json:"ready"`
	Terminating bool       `json:"terminating,omitempty"`
	// Flows counts the flows dialled to this endpoint on all ports of the service.
	Flows uint64 `json:"flows"`
	// Targets are the address:port the endpoint takes flows on, one per service port it is eligible
	// for.
	Targets []TargetStatus `json:"targets,omitempty"`
}

// TargetStatus is one endpoint address:port of a service port.
type TargetStatus struct {
	Protocol    discovery.Protocol `json:"protocol"`
	ServicePort uint16             `json:"servicePort"`
	Address     netip.AddrPort     `json:"address"`
	Flows       uint64             `json:"flows"`
	// EjectedUntil is the end of the endpoint's ejection, zero (omitted) when it is not ejected.
	EjectedUntil time.Time `json:"ejectedUntil,omitzero"`
	// Failures counts consecutive failed dials.
	Failures int `json:"failures,omitempty"`
}

// Stats counts flows by outcome since New.
type Stats struct {
	// OK counts flows dialled to an endpoint.
	OK uint64 `json:"ok"`
	// NoService counts flows refused with ErrNoService.
	NoService uint64 `json:"noService"`
	// NoEndpoints counts flows refused with ErrNoEndpoints.
	NoEndpoints uint64 `json:"noEndpoints"`
	// Failed counts flows refused because every endpoint tried failed (ErrDialFailed).
	Failed uint64 `json:"failed"`
	// DialFailures counts failed dial attempts.
	DialFailures uint64 `json:"dialFailures"`
	// Retries counts dial attempts after the first of a flow.
	Retries uint64 `json:"retries"`
}

type counters struct {
	ok, noService, noEndpoints, failed, dialFailures, retries atomic.Uint64
}

// Stats returns the flow counters.
func (p *Proxy) Stats() Stats {
	return Stats{
		OK:           p.stats.ok.Load(),
		NoService:    p.stats.noService.Load(),
		NoEndpoints:  p.stats.noEndpoints.Load(),
		Failed:       p.stats.failed.Load(),
		DialFailures: p.stats.dialFailures.Load(),
		Retries:      p.stats.retries.Load(),
	}
}

// Services describes the proxied services, sorted by namespace then name, with live counters and
// ejections as of now.
func (p *Proxy) Services() []ServiceStatus {
	t := p.table.Load()
	now := p.now()
	out := make([]ServiceStatus, 0, len(t.services))
	for _, e := range t.services {
		svc := e.svc
		st := ServiceStatus{
			Namespace:       svc.Namespace,
			Name:            svc.Name,
			IP:              svc.IP,
			Policy:          e.policy,
			SessionAffinity: svc.SessionAffinity,
			EndpointsTotal:  len(svc.Endpoints),
			Endpoints:       make([]EndpointStatus, len(svc.Endpoints)),
		}
		for i := range svc.Endpoints {
			ep := &svc.Endpoints[i]
			addr, _ := endpointAddr(svc.IP.Unmap(), ep)
			st.Endpoints[i] = EndpointStatus{
				Address:     addr,
				Node:        ep.NodeName,
				Zone:        ep.Zone,
				Ready:       eligible(ep),
				Terminating: ep.Terminating,
			}
			if eligible(ep) {
				st.EndpointsReady++
			}
		}
		for _, sp := range e.ports {
			st.AffinityTimeoutSeconds = int64(sp.affinityTimeout / time.Second)
			ps := PortStatus{
				Name:     sp.port.Name,
				Protocol: sp.port.Protocol,
				Port:     sp.port.Port,
				Eligible: len(sp.targets),
			}
			if sp.affinity != nil {
				ps.AffinityClients = sp.affinity.len()
			}
			st.Ports = append(st.Ports, ps)
			for i := range sp.targets {
				tg := &sp.targets[i]
				ts := TargetStatus{
					Protocol:    sp.port.Protocol,
					ServicePort: sp.port.Port,
					Address:     tg.addr,
					Flows:       tg.flows.Load(),
				}
				until, failures := tg.backend.until()
				if now.Before(until) {
					ts.EjectedUntil = until
				}
				ts.Failures = failures
				es := &st.Endpoints[tg.epIndex]
				es.Flows += ts.Flows
				es.Targets = append(es.Targets, ts)
			}
		}
		out = append(out, st)
	}
	return out
}
