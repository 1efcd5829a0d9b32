package static

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/edgewire/edgewire/discovery"
)

// Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds, and its maximum.
const (
	defaultAffinityTimeout = 10800
	maxAffinityTimeout     = 86400
)

// serviceNameLabel names an EndpointSlice's Service.
const serviceNameLabel = "kubernetes.io/service-name"

// Parse converts a YAML file of Kubernetes objects into a Snapshot. data holds one or more
// documents separated by `---`; a document may be a `kind: List` (or ServiceList, EndpointSliceList,
// NodeList) whose items are objects. Empty documents are skipped. v1 Service, discovery.k8s.io/v1
// EndpointSlice and v1 Node objects are converted; objects of other kinds are ignored, as are
// EndpointSlices of addressType FQDN and EndpointSlices whose Service is not in the file.
//
// A Node is a mesh peer when it has the discovery.AnnotationWireGuardKey annotation (the base64 of
// a 32-byte key, as `wg pubkey` prints it; no two Nodes may share a key) and lists its WireGuard
// addresses, LAN first, in discovery.AnnotationEndpoints ("10.0.0.5:51820,[fd00::5]:51820");
// endpoints without a key are an error.
//
// filename is used only in error messages, which name the file, the document (1-based), the
// object's kind and namespace/name when known, the line and the field path, for example
//
//	services.yaml: document 3 (Service default/web), line 14: spec.ports[0].port: must be 1-65535, got 70000
//
// The snapshot's services are sorted by namespace/name, each service's endpoints by their first
// address (ties keep file order), nodes by name. Parse assigns no service IPs (see
// discovery.AssignIPs).
func Parse(data []byte, filename string) (*discovery.Snapshot, error) {
	r, err := parse(data, filename)
	if err != nil {
		return nil, err
	}
	return r.snap, nil
}

// result is a parsed file with what Parse dropped, for the Source to log.
type result struct {
	snap *discovery.Snapshot
	// ignored counts the objects skipped, by kind ("EndpointSlice (FQDN)" for FQDN slices).
	ignored map[string]int
	// orphans lists the EndpointSlices ("namespace/name → service") whose Service is missing.
	orphans []string
	// endpoints is the total number of endpoints in snap.
	endpoints int
}

// parser holds the state of one parse.
type parser struct {
	file     string
	services map[string]*parsedService // by namespace/name
	slices   map[string]*parsedSlice   // by namespace/name
	nodes    map[string]*parsedNode    // by name
	wgKeys   map[string]*parsedNode    // by decoded WireGuard public key
	order    []*parsedSlice            // slices in file order
	ignored  map[string]int
	// names interns endpoints' node and zone names: a few distinct values, each repeated on
	// thousands of endpoints, would otherwise each be a string of their own.
	names map[string]string
	// rec, when not nil, records what the current document adds, for the next parse's cache
	// (see parseCached).
	rec *docRecord
}

type parsedService struct {
	svc *discovery.Service
	at  string // where it was defined, for duplicate errors
}

type parsedSlice struct {
	key       string // namespace/name of the slice
	service   string // namespace/name of its Service
	endpoints []discovery.Endpoint
	at        string
}

type parsedNode struct {
	node *discovery.Node
	at   string
}

func newParser(filename string) *parser {
	return &parser{
		file:     filename,
		services: make(map[string]*parsedService),
		slices:   make(map[string]*parsedSlice),
		nodes:    make(map[string]*parsedNode),
		wgKeys:   make(map[string]*parsedNode),
		ignored:  make(map[string]int),
		names:    make(map[string]string),
	}
}

func parse(data []byte, filename string) (*result, error) {
	p := newParser(filename)
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for doc := 1; ; doc++ {
		var root yaml.Node
		err := dec.Decode(&root)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", filename, doc, err)
		}
		if err := p.document(doc, &root); err != nil {
			return nil, err
		}
	}
	return p.finish(), nil
}

