package static

import (
	"fmt"
	"net/netip"
	"os"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/edgewire/edgewire/discovery"
)

func addrs(ss ...string) []netip.Addr {
	out := make([]netip.Addr, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParseAddr(s)
	}
	return out
}

var httpSlicePorts = []discovery.EndpointPort{{Name: "http", Protocol: discovery.TCP, Port: 8080}}

const webService = `
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: 10.96.0.80
  ports:
  - name: http
    port: 80
    targetPort: http
`

const webSlice = `
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [10.0.0.2]
  nodeName: edge-2
  zone: z2
- addresses: [10.0.0.1]
  hostname: web-a
  nodeName: edge-1
  zone: z1
ports:
- {name: http, port: 8080}
`

func webWant() *discovery.Service {
	return &discovery.Service{
		Namespace: "shop", Name: "web", ClusterIP: netip.MustParseAddr("10.96.0.80"),
		Ports: []discovery.ServicePort{{Name: "http", Protocol: discovery.TCP, Port: 80, TargetPortName: "http"}},
		Endpoints: []discovery.Endpoint{
			{Addresses: addrs("10.0.0.1"), Hostname: "web-a", NodeName: "edge-1", Zone: "z1", Ready: true, Serving: true, Ports: httpSlicePorts},
			{Addresses: addrs("10.0.0.2"), NodeName: "edge-2", Zone: "z2", Ready: true, Serving: true, Ports: httpSlicePorts},
		},
	}
}

