package k8s

import (
	"bytes"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/edgewire/edgewire/discovery"
)

func addrs(ss ...string) []netip.Addr {
	out := make([]netip.Addr, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParseAddr(s)
	}
	return out
}

func addrPorts(ss ...string) []netip.AddrPort {
	out := make([]netip.AddrPort, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParseAddrPort(s)
	}
	return out
}

// checkProblems checks that the problems are exactly one per entry of want, each naming the
// object (first element) and containing the rest.
func checkProblems(t *testing.T, got []problem, want [][]string) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("problems = %q, want %d matching %q", got, len(want), want)
	}
	for i, w := range want {
		if got[i].object != w[0] || !containsAll(got[i].msg, w[1:]) {
			t.Errorf("problem %d = %q, want object %q and a message containing %q", i, got[i], w[0], w[1:])
		}
	}
}

func TestConvertServices(t *testing.T) {
	tcp80 := []discovery.ServicePort{{Name: "http", Protocol: discovery.TCP, Port: 80}}
	tests := []struct {
		name     string
		svc      *corev1.Service
		want     *discovery.Service
		problems [][]string
	}{
		{
			name: "cluster IP, annotations",
			svc: service("shop", "web", func(s *corev1.Service) {
				s.Annotations = map[string]string{discovery.AnnotationLBPolicy: "random"}
			}),
			want: &discovery.Service{Namespace: "shop", Name: "web", ClusterIP: netip.MustParseAddr("10.96.0.80"),
				Ports: tcp80, Annotations: map[string]string{discovery.AnnotationLBPolicy: "random"}},
		},
		{
			name: "numbered, named, digit-string and absent target ports; protocols",
			svc: service("shop", "web", func(s *corev1.Service) {
				s.Spec.Ports = []corev1.ServicePort{
					{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)},
					{Name: "grpc", Port: 9090, TargetPort: intstr.FromString("grpc-port")},
					{Name: "dns", Protocol: corev1.ProtocolUDP, Port: 53, TargetPort: intstr.FromString("5353")},
					{Name: "sctp", Protocol: corev1.ProtocolSCTP, Port: 3868},
				}
			}),
			want: &discovery.Service{Namespace: "shop", Name: "web", ClusterIP: netip.MustParseAddr("10.96.0.80"),
				Ports: []discovery.ServicePort{
					{Name: "http", Protocol: discovery.TCP, Port: 80, TargetPort: 8080},
					{Name: "grpc", Protocol: discovery.TCP, Port: 9090, TargetPortName: "grpc-port"},
					{Name: "dns", Protocol: discovery.UDP, Port: 53, TargetPort: 5353},
					{Name: "sctp", Protocol: discovery.SCTP, Port: 3868},
				}},
		},
		{
			name: "headless",
			svc: service("shop", "db", func(s *corev1.Service) {
				s.Spec.ClusterIP, s.Spec.ClusterIPs = corev1.ClusterIPNone, []string{corev1.ClusterIPNone}
			}),
			want: &discovery.Service{Namespace: "shop", Name: "db", Headless: true, Ports: tcp80},
		},
		{
			name: "ExternalName",
			svc: service("shop", "ext", func(s *corev1.Service) {
				s.Spec.Type, s.Spec.ExternalName = corev1.ServiceTypeExternalName, "db.example.com"
				s.Spec.ClusterIP, s.Spec.ClusterIPs, s.Spec.Ports = "", nil, nil
			}),
			want: &discovery.Service{Namespace: "shop", Name: "ext", ExternalName: "db.example.com"},
		},
		{
			name: "dual-stack: first of clusterIPs",
			svc: service("shop", "web", func(s *corev1.Service) {
				s.Spec.ClusterIP, s.Spec.ClusterIPs = "fd00::80", []string{"fd00::80", "10.96.0.80"}
			}),
			want: &discovery.Service{Namespace: "shop", Name: "web", ClusterIP: netip.MustParseAddr("fd00::80"), Ports: tcp80},
		},
		{
			name: "only clusterIP set, first entry that parses wins",
			svc: service("shop", "web", func(s *corev1.Service) {
				s.Spec.ClusterIP, s.Spec.ClusterIPs = "10.96.0.81", []string{"bogus"}
			}),
			want: &discovery.Service{Namespace: "shop", Name: "web", ClusterIP: netip.MustParseAddr("10.96.0.81"), Ports: tcp80},
		},
		{
			name: "NodePort keeps its cluster IP, no ports",
			svc: service("shop", "web", func(s *corev1.Service) {
				s.Spec.Type, s.Spec.Ports = corev1.ServiceTypeNodePort, nil
			}),
			want: &discovery.Service{Namespace: "shop", Name: "web", ClusterIP: netip.MustParseAddr("10.96.0.80")},
		},
		{
			name: "session affinity, default timeout",
			svc: service("shop", "web", func(s *corev1.Service) {
				s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
			}),
			want: &discovery.Service{Namespace: "shop", Name: "web", ClusterIP: netip.MustParseAddr("10.96.0.80"), Ports: tcp80,
				SessionAffinity: true, AffinityTimeout: 10800 * time.Second},
		},
		{
			name: "session affinity, 10 minutes",
			svc: service("shop", "web", func(s *corev1.Service) {
				s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
				s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr[int32](600)}}
			}),
			want: &discovery.Service{Namespace: "shop", Name: "web", ClusterIP: netip.MustParseAddr("10.96.0.80"), Ports: tcp80,
				SessionAffinity: true, AffinityTimeout: 10 * time.Minute},
		},
		{
			name: "affinity None",
			svc: service("shop", "web", func(s *corev1.Service) {
				s.Spec.SessionAffinity = corev1.ServiceAffinityNone
			}),
			want: &discovery.Service{Namespace: "shop", Name: "web", ClusterIP: netip.MustParseAddr("10.96.0.80"), Ports: tcp80},
		},
		{
			name: "unknown protocol: port skipped, reported",
			svc: service("shop", "web", func(s *corev1.Service) {
				s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Name: "x", Protocol: "QUIC", Port: 443})
			}),
			want:     &discovery.Service{Namespace: "shop", Name: "web", ClusterIP: netip.MustParseAddr("10.96.0.80"), Ports: tcp80},
			problems: [][]string{{"Service shop/web", "spec.ports[1].protocol", `"QUIC"`}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := convert(objects{services: []*corev1.Service{tc.svc}})
			if len(c.snap.Services) != 1 {
				t.Fatalf("got %d services, want 1", len(c.snap.Services))
			}
			if got := c.snap.Services[0]; !reflect.DeepEqual(got, tc.want) {
				t.Errorf("service:\n got %+v\nwant %+v", got, tc.want)
			}
			checkProblems(t, c.problems, tc.problems)
		})
	}
}

