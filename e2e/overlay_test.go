package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The overlay topology (seed scenario 4.1, nodes on one LAN): three nodes on one bridge
// (10.77.0.0/24), each running its own agent with its own keys, each with a "pod" namespace behind it
// on a subnet of its own that only that node can reach:
//
//	node1 10.77.0.1 ── pod1 10.244.1.10  testserver http :8080 (name podMarker), udpecho :9000
//	node2 10.77.0.2 ── pod2 10.244.2.10  (nothing: node2 is the client, resolv.conf → the DNS IP)
//	node3 10.77.0.3 ── pod3 10.244.3.10  testserver http :8080 (name pod3)
//
// No node routes another node's pod subnet and no node forwards IP: node2 reaches pod1 and pod3 only
// through its agent, WireGuard, and the forward listener of node1's or node3's agent.
const (
	// podMarker is pod1's name: its HTTP body and X-Backend header. It must never cross the LAN in
	// clear.
	podMarker = "pod1-MARKER-7f3a"
	meshWebIP = "9.251.1.10"
	meshUDPIP = "9.251.1.20"
	wgPort    = "51820"
	fwdPort   = "51821"
)

type meshNode struct {
	name    string // node name, also the namespace role: "node1"
	node    *Node
	lanIP   string
	pod     *Node
	podIP   string
	podLink string // node's interface to its pod
	wgIface string // --wg-interface: the UAPI socket's name, unique on the machine
	keys    NodeKeys
	agent   *Agent
}

type overlayLAN struct {
	lab          *Lab
	lan          *LAN
	nodes        []*meshNode // node1, node2, node3
	captures     []*Proc     // LAN bridge, node1's pod link
	lanPcap      string
	podPcap      string
	agentsStart  time.Time
	servicesPath string
	specs        []ServiceSpec // the catalog's services
	nodeSpecs    []NodeSpec    // the catalog's nodes
}

func (o *overlayLAN) n(i int) *meshNode { return o.nodes[i-1] }