// document handles one YAML document: an object, a list of objects, or nothing.
func (p *parser) document(doc int, root *yaml.Node) error {
	n := root
	if n.Kind == yaml.DocumentNode {
		if len(n.Content) == 0 {
			return nil
		}
		n = n.Content[0]
	}
	n = resolve(n)
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return nil // an empty document
	}
	o := &object{file: p.file, doc: doc, node: n}
	if n.Kind != yaml.MappingNode {
		return o.errf(nil, "must be a Kubernetes object (a mapping), got a %s", nodeKind(n))
	}
	o.identify("", "")
	if !isList(o.kind) {
		return p.object(o)
	}
	items := resolve(mapValue(n, "items"))
	if items == nil || items.Kind == yaml.ScalarNode && items.Tag == "!!null" {
		return nil
	}
	if items.Kind != yaml.SequenceNode {
		return o.errf(path("items"), "must be a list, got a %s", nodeKind(items))
	}
	// Typed lists from the API server (ServiceList) send their items without kind and apiVersion.
	itemKind, itemAPIVersion := strings.TrimSuffix(o.kind, "List"), o.apiVersion
	if itemKind == "" {
		itemAPIVersion = ""
	}
	for i, item := range items.Content {
		item = resolve(item)
		obj := &object{file: p.file, doc: doc, item: i + 1, node: item}
		if item.Kind != yaml.MappingNode {
			return obj.errf(nil, "must be a Kubernetes object (a mapping), got a %s", nodeKind(item))
		}
		obj.identify(itemKind, itemAPIVersion)
		if isList(obj.kind) {
			return obj.errf(path("kind"), "a %s inside a List is not supported", obj.kind)
		}
		if err := p.object(obj); err != nil {
			return err
		}
	}
	return nil
}

func isList(kind string) bool {
	switch kind {
	case "List", "ServiceList", "EndpointSliceList", "NodeList":
		return true
	}
	return false
}

// object converts one Kubernetes object, or counts it as ignored.
func (p *parser) object(o *object) error {
	want := ""
	switch o.kind {
	case "":
		return o.errf(path("kind"), "required")
	case "Service", "Node":
		want = "v1"
	case "EndpointSlice":
		want = "discovery.k8s.io/v1"
	default:
		p.ignored[o.kind]++
		if p.rec != nil {
			p.rec.ignored = append(p.rec.ignored, o.kind)
		}
		return nil
	}
	if o.apiVersion != want {
		return o.errf(path("apiVersion"), "must be %s for a %s, got %q", want, o.kind, o.apiVersion)
	}
	if o.name == "" {
		return o.errf(path("metadata", "name"), "required")
	}
	switch o.kind {
	case "Service":
		return p.service(o)
	case "EndpointSlice":
		return p.endpointSlice(o)
	default:
		return p.nodeObject(o)
	}
}

// The subsets of the Kubernetes objects that the mesh reads. Unknown fields are ignored.
type (
	objectMeta struct {
		Name        string            `yaml:"name"`
		Namespace   string            `yaml:"namespace"`
		Labels      map[string]string `yaml:"labels"`
		Annotations map[string]string `yaml:"annotations"`
	}

	serviceObject struct {
		Metadata objectMeta  `yaml:"metadata"`
		Spec     serviceSpec `yaml:"spec"`
	}
	serviceSpec struct {
		Type                  string        `yaml:"type"`
		ClusterIP             string        `yaml:"clusterIP"`
		ClusterIPs            []string      `yaml:"clusterIPs"`
		ExternalName          string        `yaml:"externalName"`
		Ports                 []servicePort `yaml:"ports"`
		SessionAffinity       string        `yaml:"sessionAffinity"`
		SessionAffinityConfig struct {
			ClientIP struct {
				TimeoutSeconds *int64 `yaml:"timeoutSeconds"`
			} `yaml:"clientIP"`
		} `yaml:"sessionAffinityConfig"`
	}
	servicePort struct {
		Name       string      `yaml:"name"`
		Protocol   string      `yaml:"protocol"`
		Port       int64       `yaml:"port"`
		TargetPort intOrString `yaml:"targetPort"`
	}

	endpointSliceObject struct {
		Metadata    objectMeta `yaml:"metadata"`
		AddressType string     `yaml:"addressType"`
		Endpoints   []struct {
			Addresses  []string `yaml:"addresses"`
			Conditions struct {
				Ready       *bool `yaml:"ready"`
				Serving     *bool `yaml:"serving"`
				Terminating *bool `yaml:"terminating"`
			} `yaml:"conditions"`
			Hostname string `yaml:"hostname"`
			NodeName string `yaml:"nodeName"`
			Zone     string `yaml:"zone"`
		} `yaml:"endpoints"`
		Ports []struct {
			Name     string `yaml:"name"`
			Protocol string `yaml:"protocol"`
			Port     *int64 `yaml:"port"`
		} `yaml:"ports"`
	}

	nodeObject struct {
		Metadata objectMeta `yaml:"metadata"`
	}
)