func TestConvertEndpointSlices(t *testing.T) {
	httpPort := []discoveryv1.EndpointPort{{Name: ptr("http"), Protocol: ptr(corev1.ProtocolTCP), Port: ptr[int32](8080)}}
	wantHTTP := []discovery.EndpointPort{{Name: "http", Protocol: discovery.TCP, Port: 8080}}
	ep := func(a ...string) discoveryv1.Endpoint { return discoveryv1.Endpoint{Addresses: a} }
	ready := func(a ...string) discovery.Endpoint {
		return discovery.Endpoint{Addresses: addrs(a...), Ready: true, Serving: true, Ports: wantHTTP}
	}
	tests := []struct {
		name     string
		services []*corev1.Service
		slices   []*discoveryv1.EndpointSlice
		want     map[string][]discovery.Endpoint // by service key; services not named have none
		orphans  int
		problems [][]string
	}{
		{
			name:     "no slices: no endpoints",
			services: []*corev1.Service{service("shop", "web", nil)},
		},
		{
			name:     "several slices, dual-stack, sorted by address",
			services: []*corev1.Service{service("shop", "web", nil)},
			slices: []*discoveryv1.EndpointSlice{
				endpointSlice("shop", "web-v6", "web", discoveryv1.AddressTypeIPv6, httpPort, ep("fd00::1")),
				endpointSlice("shop", "web-b", "web", discoveryv1.AddressTypeIPv4, httpPort, ep("10.0.0.3")),
				endpointSlice("shop", "web-a", "web", discoveryv1.AddressTypeIPv4, httpPort, ep("10.0.0.2"), ep("10.0.0.1")),
			},
			want: map[string][]discovery.Endpoint{"shop/web": {
				ready("10.0.0.1"), ready("10.0.0.2"), ready("10.0.0.3"), ready("fd00::1"),
			}},
		},
		{
			name:     "endpoint fields and slice ports",
			services: []*corev1.Service{service("shop", "web", nil)},
			slices: []*discoveryv1.EndpointSlice{endpointSlice("shop", "web-a", "web", discoveryv1.AddressTypeIPv4,
				[]discoveryv1.EndpointPort{
					{Name: ptr("http"), Port: ptr[int32](8080)},
					{Name: ptr("dns"), Protocol: ptr(corev1.ProtocolUDP), Port: ptr[int32](5353)},
					{Name: ptr("all")},
				},
				discoveryv1.Endpoint{Addresses: []string{"10.0.0.1", "10.0.0.9"}, Hostname: ptr("web-0"),
					NodeName: ptr("edge-1"), Zone: ptr("z1")},
			)},
			want: map[string][]discovery.Endpoint{"shop/web": {{
				Addresses: addrs("10.0.0.1", "10.0.0.9"), Hostname: "web-0", NodeName: "edge-1", Zone: "z1",
				Ready: true, Serving: true,
				Ports: []discovery.EndpointPort{
					{Name: "http", Protocol: discovery.TCP, Port: 8080},
					{Name: "dns", Protocol: discovery.UDP, Port: 5353},
					{Name: "all", Protocol: discovery.TCP},
				},
			}}},
		},
		{
			name:     "conditions: nil ready is true, nil serving is ready, nil terminating is false",
			services: []*corev1.Service{service("shop", "web", nil)},
			slices: []*discoveryv1.EndpointSlice{endpointSlice("shop", "web-a", "web", discoveryv1.AddressTypeIPv4, httpPort,
				discoveryv1.Endpoint{Addresses: []string{"10.0.0.1"}},
				discoveryv1.Endpoint{Addresses: []string{"10.0.0.2"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(false)}},
				discoveryv1.Endpoint{Addresses: []string{"10.0.0.3"}, Conditions: discoveryv1.EndpointConditions{
					Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)}},
				discoveryv1.Endpoint{Addresses: []string{"10.0.0.4"}, Conditions: discoveryv1.EndpointConditions{
					Ready: ptr(true), Serving: ptr(false), Terminating: ptr(false)}},
			)},
			want: map[string][]discovery.Endpoint{"shop/web": {
				{Addresses: addrs("10.0.0.1"), Ready: true, Serving: true, Ports: wantHTTP},
				{Addresses: addrs("10.0.0.2"), Ports: wantHTTP},
				{Addresses: addrs("10.0.0.3"), Serving: true, Terminating: true, Ports: wantHTTP},
				{Addresses: addrs("10.0.0.4"), Ready: true, Ports: wantHTTP},
			}},
		},
		{
			name:     "FQDN slices skipped",
			services: []*corev1.Service{service("shop", "web", nil)},
			slices: []*discoveryv1.EndpointSlice{
				endpointSlice("shop", "web-fqdn", "web", discoveryv1.AddressTypeFQDN, httpPort, ep("web.example.com")),
				endpointSlice("shop", "web-a", "web", discoveryv1.AddressTypeIPv4, httpPort, ep("10.0.0.1")),
			},
			want: map[string][]discovery.Endpoint{"shop/web": {ready("10.0.0.1")}},
		},
		{
			name:     "orphan slices and slices of no service ignored",
			services: []*corev1.Service{service("shop", "web", nil)},
			slices: []*discoveryv1.EndpointSlice{
				endpointSlice("shop", "gone-a", "gone", discoveryv1.AddressTypeIPv4, httpPort, ep("10.0.0.7")),
				endpointSlice("other", "web-a", "web", discoveryv1.AddressTypeIPv4, httpPort, ep("10.0.0.8")),
				endpointSlice("shop", "custom", "", discoveryv1.AddressTypeIPv4, httpPort, ep("10.0.0.9")),
				endpointSlice("shop", "web-a", "web", discoveryv1.AddressTypeIPv4, httpPort, ep("10.0.0.1")),
			},
			want:    map[string][]discovery.Endpoint{"shop/web": {ready("10.0.0.1")}},
			orphans: 2,
		},
		{
			name:     "slices join their own service only",
			services: []*corev1.Service{service("shop", "web", nil), service("shop", "api", nil)},
			slices: []*discoveryv1.EndpointSlice{
				endpointSlice("shop", "web-a", "web", discoveryv1.AddressTypeIPv4, httpPort, ep("10.0.0.1")),
				endpointSlice("shop", "api-a", "api", discoveryv1.AddressTypeIPv4, httpPort, ep("10.0.1.1")),
			},
			want: map[string][]discovery.Endpoint{"shop/web": {ready("10.0.0.1")}, "shop/api": {ready("10.0.1.1")}},
		},
		{
			name:     "address of the wrong family skipped, reported",
			services: []*corev1.Service{service("shop", "web", nil)},
			slices: []*discoveryv1.EndpointSlice{
				endpointSlice("shop", "web-a", "web", discoveryv1.AddressTypeIPv4, httpPort, ep("fd00::1"), ep("10.0.0.1")),
			},
			want:     map[string][]discovery.Endpoint{"shop/web": {ready("10.0.0.1")}},
			problems: [][]string{{"EndpointSlice shop/web-a", "endpoints[0].addresses[0]", `"fd00::1"`, "IPv4"}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := convert(objects{services: tc.services, slices: tc.slices})
			if len(c.snap.Services) != len(tc.services) {
				t.Fatalf("got %d services, want %d", len(c.snap.Services), len(tc.services))
			}
			for _, svc := range c.snap.Services {
				if want := tc.want[svc.Key()]; !reflect.DeepEqual(svc.Endpoints, want) {
					t.Errorf("%s endpoints:\n got %+v\nwant %+v", svc.Key(), svc.Endpoints, want)
				}
			}
			if c.orphans != tc.orphans {
				t.Errorf("orphans = %d, want %d", c.orphans, tc.orphans)
			}
			checkProblems(t, c.problems, tc.problems)
		})
	}
}

