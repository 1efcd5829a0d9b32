package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The single-node topology: one LAN (10.77.1.0/24, a bridge in its own namespace) with
//
//	client   10.77.1.10  runs the agent; its resolv.conf points at the DNS IP
//	b1..b3   10.77.1.11-13  testserver http on :8080, :8081, :8082 and udpecho on :9000
//	upstream 10.77.1.53  testserver dns: the agent's upstream resolver (www.example.test)
//
// Backends are reached from the client by plain routing (same subnet).
const (
	dnsIP       = "169.254.96.16"
	serviceCIDR = "9.251.0.0/16"
	upstreamIP  = "10.77.1.53"
	// upstreamName is only known to the upstream resolver.
	upstreamName = "www.example.test"
	upstreamAddr = "10.77.9.9"
)

// Service IPs of the catalog (all inside serviceCIDR); "derived" and "headless" have none.
const (
	webIP     = "9.251.0.10"
	hashIP    = "9.251.0.11"
	stickyIP  = "9.251.0.12"
	echoIP    = "9.251.0.20"
	fragileIP = "9.251.0.30"
	shrinkIP  = "9.251.0.31"
)

// bigHeadless is the number of endpoints of the headless service "bighead" (10.77.2.1 on).
const bigHeadless = 100

func manyEndpoints(n int) []EndpointSpec {
	eps := make([]EndpointSpec, n)
	for i := range eps {
		eps[i] = EndpointSpec{IP: fmt.Sprintf("10.77.2.%d", i+1), Ready: true, Node: "client"}
	}
	return eps
}

type backend struct {
	name string
	ip   string
	node *Node
	// procs by role: "http" (:8080), "fragile" (:8081), "shrink" (:8082), "udpecho" (:9000).
	procs map[string]*Proc
}

type singleNode struct {
	lab          *Lab
	client       *Node
	app          *Node // a "pod" behind client, routed through it: its traffic is forwarded to mesh0
	backends     []*backend
	agent        *Agent
	servicesPath string
	specs        []ServiceSpec // what servicesPath holds (the last good catalog)
}

// endpoints returns ready endpoints on all backends (on the client node: single-node data plane).
func (s *singleNode) endpoints(names ...string) []EndpointSpec {
	var eps []EndpointSpec
	for _, b := range s.backends {
		for _, n := range names {
			if b.name == n {
				eps = append(eps, EndpointSpec{IP: b.ip, Ready: true, Node: "client"})
			}
		}
	}
	return eps
}

func (s *singleNode) catalog() []ServiceSpec {
	all := []string{"b1", "b2", "b3"}
	httpPort := func(target int) []PortSpec {
		return []PortSpec{{Name: "http", Port: 80, TargetPort: target}}
	}
	headless := s.endpoints("b1", "b2", "b3")
	headless[2].Ready = false
	return []ServiceSpec{
		{Name: "web", ClusterIP: webIP, Ports: httpPort(8080), Endpoints: s.endpoints(all...)},
		{Name: "web-hash", ClusterIP: hashIP, Ports: httpPort(8080), Endpoints: s.endpoints(all...),
			Annotations: map[string]string{"edgewire.io/lb-policy": "source-hash"}},
		{Name: "web-sticky", ClusterIP: stickyIP, Ports: httpPort(8080), Endpoints: s.endpoints(all...),
			AffinitySeconds: 300},
		{Name: "echo", ClusterIP: echoIP, Endpoints: s.endpoints(all...),
			Ports: []PortSpec{{Name: "echo", Protocol: "UDP", Port: 9000, TargetPort: 9000}}},
		{Name: "fragile", ClusterIP: fragileIP, Ports: httpPort(8081), Endpoints: s.endpoints(all...)},
		{Name: "shrink", ClusterIP: shrinkIP, Ports: httpPort(8082), Endpoints: s.endpoints(all...)},
		{Name: "headless", ClusterIP: "None", Ports: httpPort(8080), Endpoints: headless},
		{Name: "derived", Ports: httpPort(8080), Endpoints: s.endpoints("b1")},
		// Too many addresses for one UDP answer: DNS must truncate and dig retry over TCP.
		{Name: "bighead", ClusterIP: "None", Ports: httpPort(8080), Endpoints: manyEndpoints(bigHeadless)},
	}
}

// writeCatalog replaces the services file with specs and remembers them as the good catalog.
func (s *singleNode) writeCatalog(t testing.TB, specs []ServiceSpec) {
	t.Helper()
	WriteFileAtomic(t, s.servicesPath, RenderServices(specs))
	s.specs = specs
}

