package k8s

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/edgewire/edgewire/discovery"
)

const (
	// defaultAffinityTimeout is Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds.
	defaultAffinityTimeout = 10800 * time.Second
)

// objects are what the informers hold, as convert reads them.
type objects struct {
	services []*corev1.Service
	slices   []*discoveryv1.EndpointSlice
	nodes    []*corev1.Node
	// relays is the relay Secret, nil when there is none or relay discovery is off.
	relays *corev1.Secret
}

// problem is an object, or part of one, that convert skipped.
type problem struct {
	object string // "Node edge-2", "Service shop/web"
	msg    string // what is wrong and where, e.g. "annotation edgewire.io/endpoints: ..."
}

// converted is a snapshot with what convert skipped, for Run to log.
type converted struct {
	snap     *discovery.Snapshot
	problems []problem
	// orphans counts the EndpointSlices whose Service does not exist (normal for a moment while
	// a Service is created or deleted).
	orphans int
}

// convert builds a snapshot from the objects, in the order Snapshot documents and independent of
// the order of in: services by namespace/name, each service's endpoints by first address (ties in
// EndpointSlice name order, then in slice order), nodes by name, relays sorted. Every slice and map
// of the snapshot is nil when empty, and nothing in it is shared with in.
func convert(in objects) converted {
	var c converted
	c.snap = &discovery.Snapshot{}

	services := make(map[string]*discovery.Service, len(in.services))
	for _, svc := range in.services {
		s, probs := convertService(svc)
		c.problems = append(c.problems, probs...)
		services[s.Key()] = s
		c.snap.Services = append(c.snap.Services, s)
	}
	slices.SortFunc(c.snap.Services, func(a, b *discovery.Service) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})

	eps := slices.Clone(in.slices)
	slices.SortFunc(eps, func(a, b *discoveryv1.EndpointSlice) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	for _, es := range eps {
		name := es.Labels[discoveryv1.LabelServiceName]
		if name == "" {
			continue // not a Service's slice
		}
		svc, ok := services[es.Namespace+"/"+name]
		if !ok {
			c.orphans++
			continue
		}
		endpoints, probs := convertSlice(es)
		c.problems = append(c.problems, probs...)
		svc.Endpoints = append(svc.Endpoints, endpoints...)
	}
	for _, svc := range c.snap.Services {
		slices.SortStableFunc(svc.Endpoints, func(a, b discovery.Endpoint) int {
			return a.Addresses[0].Compare(b.Addresses[0])
		})
	}

	nodes := slices.Clone(in.nodes)
	slices.SortFunc(nodes, func(a, b *corev1.Node) int { return cmp.Compare(a.Name, b.Name) })
	keys := make(map[string]string, len(nodes)) // raw WireGuard key → name of the node that has it
	for _, node := range nodes {
		n, raw, err := convertNode(node)
		if err != nil {
			c.problems = append(c.problems, problem{object: "Node " + node.Name, msg: err.Error() + "; node skipped"})
			continue
		}
		if raw != "" {
			if other, dup := keys[raw]; dup {
				c.problems = append(c.problems, problem{object: "Node " + node.Name, msg: fmt.Sprintf(
					"annotation %s: key %s is also the key of Node %s, which is kept: every node needs its own key; node skipped",
					discovery.AnnotationWireGuardKey, n.WireGuardKey, other)})
				continue
			}
			keys[raw] = node.Name
		}
		c.snap.Nodes = append(c.snap.Nodes, n)
	}

	if in.relays != nil {
		var probs []problem
		c.snap.Relays, probs = relayAddrs(in.relays)
		c.problems = append(c.problems, probs...)
	}
	return c
}