func TestConvertNodes(t *testing.T) {
	meshAnn := func(key, eps string) map[string]string {
		return map[string]string{discovery.AnnotationWireGuardKey: key, discovery.AnnotationEndpoints: eps}
	}
	tests := []struct {
		name     string
		nodes    []*corev1.Node
		want     []*discovery.Node
		problems [][]string
	}{
		{
			name:  "mesh peer: key and endpoints, LAN first, order kept",
			nodes: []*corev1.Node{node("edge-1", meshAnn(keyA, "192.168.1.5:51820,[2001:db8::5]:51820,203.0.113.7:40000"))},
			want: []*discovery.Node{{
				Name: "edge-1", WireGuardKey: keyA,
				Endpoints:   addrPorts("192.168.1.5:51820", "[2001:db8::5]:51820", "203.0.113.7:40000"),
				Annotations: meshAnn(keyA, "192.168.1.5:51820,[2001:db8::5]:51820,203.0.113.7:40000"),
			}},
		},
		{
			name:  "node without mesh annotations, sorted by name",
			nodes: []*corev1.Node{node("edge-2", map[string]string{"x": "y"}), node("edge-1", nil)},
			want:  []*discovery.Node{{Name: "edge-1"}, {Name: "edge-2", Annotations: map[string]string{"x": "y"}}},
		},
		{
			name: "bad key: that node skipped, the others kept",
			nodes: []*corev1.Node{
				node("edge-1", meshAnn(keyA, "10.0.0.1:51820")),
				node("edge-2", meshAnn("not-a-key", "10.0.0.2:51820")),
			},
			want: []*discovery.Node{{Name: "edge-1", WireGuardKey: keyA, Endpoints: addrPorts("10.0.0.1:51820"),
				Annotations: meshAnn(keyA, "10.0.0.1:51820")}},
			problems: [][]string{{"Node edge-2", discovery.AnnotationWireGuardKey, `"not-a-key"`, "node skipped"}},
		},
		{
			name:     "endpoints without a key",
			nodes:    []*corev1.Node{node("edge-1", map[string]string{discovery.AnnotationEndpoints: "10.0.0.1:51820"})},
			problems: [][]string{{"Node edge-1", discovery.AnnotationEndpoints, "without " + discovery.AnnotationWireGuardKey}},
		},
		{
			name:     "bad endpoints",
			nodes:    []*corev1.Node{node("edge-1", meshAnn(keyA, "10.0.0.1:51820,10.0.0.1"))},
			problems: [][]string{{"Node edge-1", discovery.AnnotationEndpoints, `"10.0.0.1" is not ip:port`}},
		},
		{
			name:     "endpoint listed twice",
			nodes:    []*corev1.Node{node("edge-1", meshAnn(keyA, "10.0.0.1:51820, 10.0.0.1:51820"))},
			problems: [][]string{{"Node edge-1", discovery.AnnotationEndpoints, "listed twice"}},
		},
		{
			name: "duplicate keys: the first by name kept",
			nodes: []*corev1.Node{
				node("edge-c", meshAnn(keyA, "10.0.0.3:51820")),
				node("edge-a", meshAnn(keyA, "10.0.0.1:51820")),
				node("edge-b", meshAnn(keyB, "10.0.0.2:51820")),
			},
			want: []*discovery.Node{
				{Name: "edge-a", WireGuardKey: keyA, Endpoints: addrPorts("10.0.0.1:51820"), Annotations: meshAnn(keyA, "10.0.0.1:51820")},
				{Name: "edge-b", WireGuardKey: keyB, Endpoints: addrPorts("10.0.0.2:51820"), Annotations: meshAnn(keyB, "10.0.0.2:51820")},
			},
			problems: [][]string{{"Node edge-c", discovery.AnnotationWireGuardKey, "also the key of Node edge-a"}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := convert(objects{nodes: tc.nodes})
			if !reflect.DeepEqual(c.snap.Nodes, tc.want) {
				t.Errorf("nodes:\n got %s\nwant %s", encodeSnapshot(c.snap), encodeSnapshot(&discovery.Snapshot{Nodes: tc.want}))
			}
			checkProblems(t, c.problems, tc.problems)
		})
	}
}