func newOverlayLAN(t *testing.T) *overlayLAN {
	t.Helper()
	meshctl := needMeshctl(t)
	start := time.Now()
	lab := NewLab(t)
	o := &overlayLAN{lab: lab, servicesPath: filepath.Join(lab.Dir, "services.yaml")}
	o.lan = lab.LAN(t, "lan", netip.MustParsePrefix("10.77.0.0/24"))
	for i := 1; i <= 3; i++ {
		m := &meshNode{
			name:    fmt.Sprintf("node%d", i),
			lanIP:   fmt.Sprintf("10.77.0.%d", i),
			podIP:   fmt.Sprintf("10.244.%d.10", i),
			wgIface: fmt.Sprintf("ew%sn%d", lab.ID, i),
		}
		m.node = lab.Node(t, m.name)
		o.lan.Attach(t, m.node, netip.MustParseAddr(m.lanIP))
		m.pod = lab.Node(t, fmt.Sprintf("pod%d", i))
		gw := netip.MustParseAddr(fmt.Sprintf("10.244.%d.1", i))
		m.podLink, _ = lab.Link(t, m.node, netip.PrefixFrom(gw, 24), m.pod, netip.MustParsePrefix(m.podIP+"/24"))
		m.pod.SetDefaultRoute(t, gw)
		o.nodes = append(o.nodes, m)
	}
	o.n(2).node.SetResolvConf(t, netip.MustParseAddr(dnsIP))

	servers := []*Proc{
		o.n(1).pod.Start(t, "http", bins.Testserver, "http", "--listen", ":8080", "--name", podMarker),
		// Not in the first catalog: the "catalog reload" subtest adds it.
		o.n(1).pod.Start(t, "http-8081", bins.Testserver, "http", "--listen", ":8081", "--name", "pod1-8081"),
		o.n(1).pod.Start(t, "udpecho", bins.Testserver, "udpecho", "--listen", ":9000", "--name", "pod1"),
		o.n(3).pod.Start(t, "http", bins.Testserver, "http", "--listen", ":8080", "--name", "pod3"),
	}
	for _, p := range servers {
		p.WaitLog(t, "listening on", 10*time.Second)
	}

	// Keys first, with the CLI, so that the one services file every agent reads can carry them all.
	var nodes []NodeSpec
	for _, m := range o.nodes {
		m.keys = Keygen(t, m.node, meshctl, filepath.Join(lab.Dir, m.name+"-state"))
		nodes = append(nodes, NodeSpec{Name: m.name, PublicKey: m.keys.WireGuardPublicKey,
			Endpoints: []string{m.lanIP + ":" + wgPort}})
	}
	specs := []ServiceSpec{
		{Name: "web", ClusterIP: meshWebIP, Ports: []PortSpec{{Name: "http", Port: 80, TargetPort: 8080}},
			Endpoints: []EndpointSpec{
				{IP: o.n(1).podIP, Ready: true, Node: "node1"},
				{IP: o.n(3).podIP, Ready: true, Node: "node3"},
			}},
		{Name: "echo", ClusterIP: meshUDPIP,
			Ports:     []PortSpec{{Name: "echo", Protocol: "UDP", Port: 9000, TargetPort: 9000}},
			Endpoints: []EndpointSpec{{IP: o.n(1).podIP, Ready: true, Node: "node1"}}},
	}
	o.specs, o.nodeSpecs = specs, nodes
	WriteFileAtomic(t, o.servicesPath, RenderServices(specs)+RenderNodes(nodes))
	resolvConf := filepath.Join(lab.Dir, "upstream-resolv.conf")
	if err := os.WriteFile(resolvConf, []byte("nameserver 127.0.0.1\n"), 0o644); err != nil {
		t.Fatalf("write %s: %v", resolvConf, err)
	}

	// The captures run from before the first WireGuard packet until the "capture" subtest.
	lanCapture, lanPcap := CaptureAll(t, o.lan.Switch, "br0")
	podCapture, podPcap := CaptureAll(t, o.n(1).node, o.n(1).podLink)
	o.captures, o.lanPcap, o.podPcap = []*Proc{lanCapture, podCapture}, lanPcap, podPcap
	t.Logf("topology built in %v", time.Since(start).Round(time.Millisecond))

	o.agentsStart = time.Now()
	for _, m := range o.nodes {
		m.agent = StartAgent(t, m.node, AgentOptions{
			Meshctl:      meshctl,
			ServicesFile: o.servicesPath,
			ResolvConf:   resolvConf,
			Extra: []string{"--wg-interface", m.wgIface, "--listen-port", wgPort, "--forward-port", fwdPort,
				"--overlay-prefix", "fd65:7765:7769::/48"},
		})
		if want := filepath.Join(lab.Dir, m.name+"-state"); m.agent.StateDir != want {
			t.Fatalf("agent state dir %s, keys were made in %s", m.agent.StateDir, want)
		}
	}
	return o
}

// TestOverlayLAN runs the WireGuard overlay scenarios over three nodes of one LAN. The subtests run
// in order over one topology; stopping node3's agent comes last.
func TestOverlayLAN(t *testing.T) {
	o := newOverlayLAN(t)
	if !t.Run("ready", o.testReady) || !t.Run("handshakes", o.testHandshakes) {
		t.FailNow()
	}
	t.Run("pod subnets isolated", o.testIsolated)
	t.Run("http", o.testHTTP)
	t.Run("udp", o.testUDP)
	t.Run("wg show", o.testWGShow)
	t.Run("capture", o.testCapture)
	t.Run("forward refused", o.testForwardRefused)
	t.Run("large bodies", o.testLargeBodies)
	t.Run("catalog reload", o.testCatalogReload)
	t.Run("node3 stopped", o.testNode3Stopped)
	if t.Failed() {
		o.logAgentProblems(t)
	}
}

// logAgentProblems logs the warnings and errors of every agent, and the WireGuard socket's drops of
// datagrams it took for something else: the lab's log tails are mostly wireguard-go's debug lines.
func (o *overlayLAN) logAgentProblems(t *testing.T) {
	for _, m := range o.nodes {
		var lines []string
		for line := range strings.Lines(m.agent.Log()) {
			if strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") ||
				strings.Contains(line, "not WireGuard") || strings.Contains(line, "invalid") {
				lines = append(lines, strings.TrimSpace(line))
			}
		}
		t.Logf("%s agent: warnings, errors and dropped datagrams (%d lines, last 30):\n%s", m.name, len(lines),
			strings.Join(lines[max(0, len(lines)-30):], "\n"))
	}
}

