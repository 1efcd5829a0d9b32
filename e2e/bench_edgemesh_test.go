//go:build bench

package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The EdgeMesh-style reference and the "loss" section of the benchmark suite.
//
// The EdgeMesh-style tunnel (e2e/edgemeshref) is the data path KubeEdge EdgeMesh uses between
// nodes: one go-libp2p stream per TCP connection over one libp2p connection (TCP, TLS, yamux), the
// remote side dialling the endpoint. Its server runs on the endpoint's node, its client on the
// client's node with two loopback listeners, 127.0.0.1:5201 → pod1:5201 (iperf3) and
// 127.0.0.1:7000 → pod1:7000 (echo): the clients connect to 127.0.0.1 where EdgeMesh's iptables
// rules would redirect a service IP to its local proxy. In crossnode it gives
// cross.{tcp-1stream,tcp-4streams,rr,connrate}.edgemesh, and the mesh measurements carry ratios
// against them and the goals:
//
//   - cross.tcp-*.mesh ≥ 1.0× edgemesh and ≥ 1.0× wireguard-go
//   - cross.rr.mesh ≥ 1.0× edgemesh, cross.rr.mesh.p99 ≤ 1.0× edgemesh's p99
//   - cross.connrate.mesh ≥ 0.5× wireguard-go (direct connections over raw wireguard-go)
//
// loss: the two nodes on their own subnets, two routers between them, so that packets between the
// nodes can be dropped (this kernel has no netem):
//
//	node1 10.77.3.2 ── .1 router1 10.77.5.1 ── 10.77.5.2 router2 .1 ── 10.77.4.2 node2
//	pod1  10.244.1.10 behind node1, as in crossnode: iperf3 -s and echo (node1 runs them too)
//
// Agents on node1 and node2 (catalog from the static file, as in crossnode), the raw wireguard-go
// pair and the EdgeMesh-style tunnel. TCP throughput (1 stream) and request/response rate and
// latency to veth (node1 over the routed path), wireguard-go, edgemesh and mesh (service IP → pod1),
// first without loss (loss.0pct.*), then with lossProbability of the packets between the routers
// dropped at random in each direction (iptables -m statistic --mode random -j DROP on FORWARD, in
// router2 for what comes from router1 and in router1 for what comes from router2; loss.1pct.*).
// Two routers because a loss must hit one packet: the nodes send TSO/GSO super-packets of up to
// 64 KiB, as they would to a NIC that segments, and each router cuts them into MTU-sized packets
// as it sends them to the other (gso_max_segs 1 on the link between them), which drops them one by
// one. A stream tunnel carrying TCP over TCP suffers head-of-line blocking from a loss that
// WireGuard over UDP passes on to the one inner connection it hit: the goal is that the mesh is
// ahead of edgemesh by more with loss than without (loss.1pct.*.mesh / edgemesh > the same ratio
// without loss). loss.1pct.dropped is the fraction of the packets between the routers that were
// dropped while the lossy measurements ran: the loss the numbers saw.
const (
	// edgemeshPort is the TCP port of the EdgeMesh-style server (libp2p).
	edgemeshPort = 4100
	// lossProbability is the probability that a router drops a packet from the other in the lossy
	// phase; a whole percent, as it names the measurements ("loss.1pct.").
	lossProbability = 0.01
)

