//go:build bench

package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The benchmark suite (`make bench`, scripts/bench.sh): it measures and prints, it does not judge
// speed. A measurement fails, and fails the run, only when its transfer fails. One run builds six
// topologies in turn and writes one report (table on stdout, JSON under bench/results/): single node
// and cross node below, the NAT lab (bench_nat_test.go), DNS against CoreDNS (bench_dns_test.go), 1%
// packet loss between two routers (bench_edgemesh_test.go) and memory and propagation at scale
// (bench_scale_test.go). docs/bench.md describes every measurement.
//
// single node ("foundation"), LAN 10.77.1.0/24:
//
//	client   10.77.1.10  runs the agent; iperf3 and benchtool clients
//	backend  10.77.1.11  iperf3 -s (:5201), benchtool echo (:7000)
//
// client → service IP → backend (through the agent's service netstack) against client → backend.
//
// cross node ("overlay"), LAN 10.77.2.0/24:
//
//	node1  10.77.2.1  agent; iperf3 -s and echo (references); wireguard-go wgref on 10.99.0.1
//	node2  10.77.2.2  agent; the clients;                      wireguard-go wgref on 10.99.0.2
//	pod1   10.244.1.10, behind node1 on a veth (node1 is 10.244.1.1): iperf3 -s and echo
//
// node2 → service IP → pod1 over the agents' WireGuard overlay against node2 → node1 over the LAN
// (plain veth and bridge), node2 → node1 over a bare wireguard-go pair configured with `wg` and
// node2 → pod1 through the EdgeMesh-style tunnel (bench_edgemesh_test.go).
//
// Environment: BENCH_RESULTS_DIR is where the JSON goes (default ../bench/results, i.e. the
// repository's bench/results); BENCH_OVERLAY_MTU, when set, is the cross-node agents' --mtu and the
// reference wireguard-go's MTU (for comparing MTUs; unset measures the product's default).
const (
	benchDuration = 10 * time.Second
	benchIperfIP  = "9.251.0.50"
	benchEchoIP   = "9.251.0.51"
	// benchIperfHostIP is crossnode's iperf service whose endpoint is node1 itself, not pod1.
	benchIperfHostIP = "9.251.0.52"
	benchIperf       = 5201
	benchEcho        = 7000
	// benchWGPort is the UDP port of the reference wireguard-go (the agents use 51820).
	benchWGPort = 51830
)

// bench is one run of the suite.
type bench struct {
	meshctl string
	tools   BenchBinaries
	report  *Report
	// overlayMTU is the agents' --mtu in the cross-node topology (and the reference wireguard-go's
	// MTU); empty for the product's default. From BENCH_OVERLAY_MTU.
	overlayMTU string
	// daemons are the processes of the current topology whose CPU use each measurement records.
	daemons []daemon
}

type daemon struct {
	name string
	proc *Proc
}

// cpuMeter samples the daemons' CPU time; the function it returns gives each one's use since, in
// percent of one CPU (a daemon that could not be read is left out).
func (b *bench) cpuMeter() func() map[string]float64 {
	start := time.Now()
	before := make(map[string]float64, len(b.daemons))
	for _, d := range b.daemons {
		if s, err := ProcCPUSeconds(d.proc.PID()); err == nil {
			before[d.name] = s
		}
	}
	return func() map[string]float64 {
		elapsed := time.Since(start).Seconds()
		use := make(map[string]float64, len(before))
		for _, d := range b.daemons {
			s, err := ProcCPUSeconds(d.proc.PID())
			if prev, ok := before[d.name]; ok && err == nil {
				use[d.name] = 100 * (s - prev) / elapsed
			}
		}
		return use
	}
}