// intOrString is a Kubernetes IntOrString, kept as its YAML node until validation so that errors
// can name the field.
type intOrString struct{ node *yaml.Node }

// UnmarshalYAML implements yaml.Unmarshaler.
func (v *intOrString) UnmarshalYAML(n *yaml.Node) error {
	v.node = n
	return nil
}

func (p *parser) service(o *object) error {
	var obj serviceObject
	if err := o.decode(&obj); err != nil {
		return err
	}
	if err := o.checkNames(); err != nil {
		return err
	}
	svc := &discovery.Service{Namespace: o.namespace, Name: o.name, Annotations: copyMap(obj.Metadata.Annotations)}
	spec := &obj.Spec

	switch spec.Type {
	case "", "ClusterIP", "NodePort", "LoadBalancer":
		ip := spec.ClusterIP
		field := path("spec", "clusterIP")
		if ip == "" && len(spec.ClusterIPs) > 0 {
			ip, field = spec.ClusterIPs[0], path("spec", "clusterIPs", 0)
		}
		switch ip {
		case "":
		case "None":
			svc.Headless = true
		default:
			a, err := netip.ParseAddr(ip)
			if err != nil || a.Zone() != "" {
				return o.errf(field, "invalid IP address %q", ip)
			}
			svc.ClusterIP = a
		}
	case "ExternalName":
		if spec.ExternalName == "" {
			return o.errf(path("spec", "externalName"), "required for a Service of type ExternalName")
		}
		svc.ExternalName = spec.ExternalName
	default:
		return o.errf(path("spec", "type"), "unknown type %q (want ClusterIP, NodePort, LoadBalancer or ExternalName)", spec.Type)
	}

	for i, sp := range spec.Ports {
		proto, err := protocol(sp.Protocol)
		if err != nil {
			return o.errf(path("spec", "ports", i, "protocol"), "%v", err)
		}
		if sp.Port < 1 || sp.Port > 65535 {
			return o.errf(path("spec", "ports", i, "port"), "must be 1-65535, got %d", sp.Port)
		}
		port := discovery.ServicePort{Name: sp.Name, Protocol: proto, Port: uint16(sp.Port)}
		port.TargetPort, port.TargetPortName, err = targetPort(sp.TargetPort.node)
		if err != nil {
			return o.errf(path("spec", "ports", i, "targetPort"), "%v", err)
		}
		svc.Ports = append(svc.Ports, port)
	}

	switch spec.SessionAffinity {
	case "", "None":
	case "ClientIP":
		timeout := int64(defaultAffinityTimeout)
		if t := spec.SessionAffinityConfig.ClientIP.TimeoutSeconds; t != nil {
			timeout = *t
		}
		if timeout < 1 || timeout > maxAffinityTimeout {
			return o.errf(path("spec", "sessionAffinityConfig", "clientIP", "timeoutSeconds"),
				"must be 1-%d, got %d", maxAffinityTimeout, timeout)
		}
		svc.SessionAffinity = true
		svc.AffinityTimeout = time.Duration(timeout) * time.Second
	default:
		return o.errf(path("spec", "sessionAffinity"), "unknown value %q (want None or ClientIP)", spec.SessionAffinity)
	}

	key := svc.Key()
	if prev, dup := p.services[key]; dup {
		return o.errf(path("metadata", "name"), "duplicate Service %s (first defined in %s)", key, prev.at)
	}
	p.services[key] = &parsedService{svc: svc, at: o.shortWhere()}
	if p.rec != nil {
		pristine := *svc // finish adds endpoints to svc, and AssignIPs its IP
		p.rec.entries = append(p.rec.entries, recEntry{item: o.item, svc: &pristine})
	}
	return nil
}