func (o *overlayLAN) testReady(t *testing.T) {
	for i, m := range o.nodes {
		took := m.agent.WaitReady(t, 30*time.Second)
		st := m.agent.OverlayStatus(t)
		t.Logf("%s: agent ready %v after start (%v after the first agent started); overlay %s",
			m.name, took.Round(time.Millisecond), time.Since(o.agentsStart).Round(time.Millisecond), st.Overlay)
		if st.PublicKey != m.keys.WireGuardPublicKey {
			t.Errorf("%s: status publicKey %q, want the key keygen made %q", m.name, st.PublicKey, m.keys.WireGuardPublicKey)
		}
		if st.Overlay != m.keys.OverlayAddress {
			t.Errorf("%s: status overlay %q, want %q (keygen)", m.name, st.Overlay, m.keys.OverlayAddress)
		}
		if strconv.Itoa(st.ListenPort) != wgPort {
			t.Errorf("%s: listen port %d, want %s", m.name, st.ListenPort, wgPort)
		}
		out := m.node.MustExec(t, "ip", "-6", "addr", "show", "dev", "mesh0")
		if !strings.Contains(out, m.keys.OverlayAddress+"/") {
			t.Errorf("%s: mesh0 lacks the overlay address %s:\n%s", m.name, m.keys.OverlayAddress, out)
		}
		other := o.nodes[(i+1)%len(o.nodes)].keys.OverlayAddress
		if out := m.node.MustExec(t, "ip", "-6", "route", "get", other); !strings.Contains(out, "dev mesh0") {
			t.Errorf("%s: route to another node's overlay address %s is not via mesh0: %s", m.name, other, out)
		}
	}
}

// testHandshakes waits until every agent has a handshake with both of its peers. Peers get a
// persistent keepalive, so handshakes need no application traffic.
func (o *overlayLAN) testHandshakes(t *testing.T) {
	var first time.Duration
	Eventually(t, 30*time.Second, 50*time.Millisecond, "every agent has a handshake with both peers", func() error {
		var missing []string
		for _, m := range o.nodes {
			st := m.agent.OverlayStatus(t)
			if len(st.Peers) != 2 {
				missing = append(missing, fmt.Sprintf("%s has %d peers, want 2", m.name, len(st.Peers)))
				continue
			}
			for _, p := range st.Peers {
				if p.LatestHandshake.IsZero() {
					missing = append(missing, m.name+"→"+p.Node)
				} else if first == 0 {
					first = time.Since(o.agentsStart)
				}
			}
		}
		if len(missing) > 0 {
			return fmt.Errorf("no handshake yet: %s", strings.Join(missing, ", "))
		}
		return nil
	})
	t.Logf("first handshake seen %v after the agents were started; all 6 peer handshakes %v after (polled every 50 ms)",
		first.Round(time.Millisecond), time.Since(o.agentsStart).Round(time.Millisecond))
	for _, m := range o.nodes {
		st := m.agent.OverlayStatus(t)
		for _, p := range st.Peers {
			peer := o.byName(p.Node)
			if peer == nil {
				t.Errorf("%s: peer %s (%s) is not a node of the catalog", m.name, p.Node, p.PublicKey)
				continue
			}
			if p.PublicKey != peer.keys.WireGuardPublicKey || p.Endpoint != peer.lanIP+":"+wgPort {
				t.Errorf("%s: peer %s is %s at %s, want %s at %s:%s", m.name, p.Node, p.PublicKey, p.Endpoint,
					peer.keys.WireGuardPublicKey, peer.lanIP, wgPort)
			}
		}
	}
}

func (o *overlayLAN) byName(name string) *meshNode {
	for _, m := range o.nodes {
		if m.name == name {
			return m
		}
	}
	return nil
}