// edgemeshRef starts the EdgeMesh-style tunnel, server in srv listening on srvIP, client in cli,
// to the iperf3 and echo servers of podIP, and waits until a round trip through it succeeds. It
// returns the address the clients in cli connect to.
func (b *bench) edgemeshRef(t *testing.T, lab *Lab, srv, cli *Node, srvIP, podIP string) string {
	t.Helper()
	server := srv.Start(t, "edgemesh-server", b.tools.EdgeMeshRef, "server",
		"--listen", net.JoinHostPort(srvIP, strconv.Itoa(edgemeshPort)), "--key-file", filepath.Join(lab.Dir, "edgemesh.key"))
	server.WaitLog(t, "listening on", 10*time.Second)
	const marker = "edgemeshref server: listening on "
	var peerAddr string
	for line := range strings.Lines(server.Log()) {
		if _, rest, ok := strings.Cut(line, marker); ok {
			if f := strings.Fields(rest); len(f) > 0 {
				peerAddr = f[0]
			}
		}
	}
	if peerAddr == "" {
		t.Fatalf("edgemesh server: no address in its log:\n%s", server.Tail(10))
	}
	const local = "127.0.0.1"
	client := cli.Start(t, "edgemesh-client", b.tools.EdgeMeshRef, "client", "--peer", peerAddr,
		"--listen", net.JoinHostPort(local, strconv.Itoa(benchIperf)), "--target", net.JoinHostPort(podIP, strconv.Itoa(benchIperf)),
		"--listen", net.JoinHostPort(local, strconv.Itoa(benchEcho)), "--target", net.JoinHostPort(podIP, strconv.Itoa(benchEcho)))
	client.WaitLog(t, "listening on", 30*time.Second)
	b.daemons = append(b.daemons, daemon{"edgemesh-server", server}, daemon{"edgemesh-client", client})
	b.warmUp(t, cli, net.JoinHostPort(local, strconv.Itoa(benchEcho)))
	return local
}

// crossGoals sets the goals on crossnode's mesh measurements (prefix p), from the ratios
// they were recorded with.
func (b *bench) crossGoals(p string) {
	for _, kind := range []string{streamsName(1), streamsName(4)} {
		b.ratioGoals(p+kind+".mesh", ratioGoal{of: p + kind + ".edgemesh", factor: 1}, ratioGoal{of: p + kind + ".wireguard-go", factor: 1})
	}
	b.ratioGoals(p+"rr.mesh", ratioGoal{of: p + "rr.edgemesh", factor: 1})
	b.ratioGoals(p+"rr.mesh.p99", ratioGoal{of: p + "rr.edgemesh.p99", factor: 1, atMost: true})
	b.ratioGoals(p+"connrate.mesh", ratioGoal{of: p + "connrate.wireguard-go", factor: 0.5})
	// Issue 4's goal, between the namespaces the wireguard-go reference joins (node2 → node1).
	for _, kind := range []string{streamsName(1), streamsName(4)} {
		b.ratioGoals(p+kind+".mesh-hostnet", ratioGoal{of: p + kind + ".wireguard-go", factor: 0.8})
	}
}

// ratioGoal is a goal on a measurement's ratio to a reference of the same run: at least factor, or
// at most with atMost.
type ratioGoal struct {
	of     string
	factor float64
	atMost bool
}

// ratioGoals sets name's goal: met when each of goals is. A goal whose reference has no ratio
// (its measurement failed) is missed. Nothing happens if name itself was not measured.
func (b *bench) ratioGoals(name string, goals ...ratioGoal) {
	m := b.report.byName[name]
	if m == nil {
		return
	}
	met := true
	var texts []string
	for _, g := range goals {
		op := "≥"
		if g.atMost {
			op = "≤"
		}
		texts = append(texts, fmt.Sprintf("%s %.1f× %s", op, g.factor, shortRef(name, g.of)))
		r, ok := ratioOf(m, g.of)
		switch {
		case !ok:
			met = false
		case g.atMost:
			met = met && r <= g.factor
		default:
			met = met && r >= g.factor
		}
	}
	m.Goal = &Goal{Text: strings.Join(texts, ", "), Met: met}
}

// ratioOf returns m's ratio to the measurement named of.
func ratioOf(m *Measurement, of string) (float64, bool) {
	for _, r := range m.Ratios {
		if r.Of == of {
			return r.Value, true
		}
	}
	return 0, false
}

// shortRef is ref without the dotted components it shares with name from the start:
// "cross.rr.edgemesh.p99" beside "cross.rr.mesh.p99" is "edgemesh.p99".
func shortRef(name, ref string) string {
	n, r := strings.Split(name, "."), strings.Split(ref, ".")
	i := 0
	for i < len(n) && i < len(r)-1 && n[i] == r[i] {
		i++
	}
	return strings.Join(r[i:], ".")
}