func TestParse(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want *discovery.Snapshot
	}{
		{
			name: "multi-document file",
			in: "---\n" + webSlice + "---\n" + webService + `---
apiVersion: v1
kind: Node
metadata:
  name: edge-2
  annotations: {edgewire.io/test: x}
---
apiVersion: v1
kind: Node
metadata: {name: edge-1}
`,
			want: &discovery.Snapshot{
				Services: []*discovery.Service{webWant()},
				Nodes: []*discovery.Node{
					{Name: "edge-1"},
					{Name: "edge-2", Annotations: map[string]string{"edgewire.io/test": "x"}},
				},
			},
		},
		{
			name: "kubectl List output",
			in: `apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: v1
  kind: Service
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"v1","kind":"Service"}
    creationTimestamp: "2024-05-01T10:00:00Z"
    name: api
    namespace: default
    resourceVersion: "1234"
    uid: 0b5c2d6e-7f0a-4c1b-9d1e-2f3a4b5c6d7e
  spec:
    clusterIP: 10.96.12.34
    clusterIPs:
    - 10.96.12.34
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: grpc
      port: 9090
      protocol: TCP
      targetPort: 9090
    selector:
      app: api
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 10.244.1.5
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: edge-1
    targetRef:
      kind: Pod
      name: api-7d9f8-abcde
      namespace: default
  kind: EndpointSlice
  metadata:
    generateName: api-
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: api
    name: api-x1y2z
    namespace: default
    ownerReferences:
    - apiVersion: v1
      kind: Service
      name: api
  ports:
  - name: grpc
    port: 9090
    protocol: TCP
`,
			want: &discovery.Snapshot{
				Services: []*discovery.Service{{
					Namespace: "default", Name: "api", ClusterIP: netip.MustParseAddr("10.96.12.34"),
					Annotations: map[string]string{"kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\",\"kind\":\"Service\"}\n"},
					Ports:       []discovery.ServicePort{{Name: "grpc", Protocol: discovery.TCP, Port: 9090, TargetPort: 9090}},
					Endpoints: []discovery.Endpoint{{
						Addresses: addrs("10.244.1.5"), NodeName: "edge-1", Ready: true, Serving: true,
						Ports: []discovery.EndpointPort{{Name: "grpc", Protocol: discovery.TCP, Port: 9090}},
					}},
				}},
				Nodes: []*discovery.Node{},
			},
		},
		{
			name: "typed ServiceList from the API without item kinds",
			in: `apiVersion: v1
kind: ServiceList
items:
- metadata: {name: a}
  spec: {clusterIP: None}
`,
			want: &discovery.Snapshot{
				Services: []*discovery.Service{{Namespace: "default", Name: "a", Headless: true}},
				Nodes:    []*discovery.Node{},
			},
		},
		{
			name: "target ports named, numbered, digits as a string and absent",
			in: `apiVersion: v1
kind: Service
metadata: {name: multi}
spec:
  type: NodePort
  ports:
  - {name: named, port: 80, targetPort: http}
  - {name: number, port: 81, targetPort: 8081}
  - {name: digits, port: 82, targetPort: "8082"}
  - {name: absent, port: 83, protocol: UDP}
  - {name: sctp, port: 84, protocol: SCTP, targetPort: null}
`,
			want: &discovery.Snapshot{
				Services: []*discovery.Service{{
					Namespace: "default", Name: "multi",
					Ports: []discovery.ServicePort{
						{Name: "named", Protocol: discovery.TCP, Port: 80, TargetPortName: "http"},
						{Name: "number", Protocol: discovery.TCP, Port: 81, TargetPort: 8081},
						{Name: "digits", Protocol: discovery.TCP, Port: 82, TargetPort: 8082},
						{Name: "absent", Protocol: discovery.UDP, Port: 83},
						{Name: "sctp", Protocol: discovery.SCTP, Port: 84},
					},
				}},
				Nodes: []*discovery.Node{},
			},
		},
		{
			name: "headless, ExternalName, LoadBalancer with clusterIPs",
			in: `apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  clusterIP: None
  ports: [{port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec:
  type: ExternalName
  externalName: example.com
---
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIPs: ["fd00::10", "10.96.0.10"]
`,
			want: &discovery.Snapshot{
				Services: []*discovery.Service{
					{Namespace: "default", Name: "db", Headless: true, Ports: []discovery.ServicePort{{Protocol: discovery.TCP, Port: 5432}}},
					{Namespace: "default", Name: "ext", ExternalName: "example.com"},
					{Namespace: "default", Name: "lb", ClusterIP: netip.MustParseAddr("fd00::10")},
				},
				Nodes: []*discovery.Node{},
			},
		},
		{
			name: "session affinity with default and explicit timeout",
			in: `apiVersion: v1
kind: Service
metadata: {name: a}
spec:
  sessionAffinity: ClientIP
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec:
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
---
apiVersion: v1
kind: Service
metadata: {name: c}
spec:
  sessionAffinity: None
`,
			want: &discovery.Snapshot{
				Services: []*discovery.Service{
					{Namespace: "default", Name: "a", SessionAffinity: true, AffinityTimeout: 3 * time.Hour},
					{Namespace: "default", Name: "b", SessionAffinity: true, AffinityTimeout: time.Minute},
					{Namespace: "default", Name: "c"},
				},
				Nodes: []*discovery.Node{},
			},
		},
		{
			name: "several slices merged and sorted, condition defaults",
			in: `apiVersion: v1
kind: Service
metadata: {name: s}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-2, labels: {kubernetes.io/service-name: s}}
addressType: IPv6
endpoints:
- addresses: ["fd00::3"]
  conditions: {ready: false}
- addresses: ["fd00::2"]
  conditions: {ready: false, serving: true, terminating: true}
ports: [{name: p, protocol: UDP, port: 53}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-1, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
endpoints:
- addresses: ["10.0.0.9"]
- addresses: ["10.0.0.1"]
  conditions: {ready: true, serving: false}
ports: [{name: p, protocol: UDP, port: 5353}, {name: all}]
`,
			want: &discovery.Snapshot{
				Services: []*discovery.Service{{
					Namespace: "default", Name: "s",
					Endpoints: []discovery.Endpoint{
						{Addresses: addrs("10.0.0.1"), Ready: true, Serving: false, Ports: []discovery.EndpointPort{{Name: "p", Protocol: discovery.UDP, Port: 5353}, {Name: "all", Protocol: discovery.TCP}}},
						{Addresses: addrs("10.0.0.9"), Ready: true, Serving: true, Ports: []discovery.EndpointPort{{Name: "p", Protocol: discovery.UDP, Port: 5353}, {Name: "all", Protocol: discovery.TCP}}},
						{Addresses: addrs("fd00::2"), Ready: false, Serving: true, Terminating: true, Ports: []discovery.EndpointPort{{Name: "p", Protocol: discovery.UDP, Port: 53}}},
						{Addresses: addrs("fd00::3"), Ready: false, Serving: false, Ports: []discovery.EndpointPort{{Name: "p", Protocol: discovery.UDP, Port: 53}}},
					},
				}},
				Nodes: []*discovery.Node{},
			},
		},
		{
			name: "unknown kinds, FQDN slices, orphan slices and empty documents ignored",
			in: `---
---
# only a comment
---
apiVersion: v1
kind: Pod
metadata: {name: p}
spec:
  containers: [{name: c, image: nginx, ports: [{containerPort: 80}]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec: {replicas: 3, ports: "not what a Service has"}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cm}
data: {a: b}
---
apiVersion: v1
kind: Endpoints
metadata: {name: s}
subsets: [{addresses: [{ip: 10.0.0.1}]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-fqdn, labels: {kubernetes.io/service-name: s}}
addressType: FQDN
endpoints: [{addresses: [example.com]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: gone-1, labels: {kubernetes.io/service-name: gone}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.1]}]
---
apiVersion: v1
kind: Service
metadata: {name: s}
---
`,
			want: &discovery.Snapshot{
				Services: []*discovery.Service{{Namespace: "default", Name: "s"}},
				Nodes:    []*discovery.Node{},
			},
		},
		{
			name: "empty file",
			in:   "",
			want: &discovery.Snapshot{Services: []*discovery.Service{}, Nodes: []*discovery.Node{}},
		},
		{
			name: "empty List",
			in:   "apiVersion: v1\nkind: List\nitems: []\n",
			want: &discovery.Snapshot{Services: []*discovery.Service{}, Nodes: []*discovery.Node{}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse([]byte(tc.in), "test.yaml")
			if err != nil {
				t.Fatalf("Parse(): %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("Parse() mismatch\n got: %s\nwant: %s", dump(got), dump(tc.want))
			}
		})
	}
}