func TestConvertRelaySecret(t *testing.T) {
	const (
		a1 = "/ip4/198.51.100.1/udp/4001/quic-v1/p2p/12D3KooWA"
		a2 = "/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWA"
		b1 = "/ip6/2001:db8::1/tcp/4001/p2p/12D3KooWB"
	)
	tests := []struct {
		name     string
		data     map[string]string
		want     []string
		problems [][]string
	}{
		{name: "empty Secret"},
		{
			name: "newlines and commas, trimmed, deduplicated, sorted",
			data: map[string]string{
				"12D3KooWA": a2 + "\n" + a1 + "\n",
				"12D3KooWB": " " + b1 + " ,\r\n" + a2 + ",,",
			},
			want: []string{a2, a1, b1},
		},
		{
			name:     "entries that are not multiaddrs with /p2p/ skipped, reported",
			data:     map[string]string{"12D3KooWA": a1 + "\n198.51.100.1:4001\n/ip4/198.51.100.1/tcp/4001"},
			want:     []string{a1},
			problems: [][]string{{"Secret edgewire/relays", "data[12D3KooWA]", `"198.51.100.1:4001"`}, {"Secret edgewire/relays", `"/ip4/198.51.100.1/tcp/4001"`}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := convert(objects{relays: relaySecret(tc.data)})
			if !slices.Equal(c.snap.Relays, tc.want) || (tc.want == nil) != (c.snap.Relays == nil) {
				t.Errorf("relays = %q, want %q", c.snap.Relays, tc.want)
			}
			checkProblems(t, c.problems, tc.problems)
		})
	}
}