// TestBench runs both topologies, prints the table and writes the report, also when a measurement
// failed (the failures are listed in both).
func TestBench(t *testing.T) {
	b := &bench{meshctl: needMeshctl(t), report: NewReport(), overlayMTU: os.Getenv("BENCH_OVERLAY_MTU")}
	if b.overlayMTU != "" {
		b.report.Settings = map[string]string{"BENCH_OVERLAY_MTU": b.overlayMTU}
	}
	var err error
	start := time.Now()
	if b.tools, err = BuildBenchBinaries(t.TempDir()); err != nil {
		t.Fatalf("build benchmark binaries: %v", err)
	}
	t.Logf("built benchtool, wireguard-go and edgemeshref in %v", time.Since(start).Round(time.Millisecond))

	t.Run("singlenode", b.singleNode)
	t.Run("crossnode", b.crossNode)
	t.Run("nat", b.natTraversal)
	t.Run("dns", b.dns)
	t.Run("loss", b.loss)
	t.Run("scale", b.scale)
	t.Run("load", b.load)

	b.report.Finish()
	b.report.WriteTable(os.Stdout)
	dir := os.Getenv("BENCH_RESULTS_DIR")
	if dir == "" {
		dir = filepath.Join("..", "bench", "results")
	}
	path, err := b.report.WriteFiles(dir)
	if err != nil {
		t.Fatalf("write results: %v", err)
	}
	fmt.Printf("results: %s (and latest.json)\n", path)
}

// benchCatalog is the two services of both topologies, with their one endpoint at ip on node.
func benchCatalog(ip, node string) []ServiceSpec {
	eps := []EndpointSpec{{IP: ip, Ready: true, Node: node}}
	return []ServiceSpec{
		// iperf3 opens one control and N data connections: all go to the one endpoint.
		{Name: "iperf", ClusterIP: benchIperfIP, Endpoints: eps,
			Ports: []PortSpec{{Name: "iperf", Port: benchIperf, TargetPort: benchIperf},
				// iperf3 -u: the control connection over TCP, the datagrams over UDP (crossUDP).
				{Name: "iperf-udp", Protocol: "UDP", Port: benchIperf, TargetPort: benchIperf}}},
		{Name: "echo", ClusterIP: benchEchoIP, Endpoints: eps,
			Ports: []PortSpec{{Name: "echo", Port: benchEcho, TargetPort: benchEcho}}},
	}
}

// benchNode is a Node object of the catalog: a mesh peer's key and WireGuard endpoints.
type benchNode struct {
	name, key string
	endpoints []string
}

func renderBenchNodes(nodes []benchNode) string {
	var b strings.Builder
	for _, n := range nodes {
		fmt.Fprintf(&b, "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: %s\n  annotations:\n", n.name)
		fmt.Fprintf(&b, "    edgewire.io/wireguard-public-key: %q\n", n.key)
		fmt.Fprintf(&b, "    edgewire.io/endpoints: %q\n", strings.Join(n.endpoints, ","))
	}
	return b.String()
}

