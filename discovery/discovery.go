// Package discovery owns the catalog model of the mesh: one immutable Snapshot of services (name,
// namespace, service IP, ports, endpoints with node, readiness and zone) and nodes, and the Source
// interface that produces snapshots. Sources convert whatever they read (a static file of Kubernetes
// objects in discovery/static, the Kubernetes API in discovery/k8s) into these types at their
// boundary, so nothing downstream of discovery knows about Kubernetes objects.
//
// A Snapshot, once passed to a consumer, is never modified: a change in the world produces a new one.
package discovery

import (
	"context"
	"net/netip"
	"time"
)

// Protocol is a transport protocol of a service port, spelled as Kubernetes spells it.
type Protocol string

// Protocols a service port may carry.
const (
	TCP  Protocol = "TCP"
	UDP  Protocol = "UDP"
	SCTP Protocol = "SCTP"
)

// Annotations understood on a Service (see docs/services.md).
const (
	// AnnotationLBPolicy selects the load-balancing policy of a service: "round-robin" (default),
	// "random" or "source-hash".
	AnnotationLBPolicy = "edgewire.io/lb-policy"
	// AnnotationTopologyPreference set to "local" makes new flows prefer ready endpoints on the
	// client's own node, falling back to the others when it has none.
	AnnotationTopologyPreference = "edgewire.io/topology-preference"
)

// Annotations an agent publishes on its Node: how other nodes reach it over WireGuard.
const (
	// AnnotationWireGuardKey is the node's WireGuard public key, in base64 as `wg pubkey` prints
	// it. A Node without it is not a mesh peer.
	AnnotationWireGuardKey = "edgewire.io/wireguard-public-key"
	// AnnotationEndpoints lists the node's WireGuard socket addresses, LAN addresses first,
	// comma-separated ip:port, IPv6 as [addr]:port, for example "10.0.0.5:51820,[fd00::5]:51820".
	AnnotationEndpoints = "edgewire.io/endpoints"
	// AnnotationOverlayAddress is the node's overlay address. It is derived from the WireGuard key
	// (so it is informational: other nodes derive it themselves) and published for operators.
	AnnotationOverlayAddress = "edgewire.io/overlay-address"
)

// Snapshot is the whole catalog at one moment. Services are sorted by namespace, then name; nodes by
// name. The zero Snapshot is an empty catalog.
type Snapshot struct {
	Services []*Service
	Nodes    []*Node
	// Relays are mesh-relay addresses the source learned (on Kubernetes, from the relay Secret
	// that mesh-relay publishes): libp2p multiaddrs with /p2p/<peer ID>, sorted, no duplicates.
	Relays []string
}

// Service is a stripped-down Kubernetes Service joined with its EndpointSlices: only what the mesh
// needs.
type Service struct {
	Namespace string
	Name      string

	// ClusterIP is the address the source gave the service, or the zero Addr when it had none.
	ClusterIP netip.Addr
	// Headless is true for `clusterIP: None`: DNS answers with the ready endpoint addresses and the
	// service gets no service IP.
	Headless bool
	// ExternalName is set for services of type ExternalName (DNS answers with a CNAME).
	ExternalName string

	// IP is the service IP inside the mesh's service CIDR, set by AssignIPs. It is the zero Addr for
	// headless and ExternalName services.
	IP netip.Addr

	Ports     []ServicePort
	Endpoints []Endpoint

	// SessionAffinity is true for `sessionAffinity: ClientIP`; AffinityTimeout is its
	// timeoutSeconds (Kubernetes' default is 10800 s).
	SessionAffinity bool
	AffinityTimeout time.Duration

	// Annotations are the Service's metadata.annotations (nil when it has none).
	Annotations map[string]string
}

// Key returns "namespace/name".
func (s *Service) Key() string { return s.Namespace + "/" + s.Name }

// ServicePort is one entry of a Service's spec.ports.
type ServicePort struct {
	Name     string
	Protocol Protocol
	Port     uint16
	// TargetPort is the endpoint port by number; when zero, TargetPortName names an endpoint port
	// (resolved per endpoint through Endpoint.Ports). When both are empty, the target is Port.
	TargetPort     uint16
	TargetPortName string
}

// Endpoint is one endpoint of an EndpointSlice, with the ports of the slice it came from.
type Endpoint struct {
	Addresses   []netip.Addr
	Hostname    string
	NodeName    string
	Zone        string
	Ready       bool
	Serving     bool
	Terminating bool
	Ports       []EndpointPort
}

// EndpointPort is one entry of an EndpointSlice's ports.
type EndpointPort struct {
	Name     string
	Protocol Protocol
	Port     uint16
}

// Node is a node of the mesh: an entry of the node directory.
type Node struct {
	Name string
	// WireGuardKey is the node's WireGuard public key in base64 (AnnotationWireGuardKey), checked
	// by the source to decode to 32 bytes; "" when the node is not a mesh peer. No two nodes of a
	// snapshot share a key.
	WireGuardKey string
	// Endpoints are the node's WireGuard socket addresses (AnnotationEndpoints), LAN first, in the
	// order the node published them.
	Endpoints   []netip.AddrPort
	Annotations map[string]string
}

// Source produces catalog snapshots.
type Source interface {
	// Run watches the source and calls update with every new snapshot, first with the initial one,
	// until ctx is done; it then returns nil. update is never called concurrently with itself. Run
	// returns an error only when the source cannot work at all (its initial state cannot be read);
	// later errors are logged and the last good snapshot stays in force.
	Run(ctx context.Context, update func(*Snapshot)) error
}

// Self is what a node publishes about itself so that other nodes can reach it.
type Self struct {
	// WireGuardKey is the node's WireGuard public key in base64.
	WireGuardKey string
	// Overlay is the node's overlay address.
	Overlay netip.Addr
	// Endpoints are the node's WireGuard socket addresses, LAN addresses first.
	Endpoints []netip.AddrPort
}

// Publisher is implemented by sources that can publish the node's own Self where other nodes read
// it (the Kubernetes source: annotations on the node's Node object). Publish records self and
// returns at once; the source applies it in the background, retrying until it sticks, and
// re-applies it if it is lost. It may be called again when self changes.
type Publisher interface {
	Publish(self Self)
}

// TargetFor resolves the endpoint port that a flow to service port sp uses on endpoint ep, the way
// kube-proxy does: the endpoint's slice port with the service port's name wins (that is how the
// EndpointSlice controller publishes a resolved targetPort); else a slice port named by a named
// targetPort; else the numeric targetPort; else the service port itself. ok is false when sp names a
// target port that the endpoint does not have.
func (sp ServicePort) TargetFor(ep *Endpoint) (port uint16, ok bool) {
	for _, p := range ep.Ports {
		if p.Name == sp.Name && p.Protocol == sp.Protocol && p.Port != 0 {
			return p.Port, true
		}
	}
	if sp.TargetPortName != "" {
		for _, p := range ep.Ports {
			if p.Name == sp.TargetPortName && p.Protocol == sp.Protocol && p.Port != 0 {
				return p.Port, true
			}
		}
		return 0, false
	}
	if sp.TargetPort != 0 {
		return sp.TargetPort, true
	}
	return sp.Port, true
}