// loss is the packet-loss section: the topology and measurements the comment at the top describes.
func (b *bench) loss(t *testing.T) {
	b.daemons = nil
	lab := NewLab(t)
	router1, router2 := lab.Router(t, "router1"), lab.Router(t, "router2")
	node1, node2, pod := lab.Node(t, "node1"), lab.Node(t, "node2"), lab.Node(t, "pod1")
	const node1IP, node2IP, podIP = "10.77.3.2", "10.77.4.2", "10.244.1.10"
	lab.Link(t, router1, netip.MustParsePrefix("10.77.3.1/24"), node1, netip.MustParsePrefix(node1IP+"/24"))
	lab.Link(t, router2, netip.MustParsePrefix("10.77.4.1/24"), node2, netip.MustParsePrefix(node2IP+"/24"))
	to2, to1 := lab.Link(t, router1, netip.MustParsePrefix("10.77.5.1/30"), router2, netip.MustParsePrefix("10.77.5.2/30"))
	router1.AddRoute(t, netip.MustParsePrefix("10.77.4.0/24"), netip.MustParseAddr("10.77.5.2"))
	router2.AddRoute(t, netip.MustParsePrefix("10.77.3.0/24"), netip.MustParseAddr("10.77.5.1"))
	node1.SetDefaultRoute(t, netip.MustParseAddr("10.77.3.1"))
	node2.SetDefaultRoute(t, netip.MustParseAddr("10.77.4.1"))
	lab.Link(t, node1, netip.MustParsePrefix("10.244.1.1/24"), pod, netip.MustParsePrefix(podIP+"/24"))
	pod.SetDefaultRoute(t, netip.MustParseAddr("10.244.1.1"))
	for _, n := range []*Node{node1, node2, pod} {
		tuneNode(t, n)
	}
	// Between the routers one segment per packet: a super-packet is cut up as it leaves a router,
	// after its FORWARD chain, so the other router's rule sees (and drops) single packets.
	router1.MustExec(t, "ip", "link", "set", to2, "gso_max_segs", "1")
	router2.MustExec(t, "ip", "link", "set", to1, "gso_max_segs", "1")
	// Where the lossy phase drops: each router, what arrives from the other.
	drops := []lossPoint{{router2, to1}, {router1, to2}}
	b.startServers(t, pod)
	b.startServers(t, node1)

	// The agents, as in crossNode: keys first, so that the catalog names both nodes.
	var nodes []benchNode
	for _, n := range []struct {
		node *Node
		ip   string
	}{{node1, node1IP}, {node2, node2IP}} {
		dir := filepath.Join(lab.Dir, n.node.Role+"-state")
		key := strings.TrimSpace(n.node.MustExec(t, b.meshctl, "keygen", "--state-dir", dir))
		nodes = append(nodes, benchNode{name: n.node.Role, key: key, endpoints: []string{n.ip + ":51820"}})
	}
	services := filepath.Join(lab.Dir, "services.yaml")
	WriteFileAtomic(t, services, RenderServices(benchCatalog(podIP, "node1"))+renderBenchNodes(nodes))
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
	b.warmUp(t, node2, net.JoinHostPort(benchEchoIP, strconv.Itoa(benchEcho)))
	b.wireguardGo(t, lab, node1, node2, node1IP, node2IP)
	b.warmUp(t, node2, net.JoinHostPort("10.99.0.1", strconv.Itoa(benchEcho)))
	edgemesh := b.edgemeshRef(t, lab, node1, node2, node1IP, podIP)

	targets := []struct{ name, iperf, echo string }{
		{"veth", node1IP, node1IP},
		{"wireguard-go", "10.99.0.1", "10.99.0.1"},
		{"edgemesh", edgemesh, edgemesh},
		{"mesh", benchIperfIP, benchEchoIP},
	}
	lossy := fmt.Sprintf("loss.%.0fpct.", lossProbability*100)
	for _, p := range []string{"loss.0pct.", lossy} {
		if p == lossy {
			for _, d := range drops {
				d.router.MustExec(t, "iptables", "-A", "FORWARD", "-i", d.in, "-m", "statistic", "--mode", "random",
					"--probability", strconv.FormatFloat(lossProbability, 'f', -1, 64), "-j", "DROP")
				// Counts what passed, for the fraction dropped.
				d.router.MustExec(t, "iptables", "-A", "FORWARD", "-i", d.in, "-j", "ACCEPT")
			}
		}
		refs := func(kind, name string) []string {
			var rs []string
			switch name {
			case "wireguard-go", "edgemesh":
				rs = []string{p + kind + ".veth"}
			case "mesh":
				rs = []string{p + kind + ".edgemesh", p + kind + ".wireguard-go", p + kind + ".veth"}
			}
			if p == lossy {
				// What the loss left of the same path's figure.
				rs = append(rs, "loss.0pct."+kind+"."+name)
			}
			return rs
		}
		kind := streamsName(1)
		for _, tg := range targets {
			b.tcp(t, p+kind+"."+tg.name, node2, tg.iperf, 1, refs(kind, tg.name)...)
		}
		for _, tg := range targets {
			b.benchtool(t, "rr", p+"rr."+tg.name, node2, tg.echo, refs("rr", tg.name)...)
		}
	}
	b.lossDropped(t, lossy+"dropped", drops)
	for _, kind := range []string{streamsName(1), "rr"} {
		b.lossGoal(t, lossy+kind+".mesh", lossy+kind+".edgemesh", "loss.0pct."+kind+".mesh", "loss.0pct."+kind+".edgemesh")
	}
}