// tuneNode lets a client open connections as fast as the benchmark asks: the connection-rate test
// makes tens of thousands of short connections, more than the default ephemeral range keeps out of
// TIME_WAIT. Applied to every node alike, references included.
func tuneNode(t *testing.T, n *Node) {
	t.Helper()
	n.MustExec(t, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65535")
}

// startServers runs iperf3 -s and benchtool echo in n and waits until both listen.
func (b *bench) startServers(t *testing.T, n *Node) {
	t.Helper()
	iperf := n.Start(t, "iperf3", "iperf3", "-s", "-p", strconv.Itoa(benchIperf), "--forceflush")
	echo := n.Start(t, "echo", b.tools.Benchtool, "echo", "--listen", ":"+strconv.Itoa(benchEcho))
	iperf.WaitLog(t, "Server listening", 10*time.Second)
	echo.WaitLog(t, "listening on", 10*time.Second)
}

// startAgent starts an agent in n with a UAPI socket name of the lab's own (the socket lives in the
// host's /var/run/wireguard, shared by every namespace) and waits until it serves both services.
// extra flags are appended.
func (b *bench) startAgent(t *testing.T, lab *Lab, n *Node, servicesFile, resolvConf string, extra ...string) *Agent {
	t.Helper()
	a := StartAgent(t, n, AgentOptions{
		Meshctl:      b.meshctl,
		ServicesFile: servicesFile,
		ResolvConf:   resolvConf,
		// The product's default: debug logging would cost the data path.
		LogLevel: "info",
		Extra:    append([]string{"--wg-interface", lab.Name(n.Role)}, extra...),
	})
	b.daemons = append(b.daemons, daemon{"agent-" + n.Role, a.Proc})
	took := a.WaitReady(t, 30*time.Second)
	Eventually(t, 10*time.Second, 50*time.Millisecond, "catalog loaded", func() error {
		rows := a.Services(t)
		for _, svc := range []string{"default/iperf", "default/echo"} {
			if rows[svc].Ready != 1 {
				return fmt.Errorf("%s: %+v", svc, rows[svc])
			}
		}
		return nil
	})
	t.Logf("agent in %s ready after %v", n.Role, took.Round(time.Millisecond))
	return a
}

// upstreamResolvConf writes a resolv.conf for the agents: nothing here resolves names outside the
// cluster domain, so it names an address on no network.
func upstreamResolvConf(t *testing.T, lab *Lab) string {
	t.Helper()
	p := filepath.Join(lab.Dir, "upstream-resolv.conf")
	if err := os.WriteFile(p, []byte("nameserver 192.0.2.53\n"), 0o644); err != nil {
		t.Fatalf("write %s: %v", p, err)
	}
	return p
}

func (b *bench) singleNode(t *testing.T) {
	b.daemons = nil
	lab := NewLab(t)
	lan := lab.LAN(t, "lan", netip.MustParsePrefix("10.77.1.0/24"))
	client, backend := lab.Node(t, "client"), lab.Node(t, "backend")
	lan.Attach(t, client, netip.MustParseAddr("10.77.1.10"))
	lan.Attach(t, backend, netip.MustParseAddr("10.77.1.11"))
	for _, n := range []*Node{client, backend} {
		tuneNode(t, n)
	}
	b.startServers(t, backend)
	services := filepath.Join(lab.Dir, "services.yaml")
	WriteFileAtomic(t, services, RenderServices(benchCatalog("10.77.1.11", "client")))
	b.startAgent(t, lab, client, services, upstreamResolvConf(t, lab))
	b.warmUp(t, client, net.JoinHostPort(benchEchoIP, strconv.Itoa(benchEcho)))

	const p = "single."
	direct, service := "10.77.1.11", benchIperfIP
	for _, streams := range []int{1, 4} {
		kind := streamsName(streams)
		b.tcp(t, p+kind+".direct", client, direct, streams)
		b.tcp(t, p+kind+".service", client, service, streams, p+kind+".direct")
	}
	direct, service = "10.77.1.11", benchEchoIP
	b.benchtool(t, "rr", p+"rr.direct", client, direct)
	b.benchtool(t, "rr", p+"rr.service", client, service, p+"rr.direct")
	b.benchtool(t, "connrate", p+"connrate.direct", client, direct)
	b.benchtool(t, "connrate", p+"connrate.service", client, service, p+"connrate.direct")
}

func (b *bench) crossNode(t *testing.T) {
	b.daemons = nil
	lab := NewLab(t)
	lan := lab.LAN(t, "lan", netip.MustParsePrefix("10.77.2.0/24"))
	node1, node2, pod := lab.Node(t, "node1"), lab.Node(t, "node2"), lab.Node(t, "pod1")
	lan.Attach(t, node1, netip.MustParseAddr("10.77.2.1"))
	lan.Attach(t, node2, netip.MustParseAddr("10.77.2.2"))
	lab.Link(t, node1, netip.MustParsePrefix("10.244.1.1/24"), pod, netip.MustParsePrefix("10.244.1.10/24"))
	pod.SetDefaultRoute(t, netip.MustParseAddr("10.244.1.1"))
	for _, n := range []*Node{node1, node2, pod} {
		tuneNode(t, n)
	}
	b.startServers(t, pod)
	b.startServers(t, node1)

	// Keys first, in the state directories the agents will use (StartAgent's layout), so that the
	// catalog can name both nodes' keys before either agent starts.
	var nodes []benchNode
	var node1Overlay string
	for _, n := range []*Node{node1, node2} {
		keys := Keygen(t, n, b.meshctl, filepath.Join(lab.Dir, n.Role+"-state"))
		if n == node1 {
			node1Overlay = keys.OverlayAddress
		}
		lanIP := strings.TrimPrefix(n.Role, "node")
		nodes = append(nodes, benchNode{name: n.Role, key: keys.WireGuardPublicKey, endpoints: []string{"10.77.2." + lanIP + ":51820"}})
	}
	services := filepath.Join(lab.Dir, "services.yaml")
	// iperf-node1: the iperf3 server on node1 itself (a host-network endpoint), so that the mesh is
	// also measured between the very namespaces the wireguard-go reference joins.
	catalog := append(benchCatalog("10.244.1.10", "node1"), ServiceSpec{Name: "iperf-node1", ClusterIP: benchIperfHostIP,
		Endpoints: []EndpointSpec{{IP: "10.77.2.1", Ready: true, Node: "node1"}},
		Ports:     []PortSpec{{Name: "iperf", Port: benchIperf, TargetPort: benchIperf}}})
	WriteFileAtomic(t, services, RenderServices(catalog)+renderBenchNodes(nodes))
	resolvConf := upstreamResolvConf(t, lab)
	var extra []string
	if b.overlayMTU != "" {
		extra = []string{"--mtu", b.overlayMTU}
	}
	for _, n := range []*Node{node1, node2} {
		a := b.startAgent(t, lab, n, services, resolvConf, extra...)
		if want := filepath.Join(lab.Dir, n.Role+"-state"); a.StateDir != want {
			t.Fatalf("agent state directory is %s, keys were made in %s", a.StateDir, want)
		}
	}
	start := time.Now()
	b.warmUp(t, node2, net.JoinHostPort(benchEchoIP, strconv.Itoa(benchEcho)))
	t.Logf("first round trip through the overlay after %v", time.Since(start).Round(time.Millisecond))

	b.wireguardGo(t, lab, node1, node2, "10.77.2.1", "10.77.2.2")
	b.warmUp(t, node2, net.JoinHostPort("10.99.0.1", strconv.Itoa(benchEcho)))
	edgemesh := b.edgemeshRef(t, lab, node1, node2, "10.77.2.1", "10.244.1.10")

	const p = "cross."
	targets := []struct{ name, iperf, echo string }{
		{"veth", "10.77.2.1", "10.77.2.1"},
		{"wireguard-go", "10.99.0.1", "10.99.0.1"},
		{"edgemesh", edgemesh, edgemesh},
		{"mesh", benchIperfIP, benchEchoIP},
		// The mesh's floor: node2 to node1's overlay address through both agents, wireguard-go and
		// the Bind only (no service netstack, no forward listener). The service path costs what
		// "mesh" falls short of it.
		{"mesh-overlay", node1Overlay, node1Overlay},
	}
	refs := func(kind, name string) []string {
		switch name {
		case "wireguard-go", "edgemesh":
			return []string{p + kind + ".veth"}
		case "mesh":
			return []string{p + kind + ".wireguard-go", p + kind + ".edgemesh", p + kind + ".veth"}
		case "mesh-overlay":
			return []string{p + kind + ".wireguard-go", p + kind + ".edgemesh", p + kind + ".mesh"}
		}
		return nil
	}
	for _, streams := range []int{1, 4} {
		kind := streamsName(streams)
		for _, tg := range targets {
			b.tcp(t, p+kind+"."+tg.name, node2, tg.iperf, streams, refs(kind, tg.name)...)
		}
		b.tcp(t, p+kind+".mesh-hostnet", node2, benchIperfHostIP, streams, p+kind+".wireguard-go", p+kind+".mesh")
	}
	for _, mode := range []string{"rr", "connrate"} {
		for _, tg := range targets {
			b.benchtool(t, mode, p+mode+"."+tg.name, node2, tg.echo, refs(mode, tg.name)...)
		}
	}
	b.crossGoals(p)
	b.crossUDP(t, node2)
}

// wireguardGo sets up the raw wireguard-go reference: the binary built from the module the agent
// links, one instance in each of a and c (interfaces named after the lab, as their UAPI sockets
// share the host's /var/run/wireguard), configured with `wg set`, addresses 10.99.0.1 and .2, each
// the other's endpoint at its address aLAN or cLAN.
func (b *bench) wireguardGo(t *testing.T, lab *Lab, a, c *Node, aLAN, cLAN string) {
	t.Helper()
	type end struct {
		node       *Node
		ifName     string
		lan, inner string
		keyFile    string
		pub        string
	}
	ends := []*end{
		{node: a, ifName: "wg" + lab.ID + "ref1", lan: aLAN, inner: "10.99.0.1"},
		{node: c, ifName: "wg" + lab.ID + "ref2", lan: cLAN, inner: "10.99.0.2"},
	}
	for _, e := range ends {
		priv, err := exec.Command("wg", "genkey").Output()
		if err != nil {
			t.Fatalf("wg genkey: %v", err)
		}
		e.keyFile = filepath.Join(lab.Dir, e.ifName+".key")
		if err := os.WriteFile(e.keyFile, priv, 0o600); err != nil {
			t.Fatalf("write %s: %v", e.keyFile, err)
		}
		cmd := exec.Command("wg", "pubkey")
		cmd.Stdin = bytes.NewReader(priv)
		pub, err := cmd.Output()
		if err != nil {
			t.Fatalf("wg pubkey: %v", err)
		}
		e.pub = strings.TrimSpace(string(pub))
		p := e.node.Start(t, "wireguard-go", "env", "WG_PROCESS_FOREGROUND=1", b.tools.WireGuardGo, "-f", e.ifName)
		b.daemons = append(b.daemons, daemon{"wg-go-" + e.node.Role, p})
	}
	for i, e := range ends {
		peer := ends[1-i]
		Eventually(t, 10*time.Second, 50*time.Millisecond, "wireguard-go "+e.ifName+" up", func() error {
			out, err := e.node.Exec("wg", "show", e.ifName)
			if err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
		e.node.MustExec(t, "wg", "set", e.ifName, "listen-port", strconv.Itoa(benchWGPort),
			"private-key", e.keyFile, "peer", peer.pub,
			"endpoint", net.JoinHostPort(peer.lan, strconv.Itoa(benchWGPort)),
			"allowed-ips", peer.inner+"/32")
		e.node.MustExec(t, "ip", "addr", "add", e.inner+"/24", "dev", e.ifName)
		if b.overlayMTU != "" {
			e.node.MustExec(t, "ip", "link", "set", e.ifName, "mtu", b.overlayMTU)
		}
		e.node.MustExec(t, "ip", "link", "set", e.ifName, "up")
	}
}

func streamsName(n int) string {
	if n == 1 {
		return "tcp-1stream"
	}
	return fmt.Sprintf("tcp-%dstreams", n)
}

// warmUp waits until a short request/response run against target succeeds from n: the path is up
// (and a WireGuard handshake done) before anything is timed.
func (b *bench) warmUp(t *testing.T, n *Node, target string) {
	t.Helper()
	Eventually(t, 30*time.Second, 200*time.Millisecond, "round trip to "+target+" from "+n.Role, func() error {
		out, err := n.ExecTimeout(10*time.Second, b.tools.Benchtool, "rr", "--target", target, "--duration", "200ms")
		if err != nil {
			return fmt.Errorf("%v: %s", err, strings.TrimSpace(out))
		}
		return nil
	})
}

// tcp measures TCP throughput with iperf3 from client to host:5201 with streams parallel streams
// (as the server received it) and records it as name, compared with refs.
func (b *bench) tcp(t *testing.T, name string, client *Node, host string, streams int, refs ...string) {
	t.Run(name, func(t *testing.T) {
		args := []string{"iperf3", "-c", host, "-p", strconv.Itoa(benchIperf), "-t", strconv.Itoa(int(benchDuration.Seconds())),
			"-P", strconv.Itoa(streams), "-J", "--connect-timeout", "5000"}
		var s IperfSummary
		var err error
		cpu := b.cpuMeter()
		for attempt := 1; ; attempt++ {
			var out string
			out, err = client.ExecTimeout(benchDuration+30*time.Second, args...)
			s, err = parseIperfOutput(out, err)
			// The server takes a moment after one test before it accepts the next.
			if err == nil || attempt == 3 || !strings.Contains(err.Error(), "busy") {
				break
			}
			time.Sleep(time.Second)
		}
		if err != nil {
			b.report.Fail(name, err)
			t.Fatalf("iperf3 to %s: %v", host, err)
		}
		m := &Measurement{Name: name, Value: s.ReceivedBps / 1e9, Unit: "Gbit/s", Raw: s, CPU: cpu()}
		b.report.Add(m, refs...)
		t.Logf("%.3f Gbit/s (%d streams, %d retransmits, client CPU %.0f%%, server CPU %.0f%%; daemons: %s)",
			s.ReceivedBps/1e9, s.Streams, s.Retransmits, s.HostCPU, s.RemoteCPU, formatCPU(m.CPU))
	})
}

// benchtool runs `benchtool mode` (rr or connrate) from client to host:7000 for benchDuration and
// records its rate as name and its latency percentiles as name.p50 and name.p99, compared with the
// same measurements of refs.
func (b *bench) benchtool(t *testing.T, mode, name string, client *Node, host string, refs ...string) {
	t.Run(name, func(t *testing.T) {
		target := net.JoinHostPort(host, strconv.Itoa(benchEcho))
		cpu := b.cpuMeter()
		out, err := client.ExecTimeout(benchDuration+30*time.Second, b.tools.Benchtool, mode,
			"--target", target, "--duration", benchDuration.String())
		var r BenchtoolResult
		if err == nil {
			err = json.Unmarshal([]byte(lastLines(out, 1)), &r)
		}
		if err != nil {
			b.report.Fail(name, err)
			t.Fatalf("benchtool %s to %s: %v\n%s", mode, target, err, lastLines(out, 5))
		}
		unit := "req/s"
		if mode == "connrate" {
			unit = "conn/s"
		}
		suffixed := func(suffix string) []string {
			var rs []string
			for _, r := range refs {
				rs = append(rs, r+suffix)
			}
			return rs
		}
		m := &Measurement{Name: name, Value: r.PerSec, Unit: unit, Raw: r, CPU: cpu()}
		b.report.Add(m, refs...)
		b.report.Add(&Measurement{Name: name + ".p50", Value: r.P50Micro, Unit: "µs"}, suffixed(".p50")...)
		b.report.Add(&Measurement{Name: name + ".p99", Value: r.P99Micro, Unit: "µs"}, suffixed(".p99")...)
		t.Logf("%.0f %s, p50 %.0f µs, p99 %.0f µs, %d errors; daemons: %s", r.PerSec, unit, r.P50Micro, r.P99Micro, r.Errors, formatCPU(m.CPU))
		if r.Errors > 0 {
			b.report.Fail(name, fmt.Errorf("%d of %d connections failed", r.Errors, r.Errors+r.Count))
			t.Errorf("%d of %d connections failed", r.Errors, r.Errors+r.Count)
		}
	})
}