func dump(s *discovery.Snapshot) string {
	var b strings.Builder
	for _, svc := range s.Services {
		fmt.Fprintf(&b, "\n  service %+v", *svc)
	}
	for _, n := range s.Nodes {
		fmt.Fprintf(&b, "\n  node %+v", *n)
	}
	return b.String()
}

func TestParseIgnoredCounted(t *testing.T) {
	in := "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\n---\n" +
		"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: x-1, labels: {kubernetes.io/service-name: x}}\naddressType: IPv4\n"
	r, err := parse([]byte(in), "t.yaml")
	if err != nil {
		t.Fatalf("parse(): %v", err)
	}
	if r.ignored["Pod"] != 2 {
		t.Errorf("ignored[Pod] = %d, want 2", r.ignored["Pod"])
	}
	if want := []string{"default/x-1 → default/x"}; !reflect.DeepEqual(r.orphans, want) {
		t.Errorf("orphans = %q, want %q", r.orphans, want)
	}
}

func TestParseExample(t *testing.T) {
	data, err := os.ReadFile("testdata/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	snap, err := Parse(data, "testdata/example.yaml")
	if err != nil {
		t.Fatalf("Parse(): %v", err)
	}
	var names []string
	for _, s := range snap.Services {
		names = append(names, s.Key())
	}
	if want := []string{"default/db", "default/echo", "default/web"}; !reflect.DeepEqual(names, want) {
		t.Fatalf("services = %v, want %v", names, want)
	}
	db, echo, web := snap.Services[0], snap.Services[1], snap.Services[2]

	tests := []struct {
		name    string
		svc     *discovery.Service
		port    int // index into svc.Ports
		wantEps int
		wantTCP bool
		wantPrt uint16 // target port on every endpoint
	}{
		{name: "web", svc: web, wantEps: 3, wantTCP: true, wantPrt: 8080},
		{name: "echo", svc: echo, wantEps: 1, wantPrt: 9000},
		{name: "db", svc: db, wantEps: 2, wantTCP: true, wantPrt: 5432},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if len(tc.svc.Endpoints) != tc.wantEps {
				t.Fatalf("%d endpoints, want %d", len(tc.svc.Endpoints), tc.wantEps)
			}
			if len(tc.svc.Ports) != 1 {
				t.Fatalf("%d ports, want 1", len(tc.svc.Ports))
			}
			sp := tc.svc.Ports[tc.port]
			if (sp.Protocol == discovery.TCP) != tc.wantTCP {
				t.Errorf("protocol = %s", sp.Protocol)
			}
			for i := range tc.svc.Endpoints {
				if got, ok := sp.TargetFor(&tc.svc.Endpoints[i]); !ok || got != tc.wantPrt {
					t.Errorf("endpoint %d: TargetFor = %d, %v; want %d", i, got, ok, tc.wantPrt)
				}
			}
		})
	}
	if web.Ports[0].Port != 80 || web.Ports[0].Name != "http" || web.Ports[0].TargetPortName != "http" {
		t.Errorf("web port = %+v, want http 80 → http", web.Ports[0])
	}
	if web.Endpoints[2].Ready || !web.Endpoints[0].Ready {
		t.Errorf("web readiness = %v %v %v, want true true false", web.Endpoints[0].Ready, web.Endpoints[1].Ready, web.Endpoints[2].Ready)
	}
	if echo.Ports[0].Protocol != discovery.UDP || echo.Ports[0].Port != 9000 {
		t.Errorf("echo port = %+v, want UDP 9000", echo.Ports[0])
	}
	if !db.Headless || db.Endpoints[0].Hostname != "db-0" {
		t.Errorf("db = headless %v, first hostname %q; want headless, db-0", db.Headless, db.Endpoints[0].Hostname)
	}
	if len(snap.Nodes) != 3 || snap.Nodes[0].Name != "cloud-1" {
		t.Errorf("nodes = %v, want cloud-1, edge-1, edge-2", snap.Nodes)
	}
}