// testIsolated proves that the overlay is the only way between nodes and other nodes' pods.
func (o *overlayLAN) testIsolated(t *testing.T) {
	for _, m := range o.nodes {
		for _, other := range o.nodes {
			if other == m {
				continue
			}
			if out, err := m.node.Exec("ip", "route", "get", other.podIP); err == nil {
				t.Errorf("%s has a route to %s's pod %s: %s", m.name, other.name, other.podIP, out)
			}
		}
		if out, err := m.node.Exec("sysctl", "-n", "net.ipv4.ip_forward"); err != nil || strings.TrimSpace(out) != "0" {
			t.Errorf("%s: net.ipv4.ip_forward = %q (%v), want 0", m.name, out, err)
		}
	}
	if out, err := o.n(2).node.Exec("curl", "-sS", "-m", "3", "http://"+o.n(1).podIP+":8080/"); err == nil {
		t.Errorf("node2 reached pod1 directly, without the overlay: %s", out)
	}
	// The control: a node reaches its own pod directly.
	if out := o.n(1).node.MustExec(t, "curl", "-sS", "-m", "3", "http://"+o.n(1).podIP+":8080/"); out != podMarker+"\n" {
		t.Errorf("node1 → its own pod1: %q, want %q", out, podMarker+"\n")
	}
}

func (o *overlayLAN) testHTTP(t *testing.T) {
	client := o.n(2).node
	t.Run("by name", func(t *testing.T) {
		start := time.Now()
		out := client.MustExec(t, "curl", "-sS", "-m", "5", "-D", "-", "http://web.default.svc.cluster.local/")
		t.Logf("first request through the overlay took %v", time.Since(start).Round(time.Millisecond))
		if !strings.Contains(out, "X-Backend: pod") {
			t.Errorf("no X-Backend header from a pod in\n%s", out)
		}
	})

	t.Run("round robin across nodes", func(t *testing.T) {
		const n = 100
		start := time.Now()
		rs := curlMesh(t, client, "http://web.default.svc.cluster.local/", n)
		took := time.Since(start)
		counts := map[string]int{}
		for i, r := range rs {
			if !r.ok() {
				t.Errorf("request %d failed: code %s backend %q", i, r.code, r.backend)
				continue
			}
			counts[r.backend]++
		}
		for _, b := range []string{podMarker, "pod3"} {
			if c := counts[b]; c < n*45/100 || c > n*55/100 {
				t.Errorf("%s answered %d of %d requests, want about half (all: %v)", b, c, n, counts)
			}
		}
		t.Logf("%d requests by name (new connection each) in %v: %v", n, took.Round(time.Millisecond), counts)
	})

	t.Run("latency", func(t *testing.T) {
		// By service IP, so that the agent's DNS is not in the time; each request a new connection.
		const n = 40
		rs := curlMesh(t, client, "http://"+meshWebIP+"/", n)
		per := map[string][]time.Duration{}
		for i, r := range rs {
			if !r.ok() {
				t.Errorf("request %d failed: code %s backend %q", i, r.code, r.backend)
				continue
			}
			per[r.backend] = append(per[r.backend], r.took)
		}
		direct := curlMesh(t, o.n(1).node, "http://"+o.n(1).podIP+":8080/", n)
		var base []time.Duration
		for _, r := range direct {
			base = append(base, r.took)
		}
		t.Logf("request latency (curl time_total, median of %d, new connection each): node2→overlay→pod1 %v, "+
			"node2→overlay→pod3 %v; baseline node1→pod1 directly %v",
			n, Median(per[podMarker]), Median(per["pod3"]), Median(base))
	})

	t.Run("requests sent with the forward header", func(t *testing.T) {
		// curl sends its request as soon as it is connected, while node2's agent waits for the
		// other agent's status: the request goes early, behind the forward header.
		var st struct {
			Forward struct {
				SpareDials uint64 `json:"spareDials"`
				FreshDials uint64 `json:"freshDials"`
				EarlyDials uint64 `json:"earlyDials"`
			} `json:"forward"`
		}
		o.n(2).agent.CtlJSON(t, &st, "status")
		f := st.Forward
		if dials := f.SpareDials + f.FreshDials; dials == 0 || f.EarlyDials < dials/2 {
			t.Errorf("meshctl status on node2: %d of %d forward dials sent early data, want most", f.EarlyDials, dials)
		}
		t.Logf("node2: %d forward dials (%d on a spare), %d with early data", f.SpareDials+f.FreshDials, f.SpareDials, f.EarlyDials)
	})
}