func (p *parser) endpointSlice(o *object) error {
	var obj endpointSliceObject
	if err := o.decode(&obj); err != nil {
		return err
	}
	if err := o.checkNamespace(); err != nil {
		return err
	}
	svcName := obj.Metadata.Labels[serviceNameLabel]
	if svcName == "" {
		return o.errf(path("metadata", "labels"), "missing label %s naming the Service", serviceNameLabel)
	}
	key := o.namespace + "/" + o.name
	if prev, dup := p.slices[key]; dup {
		return o.errf(path("metadata", "name"), "duplicate EndpointSlice %s (first defined in %s)", key, prev.at)
	}

	var family func(netip.Addr) bool
	switch obj.AddressType {
	case "":
		family = func(netip.Addr) bool { return true }
	case "IPv4":
		family = netip.Addr.Is4
	case "IPv6":
		family = netip.Addr.Is6
	case "FQDN":
		p.slices[key] = &parsedSlice{key: key, at: o.shortWhere()}
		p.ignored["EndpointSlice (FQDN)"]++
		if p.rec != nil {
			p.rec.entries = append(p.rec.entries, recEntry{item: o.item, slice: p.slices[key], fqdn: true})
		}
		return nil
	default:
		return o.errf(path("addressType"), "unknown address type %q (want IPv4, IPv6 or FQDN)", obj.AddressType)
	}

	ports := make([]discovery.EndpointPort, 0, len(obj.Ports))
	for i, sp := range obj.Ports {
		proto, err := protocol(sp.Protocol)
		if err != nil {
			return o.errf(path("ports", i, "protocol"), "%v", err)
		}
		var port uint16
		if sp.Port != nil {
			if *sp.Port < 1 || *sp.Port > 65535 {
				return o.errf(path("ports", i, "port"), "must be 1-65535, got %d", *sp.Port)
			}
			port = uint16(*sp.Port)
		}
		ports = append(ports, discovery.EndpointPort{Name: sp.Name, Protocol: proto, Port: port})
	}

	ps := &parsedSlice{
		key:       key,
		service:   o.namespace + "/" + svcName,
		endpoints: make([]discovery.Endpoint, 0, len(obj.Endpoints)),
		at:        o.shortWhere(),
	}
	for i, e := range obj.Endpoints {
		if len(e.Addresses) == 0 {
			return o.errf(path("endpoints", i, "addresses"), "at least one address is required")
		}
		addrs := make([]netip.Addr, len(e.Addresses))
		for j, s := range e.Addresses {
			a, err := netip.ParseAddr(s)
			if err != nil || a.Zone() != "" || !family(a) {
				want := "an IP address"
				if obj.AddressType != "" {
					want = "an " + obj.AddressType + " address"
				}
				return o.errf(path("endpoints", i, "addresses", j), "invalid address %q: want %s", s, want)
			}
			addrs[j] = a
		}
		c := e.Conditions
		ready := c.Ready == nil || *c.Ready
		serving := ready
		if c.Serving != nil {
			serving = *c.Serving
		}
		ps.endpoints = append(ps.endpoints, discovery.Endpoint{
			Addresses:   addrs,
			Hostname:    e.Hostname,
			NodeName:    p.intern(e.NodeName),
			Zone:        p.intern(e.Zone),
			Ready:       ready,
			Serving:     serving,
			Terminating: c.Terminating != nil && *c.Terminating,
			Ports:       ports,
		})
	}
	p.slices[key] = ps
	p.order = append(p.order, ps)
	if p.rec != nil {
		p.rec.entries = append(p.rec.entries, recEntry{item: o.item, slice: ps})
	}
	return nil
}