// largeCatalog returns a file of services Services with endpoints endpoints in total.
func largeCatalog(services, endpoints int) []byte {
	var b strings.Builder
	per := endpoints / services
	for i := range services {
		fmt.Fprintf(&b, `---
apiVersion: v1
kind: Service
metadata:
  name: svc-%d
  namespace: ns-%d
spec:
  clusterIP: 10.96.%d.%d
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc-%d-abcde
  namespace: ns-%d
  labels:
    kubernetes.io/service-name: svc-%d
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
`, i, i%50, i/250, i%250+1, i, i%50, i)
		for j := range per {
			fmt.Fprintf(&b, "- addresses: [\"10.%d.%d.%d\"]\n  conditions: {ready: true}\n  nodeName: node-%d\n", i/250, i%250, j+1, j)
		}
	}
	return []byte(b.String())
}

func TestParseLarge(t *testing.T) {
	// The target: 10,000 services with 100,000 endpoints in a couple of seconds on a small machine.
	// The race detector slows parsing about tenfold, so under it the catalog is a tenth.
	services, endpoints := 10000, 100000
	if raceEnabled {
		services, endpoints = 1000, 10000
	}
	data := largeCatalog(services, endpoints)
	start := time.Now()
	snap, err := Parse(data, "large.yaml")
	d := time.Since(start)
	if err != nil {
		t.Fatalf("Parse(): %v", err)
	}
	t.Logf("parsed %d services, %d endpoints, %d bytes in %v", services, endpoints, len(data), d)
	if len(snap.Services) != services {
		t.Fatalf("%d services, want %d", len(snap.Services), services)
	}
	n := 0
	for _, s := range snap.Services {
		n += len(s.Endpoints)
	}
	if n != endpoints {
		t.Fatalf("%d endpoints, want %d", n, endpoints)
	}
	if d > 3*time.Second {
		t.Errorf("Parse took %v, want at most 3s", d)
	}
}

// BenchmarkParseLarge parses 10,000 services with 100,000 endpoints and reports, besides time and
// allocations, the heap the snapshot keeps per endpoint (run with -benchmem).
func BenchmarkParseLarge(b *testing.B) {
	const endpoints = 100000
	data := largeCatalog(10000, endpoints)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := Parse(data, "large.yaml"); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	before := heapAlloc()
	snap, err := Parse(data, "large.yaml")
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric((float64(heapAlloc())-float64(before))/endpoints, "heapB/endpoint")
	runtime.KeepAlive(snap)
	runtime.KeepAlive(data)
}

// heapAlloc returns the bytes of live heap objects after a full collection.
func heapAlloc() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}