func (o *overlayLAN) testUDP(t *testing.T) {
	tests := []struct {
		name   string
		server string
		msg    string
		count  int
	}{
		{"small datagrams by name", "echo.default.svc.cluster.local:9000", "overlay-%d", 20},
		{"large datagrams by IP", meshUDPIP + ":9000", strings.Repeat("y", 1300) + "-%d", 5},
		// 1360 bytes + forward header (12) + UDP/IPv6 (48) = 1420, mesh0's MTU: no fragment anywhere.
		{"datagrams filling the overlay MTU", meshUDPIP + ":9000", strings.Repeat("z", 1358) + "-%d", 5},
		{"one-byte datagrams", meshUDPIP + ":9000", "%d", 10},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// --burst sends every datagram before reading: merged or split datagrams would show up as
			// fewer, longer or shorter replies.
			start := time.Now()
			out, err := o.n(2).node.Exec(bins.Testserver, "udpclient", "--server", tc.server,
				"--msg", tc.msg, "--count", fmt.Sprint(tc.count), "--burst", "--timeout", "3s")
			if err != nil {
				// The error repeats the command line, --msg and all: say it shorter.
				t.Fatalf("udpclient --server %s --msg %q --count %d: %v\n%s", tc.server, shorten(tc.msg), tc.count,
					errors.Unwrap(err), lastLines(out, 10))
			}
			lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
			if len(lines) != tc.count {
				t.Fatalf("got %d replies, want %d:\n%s", len(lines), tc.count, lastLines(out, 10))
			}
			for i, line := range lines {
				want := "pod1:" + strings.ReplaceAll(tc.msg, "%d", fmt.Sprint(i))
				if line != want {
					t.Errorf("reply %d: %q, want %q (datagram boundaries lost or reordered)", i, shorten(line), shorten(want))
				}
			}
			t.Logf("%d datagrams echoed across nodes in %v", tc.count, time.Since(start).Round(time.Millisecond))
		})
	}
}

func (o *overlayLAN) testWGShow(t *testing.T) {
	m := o.n(2)
	peers := []*meshNode{o.n(1), o.n(3)}
	t.Run("wg show", func(t *testing.T) {
		out := m.node.MustExec(t, "wg", "show", m.wgIface)
		blocks := wgPeerBlocks(out)
		for _, p := range peers {
			b, ok := blocks[p.keys.WireGuardPublicKey]
			if !ok {
				t.Errorf("wg show %s: no peer %s (%s):\n%s", m.wgIface, p.keys.WireGuardPublicKey, p.name, out)
				continue
			}
			for _, want := range []string{"endpoint: " + p.lanIP + ":" + wgPort, "allowed ips: " + p.keys.OverlayAddress + "/128", "latest handshake:"} {
				if !strings.Contains(b, want) {
					t.Errorf("wg show %s: peer %s lacks %q:\n%s", m.wgIface, p.name, want, b)
				}
			}
		}
		if !strings.Contains(out, "public key: "+m.keys.WireGuardPublicKey) || !strings.Contains(out, "listening port: "+wgPort) {
			t.Errorf("wg show %s: not node2's key and port:\n%s", m.wgIface, out)
		}
	})
	t.Run("wg showconf", func(t *testing.T) {
		out := m.node.MustExec(t, "wg", "showconf", m.wgIface)
		for _, p := range peers {
			if !strings.Contains(out, "PublicKey = "+p.keys.WireGuardPublicKey) {
				t.Errorf("wg showconf %s: no [Peer] for %s", m.wgIface, p.name)
			}
		}
	})
	t.Run("meshctl wg show", func(t *testing.T) {
		out, err := m.agent.Ctl("wg", "show")
		if err != nil {
			t.Fatalf("meshctl wg show: %v\n%s", err, out)
		}
		for _, p := range peers {
			if want := fmt.Sprintf("peer: %s (%s)", p.keys.WireGuardPublicKey, p.name); !strings.Contains(out, want) {
				t.Errorf("meshctl wg show: no %q:\n%s", want, out)
			}
		}
		if n := strings.Count(out, "latest handshake:"); n != 2 {
			t.Errorf("meshctl wg show: %d peers with a latest handshake, want 2:\n%s", n, out)
		}
	})
}