// TestConvertOrderIndependent checks that the snapshot does not depend on the order in which the
// informers list objects (Go map order), so that equal catalogs give equal snapshots.
func TestConvertOrderIndependent(t *testing.T) {
	httpPort := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	in := objects{
		services: []*corev1.Service{service("shop", "web", nil), service("shop", "api", nil), service("kube-system", "dns", nil)},
		slices: []*discoveryv1.EndpointSlice{
			endpointSlice("shop", "web-a", "web", discoveryv1.AddressTypeIPv4, httpPort,
				discoveryv1.Endpoint{Addresses: []string{"10.0.0.1"}, NodeName: ptr("edge-1")}),
			// The same address in two slices (as while an endpoint moves between slices).
			endpointSlice("shop", "web-b", "web", discoveryv1.AddressTypeIPv4, httpPort,
				discoveryv1.Endpoint{Addresses: []string{"10.0.0.1"}, NodeName: ptr("edge-2")}),
			endpointSlice("shop", "web-c", "web", discoveryv1.AddressTypeIPv6, httpPort,
				discoveryv1.Endpoint{Addresses: []string{"fd00::1"}}),
			endpointSlice("shop", "api-a", "api", discoveryv1.AddressTypeIPv4, httpPort,
				discoveryv1.Endpoint{Addresses: []string{"10.0.1.2"}}, discoveryv1.Endpoint{Addresses: []string{"10.0.1.1"}}),
		},
		nodes: []*corev1.Node{
			node("edge-2", map[string]string{discovery.AnnotationWireGuardKey: keyA}),
			node("edge-1", map[string]string{discovery.AnnotationWireGuardKey: keyA}),
			node("edge-3", map[string]string{discovery.AnnotationWireGuardKey: keyB}),
		},
		relays: relaySecret(map[string]string{"b": "/dns4/b/tcp/1/p2p/B", "a": "/dns4/a/tcp/1/p2p/A"}),
	}
	want := encodeSnapshot(convert(in).snap)
	rng := rand.New(rand.NewPCG(1, 2))
	for range 20 {
		rng.Shuffle(len(in.services), func(i, j int) { in.services[i], in.services[j] = in.services[j], in.services[i] })
		rng.Shuffle(len(in.slices), func(i, j int) { in.slices[i], in.slices[j] = in.slices[j], in.slices[i] })
		rng.Shuffle(len(in.nodes), func(i, j int) { in.nodes[i], in.nodes[j] = in.nodes[j], in.nodes[i] })
		if got := encodeSnapshot(convert(in).snap); !bytes.Equal(got, want) {
			t.Fatalf("snapshot depends on input order:\n got %s\nwant %s", got, want)
		}
	}
	for _, svc := range convert(in).snap.Services {
		if svc.Key() != "shop/web" {
			continue
		}
		if n := len(svc.Endpoints); n != 3 || svc.Endpoints[0].NodeName != "edge-1" || svc.Endpoints[1].NodeName != "edge-2" {
			t.Errorf("endpoints with the same address not in slice name order: %+v", svc.Endpoints)
		}
	}
}