// intern returns s, or an equal string returned before.
func (p *parser) intern(s string) string {
	if s == "" {
		return ""
	}
	if v, ok := p.names[s]; ok {
		return v
	}
	p.names[s] = s
	return s
}

// finish joins slices to services and sorts everything.
func (p *parser) finish() *result {
	r := &result{snap: &discovery.Snapshot{}, ignored: p.ignored}
	for _, ps := range p.order {
		s, ok := p.services[ps.service]
		if !ok {
			r.orphans = append(r.orphans, ps.key+" → "+ps.service)
			continue
		}
		s.svc.Endpoints = append(s.svc.Endpoints, ps.endpoints...)
	}
	r.snap.Services = make([]*discovery.Service, 0, len(p.services))
	for _, s := range p.services {
		slices.SortStableFunc(s.svc.Endpoints, func(a, b discovery.Endpoint) int {
			return firstAddr(a).Compare(firstAddr(b))
		})
		r.endpoints += len(s.svc.Endpoints)
		r.snap.Services = append(r.snap.Services, s.svc)
	}
	slices.SortFunc(r.snap.Services, func(a, b *discovery.Service) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	r.snap.Nodes = make([]*discovery.Node, 0, len(p.nodes))
	for _, n := range p.nodes {
		r.snap.Nodes = append(r.snap.Nodes, n.node)
	}
	slices.SortFunc(r.snap.Nodes, func(a, b *discovery.Node) int { return cmp.Compare(a.Name, b.Name) })
	return r
}

func firstAddr(e discovery.Endpoint) netip.Addr {
	if len(e.Addresses) == 0 {
		return netip.Addr{}
	}
	return e.Addresses[0]
}

func protocol(s string) (discovery.Protocol, error) {
	switch p := discovery.Protocol(s); p {
	case "":
		return discovery.TCP, nil
	case discovery.TCP, discovery.UDP, discovery.SCTP:
		return p, nil
	}
	return "", fmt.Errorf("unknown protocol %q (want TCP, UDP or SCTP)", s)
}

// targetPort reads a Service port's targetPort: a number (also as a string of digits) or the name
// of an endpoint port. A missing targetPort gives zero values.
func targetPort(n *yaml.Node) (port uint16, name string, err error) {
	n = resolve(n)
	if n == nil || n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return 0, "", nil
	}
	if n.Kind != yaml.ScalarNode {
		return 0, "", fmt.Errorf("must be a port number or a port name, got a %s", nodeKind(n))
	}
	v := n.Value
	if v != "" && strings.Trim(v, "0123456789") == "" {
		num, err := strconv.ParseUint(v, 10, 32)
		if err != nil || num < 1 || num > 65535 {
			return 0, "", fmt.Errorf("must be 1-65535, got %s", v)
		}
		return uint16(num), "", nil
	}
	if !isPortName(v) {
		return 0, "", fmt.Errorf("must be a port number or a port name (up to 15 lowercase letters, digits and '-'), got %q", v)
	}
	return 0, v, nil
}

// isPortName reports whether s is an IANA service name, as Kubernetes requires of port names: at
// most 15 lowercase letters, digits and '-', with a letter, and '-' neither first, last nor doubled.
func isPortName(s string) bool {
	if s == "" || len(s) > 15 || s[0] == '-' || s[len(s)-1] == '-' || strings.Contains(s, "--") {
		return false
	}
	letter := false
	for _, c := range s {
		switch {
		case c >= 'a' && c <= 'z':
			letter = true
		case c >= '0' && c <= '9' || c == '-':
		default:
			return false
		}
	}
	return letter
}

// isDNSLabel reports whether s is an RFC 1123 label, as Kubernetes requires of Service names and
// namespaces (they become DNS names).
func isDNSLabel(s string) bool {
	if s == "" || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
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