// testCapture stops the captures started before the agents and checks that the LAN carried only
// WireGuard between the nodes, and never pod1's marker, while the link behind node1 carried it in
// clear (which proves the capture and the search work).
func (o *overlayLAN) testCapture(t *testing.T) {
	for _, p := range o.captures {
		if err := p.Stop(5 * time.Second); err != nil && !p.Exited() {
			t.Fatalf("stop %s: %v", p.Name, err)
		}
	}
	lanPcap, podPcap, reader := o.lanPcap, o.podPcap, o.lan.Switch

	out := reader.MustExec(t, "tcpdump", "-n", "-r", lanPcap)
	s := ClassifyPcap(out, wgPort)
	t.Logf("LAN capture: %d WireGuard datagrams (%s), %d ICMP port unreachable for the WireGuard port, "+
		"%d ARP/IGMP/ICMPv6 control packets, %d other", s.Total(), s.Pairs(), s.PortUnreachable, s.Control, len(s.Other))
	if len(s.Other) > 0 {
		t.Errorf("the LAN carried %d packets that are not WireGuard between the nodes, e.g.:\n%s",
			len(s.Other), strings.Join(s.Other[:min(len(s.Other), 15)], "\n"))
	}
	// 141 HTTP requests (a connection each) and 40 UDP datagrams crossed: far more than 200 WireGuard datagrams.
	if s.Total() < 200 {
		t.Errorf("the LAN capture saw only %d WireGuard datagrams: did it capture anything?", s.Total())
	}
	for _, pair := range []string{"10.77.0.2 > 10.77.0.1", "10.77.0.1 > 10.77.0.2", "10.77.0.2 > 10.77.0.3", "10.77.0.3 > 10.77.0.2"} {
		if s.UDP[pair] == 0 {
			t.Errorf("no WireGuard datagram %s in the LAN capture", pair)
		}
	}
	for _, args := range [][]string{{"-A"}, {"-X"}} {
		dump := reader.MustExec(t, append([]string{"tcpdump", "-n", "-r", lanPcap}, args...)...)
		if i := strings.Index(dump, "MARKER-7f3a"); i >= 0 {
			t.Errorf("pod1's marker crossed the LAN in clear (tcpdump %s):\n%s", args[0], dump[max(0, i-300):min(len(dump), i+100)])
		}
	}
	pod := reader.MustExec(t, "tcpdump", "-n", "-A", "-r", podPcap)
	if c := strings.Count(pod, podMarker); c < 50 {
		t.Errorf("the capture on node1's link to pod1 shows the marker %d times, want the clear HTTP answers (≥50)", c)
	}
}

// testForwardRefused speaks the forward protocol from node2 to node1's listener over WireGuard.
func (o *overlayLAN) testForwardRefused(t *testing.T) {
	probe := BuildFwdProbe(t, o.lab.Dir)
	node1 := o.n(1)
	tests := []struct {
		name   string
		node   string // address of the forward listener asked
		target string
		exit   int    // fwdprobe's exit status: 0 accepted, 3 refused, 1 other error
		want   string // in fwdprobe's output
	}{
		{"web endpoint on node1 accepted", node1.keys.OverlayAddress, node1.podIP + ":8080", 0, "HTTP/1.0 200 OK"},
		{"node1's own LAN address refused", node1.keys.OverlayAddress, node1.lanIP + ":22", 3, "forward target not allowed"},
		{"unlisted port of pod1 refused", node1.keys.OverlayAddress, node1.podIP + ":8081", 3, "forward target not allowed"},
		{"node3's endpoint asked of node1 refused", node1.keys.OverlayAddress, o.n(3).podIP + ":8080", 3, "forward target not allowed"},
		{"node1's loopback refused", node1.keys.OverlayAddress, "127.0.0.1:" + fwdPort, 3, "forward target not allowed"},
		// The listener is bound to the overlay address on mesh0: nothing listens on the LAN.
		{"forward port closed on the LAN", node1.lanIP, node1.podIP + ":8080", 1, "connection refused"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, err := o.n(2).node.Exec(probe, "--node", tc.node, "--port", fwdPort, "--target", tc.target, "--timeout", "5s")
			exit := 0
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				exit = ee.ExitCode()
			} else if err != nil {
				t.Fatalf("fwdprobe: %v\n%s", err, out)
			}
			if exit != tc.exit || !strings.Contains(out, tc.want) {
				t.Errorf("fwdprobe --node %s --target %s: exit %d, output %q; want exit %d and %q",
					tc.node, tc.target, exit, strings.TrimSpace(out), tc.exit, tc.want)
			}
		})
	}
	t.Run("refusal logged by node1", func(t *testing.T) {
		Eventually(t, 5*time.Second, 50*time.Millisecond, "node1's agent logs the refusal", func() error {
			if !strings.Contains(node1.agent.Log(), "forward: target not allowed") {
				return errors.New(`no "forward: target not allowed" in node1's agent log`)
			}
			return nil
		})
	})
	t.Run("refusals counted in node1's status", func(t *testing.T) {
		var st struct {
			Forward struct {
				Refused uint64 `json:"refused"`
			} `json:"forward"`
		}
		node1.agent.CtlJSON(t, &st, "status")
		if st.Forward.Refused < 4 {
			t.Errorf("meshctl status: forward.refused = %d, want at least the 4 refused probes", st.Forward.Refused)
		}
	})
}