// convertService converts a Service without its endpoints. The API server has validated it;
// what the mesh still cannot use (a protocol it does not know) is skipped and reported.
func convertService(svc *corev1.Service) (*discovery.Service, []problem) {
	s := &discovery.Service{Namespace: svc.Namespace, Name: svc.Name, Annotations: copyMap(svc.Annotations)}
	var probs []problem
	report := func(format string, args ...any) {
		probs = append(probs, problem{object: "Service " + s.Key(), msg: fmt.Sprintf(format, args...)})
	}
	spec := &svc.Spec
	if spec.Type == corev1.ServiceTypeExternalName {
		s.ExternalName = spec.ExternalName
	} else {
		s.ClusterIP, s.Headless = clusterIP(spec)
	}

	for i, sp := range spec.Ports {
		proto, ok := protocol(sp.Protocol)
		if !ok {
			report("spec.ports[%d].protocol: unknown protocol %q (want TCP, UDP or SCTP); port skipped", i, sp.Protocol)
			continue
		}
		if sp.Port < 1 || sp.Port > 65535 {
			report("spec.ports[%d].port: must be 1-65535, got %d; port skipped", i, sp.Port)
			continue
		}
		port := discovery.ServicePort{Name: sp.Name, Protocol: proto, Port: uint16(sp.Port)}
		var err error
		if port.TargetPort, port.TargetPortName, err = targetPort(sp.TargetPort); err != nil {
			report("spec.ports[%d].targetPort: %v; the port itself is the target", i, err)
		}
		s.Ports = append(s.Ports, port)
	}

	if spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		s.SessionAffinity = true
		s.AffinityTimeout = defaultAffinityTimeout
		if c := spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil && *c.ClientIP.TimeoutSeconds > 0 {
			s.AffinityTimeout = time.Duration(*c.ClientIP.TimeoutSeconds) * time.Second
		}
	}
	return s, probs
}

// clusterIP returns the first of spec.clusterIPs and spec.clusterIP that is an IP address, or
// headless for "None" (the API server makes both agree; an old object may have only clusterIP).
func clusterIP(spec *corev1.ServiceSpec) (ip netip.Addr, headless bool) {
	for _, s := range append(slices.Clip(spec.ClusterIPs), spec.ClusterIP) {
		if s == corev1.ClusterIPNone {
			return netip.Addr{}, true
		}
		if a, err := netip.ParseAddr(s); err == nil && a.Zone() == "" {
			return a, false
		}
	}
	return netip.Addr{}, false
}

// targetPort reads a Service port's targetPort: a number (also as a string of digits) or the name
// of an endpoint port. Zero gives zero values (the port itself is the target).
func targetPort(tp intstr.IntOrString) (port uint16, name string, err error) {
	v := tp.StrVal
	if tp.Type == intstr.Int {
		v = strconv.Itoa(int(tp.IntVal))
	}
	if v == "" || v == "0" {
		return 0, "", nil
	}
	if strings.Trim(v, "0123456789") != "" {
		return 0, v, nil
	}
	n, err := strconv.ParseUint(v, 10, 16)
	if err != nil || n == 0 {
		return 0, "", fmt.Errorf("must be 1-65535, got %s", v)
	}
	return uint16(n), "", nil
}

// convertSlice converts the endpoints of an EndpointSlice with the slice's ports. FQDN slices
// have none for the mesh. An address that is not of the slice's family is skipped and reported.
func convertSlice(es *discoveryv1.EndpointSlice) ([]discovery.Endpoint, []problem) {
	var family func(netip.Addr) bool
	switch es.AddressType {
	case discoveryv1.AddressTypeIPv4:
		family = netip.Addr.Is4
	case discoveryv1.AddressTypeIPv6:
		family = netip.Addr.Is6
	default: // FQDN, or a type the mesh does not know
		return nil, nil
	}
	var probs []problem
	report := func(format string, args ...any) {
		probs = append(probs, problem{object: "EndpointSlice " + es.Namespace + "/" + es.Name, msg: fmt.Sprintf(format, args...)})
	}

	var ports []discovery.EndpointPort
	for i, p := range es.Ports {
		var proto corev1.Protocol
		if p.Protocol != nil {
			proto = *p.Protocol
		}
		dp, ok := protocol(proto)
		if !ok {
			report("ports[%d].protocol: unknown protocol %q (want TCP, UDP or SCTP); port skipped", i, proto)
			continue
		}
		ep := discovery.EndpointPort{Name: deref(p.Name), Protocol: dp}
		if p.Port != nil {
			if *p.Port < 1 || *p.Port > 65535 {
				report("ports[%d].port: must be 1-65535, got %d; port skipped", i, *p.Port)
				continue
			}
			ep.Port = uint16(*p.Port)
		}
		ports = append(ports, ep)
	}

	var out []discovery.Endpoint
	for i, e := range es.Endpoints {
		var addrs []netip.Addr
		for j, s := range e.Addresses {
			a, err := netip.ParseAddr(s)
			if err != nil || a.Zone() != "" || !family(a) {
				report("endpoints[%d].addresses[%d]: %q is not an %s address; skipped", i, j, s, es.AddressType)
				continue
			}
			addrs = append(addrs, a)
		}
		if len(addrs) == 0 {
			continue
		}
		c := e.Conditions
		ready := c.Ready == nil || *c.Ready
		serving := ready
		if c.Serving != nil {
			serving = *c.Serving
		}
		out = append(out, discovery.Endpoint{
			Addresses:   addrs,
			Hostname:    deref(e.Hostname),
			NodeName:    deref(e.NodeName),
			Zone:        deref(e.Zone),
			Ready:       ready,
			Serving:     serving,
			Terminating: c.Terminating != nil && *c.Terminating,
			Ports:       ports,
		})
	}
	return out, probs
}