func newSingleNode(t *testing.T) *singleNode {
	t.Helper()
	meshctl := needMeshctl(t)
	start := time.Now()
	lab := NewLab(t)
	s := &singleNode{lab: lab, servicesPath: filepath.Join(lab.Dir, "services.yaml")}

	lan := lab.LAN(t, "lan", netip.MustParsePrefix("10.77.1.0/24"))
	s.client = lab.Node(t, "client")
	lan.Attach(t, s.client, netip.MustParseAddr("10.77.1.10"))
	// A second client address, for policies keyed by the client IP.
	s.client.MustExec(t, "ip", "addr", "add", "10.77.1.20/24", "dev", "eth0")
	s.client.SetResolvConf(t, netip.MustParseAddr(dnsIP))
	// An application pod on the node (a veth, a subnet of its own, the node as its gateway), as on a
	// Kubernetes node: its flows to service IPs are forwarded by the node's kernel to mesh0.
	s.app = lab.Node(t, "app")
	lab.Link(t, s.client, netip.MustParsePrefix("10.88.0.1/24"), s.app, netip.MustParsePrefix("10.88.0.10/24"))
	s.app.SetDefaultRoute(t, netip.MustParseAddr("10.88.0.1"))
	s.client.MustExec(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")

	for i, name := range []string{"b1", "b2", "b3"} {
		b := &backend{name: name, ip: fmt.Sprintf("10.77.1.%d", 11+i), node: lab.Node(t, name), procs: map[string]*Proc{}}
		lan.Attach(t, b.node, netip.MustParseAddr(b.ip))
		for role, port := range map[string]string{"http": "8080", "fragile": "8081", "shrink": "8082"} {
			b.procs[role] = b.node.Start(t, role, bins.Testserver, "http", "--listen", ":"+port, "--name", name)
		}
		b.procs["udpecho"] = b.node.Start(t, "udpecho", bins.Testserver, "udpecho", "--listen", ":9000", "--name", name)
		s.backends = append(s.backends, b)
	}

	upstream := lab.Node(t, "upstream")
	lan.Attach(t, upstream, netip.MustParseAddr(upstreamIP))
	dnsProc := upstream.Start(t, "dns", bins.Testserver, "dns", "--listen", upstreamIP+":53",
		"--record", upstreamName+"="+upstreamAddr)
	for _, b := range s.backends {
		for _, p := range b.procs {
			p.WaitLog(t, "listening on", 10*time.Second)
		}
	}
	dnsProc.WaitLog(t, "listening on", 10*time.Second)

	resolvConf := filepath.Join(lab.Dir, "upstream-resolv.conf")
	if err := os.WriteFile(resolvConf, []byte("nameserver "+upstreamIP+"\n"), 0o644); err != nil {
		t.Fatalf("write %s: %v", resolvConf, err)
	}
	s.writeCatalog(t, s.catalog())
	t.Logf("topology built in %v", time.Since(start).Round(time.Millisecond))

	s.agent = StartAgent(t, s.client, AgentOptions{
		Meshctl:      meshctl,
		ServicesFile: s.servicesPath,
		ResolvConf:   resolvConf,
	})
	return s
}

// TestSingleNode runs the single-node data-plane scenarios over one shared topology. The subtests
// run in order; the destructive ones (a backend killed, endpoints removed, bad files, SIGTERM) come
// last and each uses a service of its own.
func TestSingleNode(t *testing.T) {
	s := newSingleNode(t)
	if !t.Run("ready", s.testReady) {
		t.FailNow()
	}
	t.Run("http", s.testHTTP)
	t.Run("udp", s.testUDP)
	t.Run("dns", s.testDNS)
	t.Run("meshctl", s.testMeshctl)
	t.Run("failover", s.testFailover)
	t.Run("catalog", s.testCatalog)
	t.Run("shutdown", s.testShutdown)
}

func (s *singleNode) testReady(t *testing.T) {
	took := s.agent.WaitReady(t, 30*time.Second)
	t.Logf("agent ready (meshctl status --json succeeded) after %v", took.Round(time.Millisecond))
	for _, dst := range []string{webIP, dnsIP} {
		out := s.client.MustExec(t, "ip", "route", "get", dst)
		if !strings.Contains(out, "dev mesh0") {
			t.Errorf("route to %s does not go through mesh0: %s", dst, out)
		}
	}
	// The catalog is loaded when web has its three endpoints.
	took = Eventually(t, 10*time.Second, 50*time.Millisecond, "catalog loaded", func() error {
		if rows := s.agent.Services(t); rows["default/web"].Ready != 3 {
			return fmt.Errorf("default/web: %+v", rows["default/web"])
		}
		return nil
	})
	t.Logf("catalog loaded %v after readiness", took.Round(time.Millisecond))
}

// curlResult is one request of a curlMany run.
type curlResult struct {
	code    string
	backend string
}

// curlMany requests url n times from the client with a new connection each time (one curl
// process, URL globbing) and returns each request's status code and X-Backend header. Extra curl
// arguments (e.g. --interface) come before the URL.
func (s *singleNode) curlMany(t testing.TB, url string, n int, extra ...string) []curlResult {
	t.Helper()
	args := []string{"curl", "-sS", "-m", "5", "-H", "Connection: close",
		"-w", "\nRESULT %{http_code} %header{x-backend}\n"}
	args = append(args, extra...)
	args = append(args, fmt.Sprintf("%s?i=[1-%d]", url, n))
	out, err := s.client.ExecTimeout(2*time.Minute, args...)
	results := parseCurlResults(out)
	if len(results) != n {
		t.Fatalf("curl %s x%d: %d results (err %v)\n%s", url, n, len(results), err, lastLines(out, 20))
	}
	return results
}

func parseCurlResults(out string) []curlResult {
	var results []curlResult
	for line := range strings.Lines(out) {
		f := strings.Fields(strings.TrimPrefix(line, "RESULT "))
		if !strings.HasPrefix(line, "RESULT ") || len(f) == 0 {
			continue
		}
		r := curlResult{code: f[0]}
		if len(f) > 1 {
			r.backend = f[1]
		}
		results = append(results, r)
	}
	return results
}

// countBackends counts successful results per backend and returns the failures.
func countBackends(results []curlResult) (counts map[string]int, failed []curlResult) {
	counts = map[string]int{}
	for _, r := range results {
		if r.code != "200" || r.backend == "" {
			failed = append(failed, r)
			continue
		}
		counts[r.backend]++
	}
	return counts, failed
}