// testLargeBodies downloads bodies of more than one TCP segment through the overlay: their segments
// fill mesh0's MTU, so WireGuard carries full-size packets.
func (o *overlayLAN) testLargeBodies(t *testing.T) {
	tests := []struct {
		name    string
		size    int
		timeout time.Duration
	}{
		{"two segments", 2000, 5 * time.Second},
		{"16 MiB", 16 << 20, 60 * time.Second},
	}
	for _, tc := range tests {
		ok := t.Run(tc.name, func(t *testing.T) {
			// Round robin alternates between the pods: two downloads reach both.
			for range 2 {
				start := time.Now()
				out, err := o.n(2).node.ExecTimeout(tc.timeout+10*time.Second, "curl", "-sS", "-m", fmt.Sprint(tc.timeout.Seconds()),
					"-o", "/dev/null", "-w", "%{size_download} %header{x-backend}", fmt.Sprintf("http://%s/big?n=%d", meshWebIP, tc.size))
				took := time.Since(start)
				if f := strings.Fields(out); err != nil || len(f) != 2 || f[0] != fmt.Sprint(tc.size) {
					t.Fatalf("download of %d bytes through the overlay: %v\n%s", tc.size, err, out)
				}
				t.Logf("%d bytes from %s through the overlay in %v (%.0f Mbit/s)", tc.size, strings.Fields(out)[1],
					took.Round(time.Millisecond), float64(tc.size)*8/took.Seconds()/1e6)
			}
		})
		if !ok {
			break // a bigger body cannot pass where a smaller one failed
		}
	}
}

// testCatalogReload adds a service whose endpoint (pod1:8081) is new to every agent: once the
// services file is reloaded, node1's forward listener must accept it for node2.
func (o *overlayLAN) testCatalogReload(t *testing.T) {
	const ip = "9.251.1.30"
	specs := append(o.specs[:len(o.specs):len(o.specs)], ServiceSpec{Name: "web-new", ClusterIP: ip,
		Ports:     []PortSpec{{Name: "http", Port: 80, TargetPort: 8081}},
		Endpoints: []EndpointSpec{{IP: o.n(1).podIP, Ready: true, Node: "node1"}}})
	WriteFileAtomic(t, o.servicesPath, RenderServices(specs)+RenderNodes(o.nodeSpecs))
	o.specs = specs
	took := Eventually(t, 15*time.Second, 200*time.Millisecond, "node2 reaches the new service on node1", func() error {
		out, err := o.n(2).node.Exec("curl", "-sS", "-m", "3", "http://"+ip+"/")
		if err != nil || out != "pod1-8081\n" {
			return fmt.Errorf("curl http://%s/: %q, %v", ip, out, err)
		}
		return nil
	})
	t.Logf("new endpoint on node1 reachable from node2 %v after the services file changed", took.Round(time.Millisecond))
}