// convertNode converts a Node and returns its raw WireGuard key ("" when it has none). The mesh
// annotations are validated as discovery/static validates them; an error names the annotation.
func convertNode(node *corev1.Node) (n *discovery.Node, rawKey string, err error) {
	ann := node.Annotations
	n = &discovery.Node{Name: node.Name, Annotations: copyMap(ann)}
	key, hasKey := ann[discovery.AnnotationWireGuardKey]
	if hasKey {
		var ok bool
		if rawKey, ok = discovery.ParseWireGuardKey(key); !ok {
			return nil, "", fmt.Errorf("annotation %s: %q is not a WireGuard public key (32 bytes in base64, as `wg pubkey` prints)",
				discovery.AnnotationWireGuardKey, key)
		}
		n.WireGuardKey = key
	}
	if eps, ok := ann[discovery.AnnotationEndpoints]; ok {
		if !hasKey {
			return nil, "", fmt.Errorf("annotation %s: set without %s: a node without a WireGuard key is not a mesh peer",
				discovery.AnnotationEndpoints, discovery.AnnotationWireGuardKey)
		}
		if n.Endpoints, err = discovery.ParseEndpoints(eps); err != nil {
			return nil, "", fmt.Errorf("annotation %s: %w", discovery.AnnotationEndpoints, err)
		}
	}
	return n, rawKey, nil
}

// relayAddrs reads the relay Secret: each data value lists multiaddrs separated by newlines or
// commas (PublishRelay writes one value per relay, keyed by its peer ID). The result is trimmed,
// sorted and without duplicates; an entry that is not a multiaddr with /p2p/ is skipped and
// reported.
func relayAddrs(sec *corev1.Secret) ([]string, []problem) {
	keys := make([]string, 0, len(sec.Data))
	for k := range sec.Data {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var addrs []string
	var probs []problem
	for _, k := range keys {
		for a := range strings.FieldsFuncSeq(string(sec.Data[k]), func(r rune) bool { return r == '\n' || r == ',' }) {
			a = strings.TrimSpace(a)
			switch {
			case a == "":
			case !strings.HasPrefix(a, "/") || !strings.Contains(a, "/p2p/") || strings.ContainsAny(a, " \t\r"):
				probs = append(probs, problem{object: "Secret " + sec.Namespace + "/" + sec.Name,
					msg: fmt.Sprintf("data[%s]: %q is not a libp2p multiaddr with /p2p/<peer ID>; skipped", k, a)})
			default:
				addrs = append(addrs, a)
			}
		}
	}
	slices.Sort(addrs)
	return slices.Clip(slices.Compact(addrs)), probs
}

// protocol converts a Kubernetes protocol; "" is TCP, as the API server defaults it.
func protocol(p corev1.Protocol) (discovery.Protocol, bool) {
	switch d := discovery.Protocol(p); d {
	case "":
		return discovery.TCP, true
	case discovery.TCP, discovery.UDP, discovery.SCTP:
		return d, true
	}
	return "", false
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func copyMap(m map[string]string) map[string]string {
	if len(m) == 0 {
		return nil
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}