// lossGoal sets the goal of the lossy mesh measurement name: its ratio to the lossy edgemesh one,
// ref, is to exceed the same ratio without loss (base to baseRef).
func (b *bench) lossGoal(t *testing.T, name, ref, base, baseRef string) {
	m, mb := b.report.byName[name], b.report.byName[base]
	if m == nil || mb == nil {
		return
	}
	lossless, ok := ratioOf(mb, baseRef)
	if !ok {
		return
	}
	r, ok := ratioOf(m, ref)
	m.Goal = &Goal{Text: fmt.Sprintf("> %.2f× %s (the ratio without loss)", lossless, shortRef(name, ref)), Met: ok && r > lossless}
	t.Logf("%s: mesh/edgemesh %.2f with loss, %.2f without", name, r, lossless)
}

// lossPoint is where the lossy phase drops packets: in router's FORWARD chain, those arriving on
// interface in.
type lossPoint struct {
	router *Node
	in     string
}

// lossDropped records the fraction of the packets arriving at drops that the DROP rules dropped
// (iptables counters: the DROP rule and the ACCEPT after it).
func (b *bench) lossDropped(t *testing.T, name string, drops []lossPoint) {
	t.Run(name, func(t *testing.T) {
		var dropped, total float64
		raw := map[string]any{"probability": lossProbability}
		for _, d := range drops {
			out := d.router.MustExec(t, "iptables", "-L", "FORWARD", "-v", "-n", "-x")
			counts := map[string]float64{} // target → packets
			for line := range strings.Lines(out) {
				// pkts bytes target prot opt in out source destination [match]
				f := strings.Fields(line)
				if len(f) < 6 || f[5] != d.in || (f[2] != "DROP" && f[2] != "ACCEPT") {
					continue
				}
				if pkts, err := strconv.ParseFloat(f[0], 64); err == nil {
					counts[f[2]] += pkts
				}
			}
			if counts["DROP"]+counts["ACCEPT"] == 0 {
				err := fmt.Errorf("%s: no packets counted from %s:\n%s", d.router.Role, d.in, out)
				b.report.Fail(name, err)
				t.Fatal(err)
			}
			dropped += counts["DROP"]
			total += counts["DROP"] + counts["ACCEPT"]
			raw[d.router.Role] = map[string]float64{"dropped": counts["DROP"], "forwarded": counts["ACCEPT"]}
		}
		frac := 100 * dropped / total
		b.report.Add(&Measurement{Name: name, Value: frac, Unit: "%", Raw: raw})
		t.Logf("the routers dropped %.0f of %.0f packets (%.2f%%): %v", dropped, total, frac, raw)
	})
}