// testNode3Stopped stops node3's agent (SIGTERM) while node2 requests web in a loop: requests keep
// succeeding and go to pod1 once node3 is gone; the proxy retries a request whose dial to node3
// fails on pod1 and ejects pod3.
func (o *overlayLAN) testNode3Stopped(t *testing.T) {
	client, node3 := o.n(2).node, o.n(3)
	ctx, cancel := context.WithCancel(context.Background())
	var (
		mu      sync.Mutex
		results []request
		done    = make(chan struct{})
	)
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			r := curlOnce(client, "http://web.default.svc.cluster.local/")
			mu.Lock()
			results = append(results, r)
			mu.Unlock()
		}
	}()
	snapshot := func() []request {
		mu.Lock()
		defer mu.Unlock()
		return append([]request(nil), results...)
	}
	defer func() { cancel(); <-done }()

	Eventually(t, 10*time.Second, 20*time.Millisecond, "both pods answer the loop", func() error {
		seen := map[string]bool{}
		for _, r := range snapshot() {
			seen[r.backend] = true
		}
		if !seen[podMarker] || !seen["pod3"] || len(snapshot()) < 20 {
			return fmt.Errorf("%d requests so far, backends %v", len(snapshot()), seen)
		}
		return nil
	})

	stopAt := time.Now()
	if err := node3.agent.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := node3.agent.Wait(15 * time.Second); err != nil {
		t.Errorf("node3's agent after SIGTERM: %v\n%s", err, node3.agent.Tail(20))
	}
	exitedAt := time.Now()
	t.Logf("node3's agent exited %v after SIGTERM", exitedAt.Sub(stopAt).Round(time.Millisecond))

	// Long enough for pod3's ejection to expire and be renewed more than once (1 s, 2 s, 4 s).
	Eventually(t, 30*time.Second, 100*time.Millisecond, "8 s of requests after node3 stopped", func() error {
		if rs := snapshot(); len(rs) == 0 || rs[len(rs)-1].start.Sub(exitedAt) < 8*time.Second {
			return errors.New("still running")
		}
		return nil
	})
	cancel()
	<-done

	var before, during, after, failedEarly, failedLate int
	var slow []string
	for _, r := range results {
		rel := r.start.Sub(stopAt)
		if !r.ok() {
			if rel < 2*time.Second {
				failedEarly++
			} else {
				failedLate++
			}
			t.Errorf("request at %+v of the stop failed: code %q backend %q err %v\n%s",
				rel.Round(time.Millisecond), r.code, r.backend, r.err, lastLines(r.out, 5))
			continue
		}
		switch {
		case r.start.Before(stopAt):
			before++
			continue
		case r.start.Before(exitedAt):
			// Node3's agent was shutting down: pod3 may still have answered.
			during++
		default:
			after++
			if r.backend != podMarker {
				t.Errorf("request at %+v of the stop (after node3's agent exited) answered by %s, want pod1",
					rel.Round(time.Millisecond), r.backend)
			}
		}
		if r.took > 500*time.Millisecond {
			slow = append(slow, fmt.Sprintf("at %+v took %v", rel.Round(time.Millisecond), r.took.Round(time.Millisecond)))
		}
	}
	t.Logf("requests: %d before the stop, %d while node3's agent shut down, %d after it exited (all to pod1 expected); "+
		"%d failed within 2 s of the stop, %d later", before, during, after, failedEarly, failedLate)
	t.Logf("requests after the stop slower than 500 ms (a dial to node3 timing out after the proxy's 1 s attempt "+
		"timeout, then pod1): %v", slow)
	if after < 20 {
		t.Errorf("only %d requests after node3 stopped: the loop did not test the failover", after)
	}

	eps := o.n(2).agent.ServiceEndpoints(t)["default/web"]
	for _, ep := range eps {
		t.Logf("node2's view of web endpoint %s on %s: flows %d, ejected until %v", ep.Address, ep.Node, ep.Flows,
			ep.EjectedUntil.Format(time.TimeOnly))
	}
	var st struct {
		Flows struct {
			OK           uint64 `json:"ok"`
			DialFailures uint64 `json:"dialFailures"`
			Retries      uint64 `json:"retries"`
		} `json:"flows"`
	}
	o.n(2).agent.CtlJSON(t, &st, "status")
	t.Logf("node2 flow counters: ok %d, dial failures %d, retries %d", st.Flows.OK, st.Flows.DialFailures, st.Flows.Retries)
}
