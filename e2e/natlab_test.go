package e2e

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// The NAT traversal scenarios run over one NAT lab (natlab.go): relay1 and relay2 and a cloud host
// on the internet, and four sites behind NAT routers:
//
//	site A (easy NAT) 192.168.1.0/24: edge-a1 .11, edge-a2 .12   (same LAN: the lan path)
//	site B (easy NAT) 192.168.2.0/24: edge-b1 .11                 (A ↔ B: hole-punched direct path)
//	site C (hard NAT) 192.168.3.0/24: edge-c1 .11                 (C ↔ D: only the relay)
//	site D (hard NAT) 192.168.4.0/24: edge-d1 .11
//	cloud 203.0.113.x, public
//
// Every node runs an agent (--relay relay1 only, until scenario 8 restarts c1 and d1 with both relays)
// and has a pod behind it (10.244.N.10) that only it routes to, running testserver http :8080 (name
// pod-<role>) and udpecho :9000. Service web-<role> (TCP 80) and echo-<role> (UDP 9000) have their one
// endpoint in that pod. The services file has no Node objects: keys and addresses come from the
// relay's directory alone.

// natHost is one mesh node of the lab.
type natHost struct {
	role    string // namespace role and service suffix: "a1"
	name    string // node name: "edge-a1"
	node    *Node
	addr    netip.Addr
	site    *Site // nil for the cloud
	pod     *Node
	podIP   netip.Addr
	wgIface string
	agent   *Agent
}

type natLab struct {
	lab          *Lab
	inet         *Internet
	sites        map[string]*Site
	hosts        map[string]*natHost // by role
	cloud        *Node
	relays       []*Relay // relay1, relay2 (not started by the topology)
	relayNodes   []*Node
	relayAddrs   []netip.Addr
	token        string
	tokenFile    string
	servicesPath string
	resolvConf   string
	meshctl      string
	watch        *PathWatcher
	agentsStart  time.Time
}

var natHostRoles = []string{"a1", "a2", "b1", "c1", "d1", "cloud"}

// buildNATTopology creates the namespaces, links, NATs and pods, and starts the pods' servers.
func buildNATTopology(t *testing.T) *natLab {
	t.Helper()
	start := time.Now()
	lab := NewLab(t)
	l := &natLab{lab: lab, inet: NewInternet(t, lab), sites: map[string]*Site{}, hosts: map[string]*natHost{}}
	for i := 1; i <= 2; i++ {
		n, addr := l.inet.PublicHost(t, fmt.Sprintf("relay%d", i))
		l.relayNodes, l.relayAddrs = append(l.relayNodes, n), append(l.relayAddrs, addr)
	}
	cloud, cloudAddr := l.inet.PublicHost(t, "cloud")
	l.cloud = cloud
	for i, s := range []struct {
		name string
		kind NATKind
	}{{"A", NATEasy}, {"B", NATEasy}, {"C", NATHard}, {"D", NATHard}} {
		l.sites[s.name] = l.inet.NATSite(t, s.name, s.kind, netip.PrefixFrom(netip.AddrFrom4([4]byte{192, 168, byte(i + 1), 0}), 24))
	}
	for i, role := range natHostRoles {
		h := &natHost{role: role, name: "edge-" + role, wgIface: fmt.Sprintf("ew%s%s", lab.ID, role)}
		if role == "cloud" {
			h.name, h.node, h.addr = "cloud", cloud, cloudAddr
		} else {
			h.site = l.sites[strings.ToUpper(role[:1])]
			h.node, h.addr = h.site.Host(t, role)
		}
		h.pod, h.podIP = AddPod(t, h.node, "pod"+role, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 1), 0}), 24))
		h.node.SetResolvConf(t, netip.MustParseAddr(dnsIP))
		l.hosts[role] = h
	}
	var servers []*Proc
	for _, role := range natHostRoles {
		h := l.hosts[role]
		servers = append(servers,
			h.pod.Start(t, "http", bins.Testserver, "http", "--listen", ":8080", "--name", "pod-"+role),
			h.pod.Start(t, "udpecho", bins.Testserver, "udpecho", "--listen", ":9000", "--name", "pod-"+role))
	}
	for _, p := range servers {
		p.WaitLog(t, "listening on", 10*time.Second)
	}
	t.Logf("NAT lab topology (%d hosts, 4 NAT sites) built in %v", len(l.hosts), time.Since(start).Round(time.Millisecond))
	return l
}

func (l *natLab) h(role string) *natHost { return l.hosts[role] }

// TestNATLabTopology checks the lab itself, without the mesh: NAT behaviour, isolation of sites and
// pods. It is what the scenarios' conclusions rest on.
func TestNATLabTopology(t *testing.T) {
	l := buildNATTopology(t)
	// An echo of the source address as the cloud sees it ("ip port": a colon would end socat's
	// address).
	l.cloud.Start(t, "srcecho", "socat", "UDP4-RECVFROM:7000,fork", `SYSTEM:echo $SOCAT_PEERADDR $SOCAT_PEERPORT`)
	Eventually(t, 5*time.Second, 20*time.Millisecond, "socat listens on the cloud", func() error {
		out, err := l.cloud.Exec("ss", "-Hlnu", "sport", "=", "7000")
		if err == nil && !strings.Contains(out, "7000") {
			err = errors.New("not yet")
		}
		return err
	})
	observed := func(h *natHost) (netip.AddrPort, error) {
		out, err := h.node.Exec("sh", "-c", fmt.Sprintf("echo x | socat -T 2 - UDP4:%s:7000,sourceport=%s", l.h("cloud").addr, wgPort))
		if err != nil {
			return netip.AddrPort{}, fmt.Errorf("%w: %s", err, out)
		}
		return netip.ParseAddrPort(strings.Replace(strings.TrimSpace(out), " ", ":", 1))
	}
	before := map[string]int{}
	for name, s := range l.sites {
		before[name] = s.MasqueradedPackets(t)
	}
	t.Run("mapping seen by the cloud", func(t *testing.T) {
		tests := []struct {
			name     string
			role     string
			keepPort bool
		}{
			{"easy NAT keeps the port", "a1", true},
			{"second easy NAT keeps the port", "b1", true},
			{"hard NAT randomizes the port", "c1", false},
			{"other hard NAT randomizes the port", "d1", false},
			{"second host behind an easy NAT gets another port", "a2", false},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				h := l.h(tc.role)
				got, err := observed(h)
				if err != nil {
					t.Fatalf("%s → cloud: %v", h.role, err)
				}
				if got.Addr() != h.site.Public {
					t.Errorf("%s: the cloud saw %s, want the NAT's public address %s", h.role, got, h.site.Public)
				}
				if kept := fmt.Sprint(got.Port()) == wgPort; kept != tc.keepPort {
					t.Errorf("%s (%s NAT): source port %d seen for %s, want kept=%v", h.role, h.site.Kind, got.Port(), wgPort, tc.keepPort)
				}
				t.Logf("%s:%s appears as %s", h.addr, wgPort, got)
			})
		}
	})
	t.Run("masquerade counters", func(t *testing.T) {
		for name, s := range l.sites {
			if after := s.MasqueradedPackets(t); after <= before[name] {
				t.Errorf("nat%s: MASQUERADE counted %d packets before and %d after traffic", name, before[name], after)
			}
		}
	})
	l.h("a1").node.Start(t, "http", bins.Testserver, "http", "--listen", ":8080", "--name", "a1-host").
		WaitLog(t, "listening on", 10*time.Second)
	reach := func(from *Node, url string) error {
		out, err := from.Exec("curl", "-sS", "-m", "2", "-o", "/dev/null", url)
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		return nil
	}
	a1 := "http://" + l.h("a1").addr.String() + ":8080/"
	tests := []struct {
		name string
		from *Node
		url  string
		want bool
	}{
		{"same LAN reaches a1", l.h("a2").node, a1, true},
		{"other site cannot reach a1's private address", l.h("b1").node, a1, false},
		{"cloud cannot reach a1's private address", l.cloud, a1, false},
		{"a1 reaches its own pod", l.h("a1").node, "http://" + l.h("a1").podIP.String() + ":8080/", true},
		{"a2 cannot reach a1's pod", l.h("a2").node, "http://" + l.h("a1").podIP.String() + ":8080/", false},
		{"cloud reaches its own pod", l.cloud, "http://" + l.h("cloud").podIP.String() + ":8080/", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := reach(tc.from, tc.url); (err == nil) != tc.want {
				t.Errorf("%s → %s: error %v, want reachable=%v", tc.from.Role, tc.url, err, tc.want)
			}
		})
	}
	t.Run("TTL", func(t *testing.T) {
		// Three routers lie between a site and the cloud (NAT, inet): a datagram with TTL 2 opens the
		// sender's NAT mapping and dies at inet; with TTL 3 it arrives and srcecho answers.
		tests := []struct {
			name   string
			ttl    int
			answer bool
		}{{"TTL 2 dies at inet", 2, false}, {"TTL 3 reaches the cloud", 3, true}}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				out, _ := l.h("b1").node.Exec("sh", "-c", fmt.Sprintf("echo x | socat -T 1 - UDP4:%s:7000,ttl=%d", l.h("cloud").addr, tc.ttl))
				if got := strings.TrimSpace(out) != ""; got != tc.answer {
					t.Errorf("datagram with TTL %d from b1 to the cloud: answer %q, want answered=%v", tc.ttl, out, tc.answer)
				}
			})
		}
	})
}

// newNATLab builds the topology, starts relay1 and relay2 and every agent (registered with relay1).
func newNATLab(t *testing.T) *natLab {
	t.Helper()
	meshctl := needMeshctl(t)
	relayBin := BuildMeshRelay(t, filepath.Dir(bins.Meshctl))
	l := buildNATTopology(t)
	l.meshctl = meshctl
	l.token = rand.Text()
	l.tokenFile = filepath.Join(l.lab.Dir, "join-token")
	l.servicesPath = filepath.Join(l.lab.Dir, "services.yaml")
	l.resolvConf = filepath.Join(l.lab.Dir, "upstream-resolv.conf")
	for path, content := range map[string]string{l.tokenFile: l.token + "\n", l.resolvConf: "nameserver 127.0.0.1\n"} {
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatalf("write %s: %v", path, err)
		}
	}
	var specs []ServiceSpec
	for _, role := range natHostRoles {
		h := l.h(role)
		specs = append(specs,
			ServiceSpec{Name: "web-" + role, Ports: []PortSpec{{Name: "http", Port: 80, TargetPort: 8080}},
				Endpoints: []EndpointSpec{{IP: h.podIP.String(), Ready: true, Node: h.name}}},
			ServiceSpec{Name: "echo-" + role, Ports: []PortSpec{{Name: "echo", Protocol: "UDP", Port: 9000, TargetPort: 9000}},
				Endpoints: []EndpointSpec{{IP: h.podIP.String(), Ready: true, Node: h.name}}})
	}
	WriteFileAtomic(t, l.servicesPath, RenderServices(specs))

	for i, n := range l.relayNodes {
		r := NewRelay(n, l.relayAddrs[i], relayBin, l.tokenFile)
		r.Start(t, 20*time.Second)
		l.relays = append(l.relays, r)
	}
	l.agentsStart = time.Now()
	sockets := map[string]string{}
	for _, role := range natHostRoles {
		h := l.h(role)
		l.startAgent(t, h, l.relays[0].HostPort())
		sockets[h.name] = h.agent.ControlSocket
	}
	l.watch = WatchPaths(t, 100*time.Millisecond, sockets)
	return l
}

// startAgent starts h's agent registered with the relays given (host:port or multiaddr).
func (l *natLab) startAgent(t testing.TB, h *natHost, relays ...string) {
	t.Helper()
	extra := []string{"--wg-interface", h.wgIface, "--listen-port", wgPort, "--forward-port", fwdPort,
		"--join-token-file", l.tokenFile}
	for _, r := range relays {
		extra = append(extra, "--relay", r)
	}
	h.agent = StartAgent(t, h.node, AgentOptions{Meshctl: l.meshctl, NodeName: h.name,
		ServicesFile: l.servicesPath, ResolvConf: l.resolvConf, Extra: extra})
}

// TestNATLab runs the NAT traversal scenarios in order over one NAT lab.
func TestNATLab(t *testing.T) {
	l := newNATLab(t)
	if !t.Run("ready", l.testReady) {
		t.FailNow()
	}
	t.Run("1 same subnet lan", l.testSameSubnet)
	direct := t.Run("2 easy-easy direct", l.testEasyEasy)
	t.Run("3 hard-hard relay", l.testHardHard)
	t.Run("4 easy-hard", l.testEasyHard)
	t.Run("5 edge and cloud", l.testCloud)
	if !direct {
		// Still worth running over the next best pair: a path that is not the relay's.
		t.Error("6 relay killed after direct: scenario 2 found no direct path a1 ↔ b1; running it over a1 ↔ cloud")
	}
	t.Run("6 relay killed after direct", l.testRelayKilledDirect)
	t.Run("7 relay restarted while relayed", l.testRelayRestarted)
	t.Run("8 two relays one killed", l.testTwoRelays)
	t.Run("9 direct path cut silently", l.testDirectCut)
	t.Run("10 lan path refused by a firewall", l.testLANRefused)
	t.Run("11 direct path refused by a firewall", l.testDirectRefused)
	t.Run("join token not logged", l.testTokenNotLogged)
	for _, pair := range [][2]string{{"a1", "a2"}, {"a1", "b1"}, {"b1", "a1"}, {"c1", "d1"}, {"a1", "c1"}, {"c1", "a1"},
		{"a1", "cloud"}, {"c1", "cloud"}, {"cloud", "c1"}} {
		t.Logf("path history %s→%s (since agents started): %s", pair[0], pair[1],
			l.watch.History(l.h(pair[0]).name, l.h(pair[1]).name, l.agentsStart))
	}
	if n, err := l.watch.Errors(); n > 0 {
		t.Logf("status polls that failed: %d, last: %v", n, err)
	}
	if t.Failed() {
		// The lab's teardown shows the last lines of every log; these are the path layer's and the
		// relay client's, which the WireGuard debug lines would push out.
		for _, role := range natHostRoles {
			var lines []string
			for line := range strings.Lines(l.h(role).agent.Log()) {
				if strings.Contains(line, "punch") || strings.Contains(line, "prime") || strings.Contains(line, "msg=path ") ||
					strings.Contains(line, "registered with relay") || strings.Contains(line, "relay session") ||
					strings.Contains(line, `msg="path dead"`) || strings.Contains(line, `msg="path suspected"`) ||
					strings.Contains(line, "endpoint ejected") || strings.Contains(line, "roaming") ||
					strings.Contains(line, "replayed") {
					lines = append(lines, line)
				}
			}
			if len(lines) > 30 {
				lines = append(append(lines[:15:15], fmt.Sprintf("... %d lines ...\n", len(lines)-30)), lines[len(lines)-15:]...)
			}
			t.Logf("--- %s: punch, prime, path and relay session lines ---\n%s", role, strings.Join(lines, ""))
		}
	}
}

func (l *natLab) testReady(t *testing.T) {
	for _, role := range natHostRoles {
		l.h(role).agent.WaitReady(t, 30*time.Second)
	}
	defer func() {
		if t.Failed() {
			for _, role := range natHostRoles {
				a := l.h(role).agent
				t.Logf("%s: %d \"registered with relay\" lines in its log", role, strings.Count(a.Log(), "registered with relay"))
			}
		}
	}()
	took := Eventually(t, 30*time.Second, 100*time.Millisecond, "every agent has the other 5 nodes as peers (from the relay's directory)", func() error {
		var missing []string
		for _, role := range natHostRoles {
			h := l.h(role)
			paths, err := h.agent.Paths()
			if err != nil {
				return err
			}
			for _, other := range natHostRoles {
				if _, ok := paths[l.h(other).name]; other != role && !ok {
					missing = append(missing, h.role+"→"+other)
				}
			}
		}
		if len(missing) > 0 {
			return fmt.Errorf("peers missing: %s", strings.Join(missing, ", "))
		}
		return nil
	})
	t.Logf("all agents ready and peered through the relay's directory %v after the agents were started (%v polling)",
		time.Since(l.agentsStart).Round(time.Millisecond), took.Round(time.Millisecond))
}

// waitPath waits until from's path to to is one of kinds and returns it.
func (l *natLab) waitPath(t testing.TB, from, to *natHost, timeout time.Duration, kinds ...string) PeerPath {
	t.Helper()
	var got PeerPath
	Eventually(t, timeout, 100*time.Millisecond, fmt.Sprintf("%s's path to %s is %s", from.role, to.role, strings.Join(kinds, " or ")), func() error {
		paths, err := from.agent.Paths()
		if err != nil {
			return err
		}
		p, ok := paths[to.name]
		if !ok {
			return fmt.Errorf("%s is not a peer of %s", to.name, from.name)
		}
		if !slices.Contains(kinds, p.Kind) {
			return fmt.Errorf("path %q %s; history %s", p.Kind, p.Addr, l.watch.History(from.name, to.name, l.agentsStart))
		}
		got = p
		return nil
	})
	return got
}

// fetch requests web-<to> by name from from's node (a new connection) and checks the backend.
func fetch(from, to *natHost, timeout time.Duration) Result {
	r := Result{Start: time.Now()}
	out, err := from.node.Exec("curl", "-sS", "-m", fmt.Sprint(timeout.Seconds()), "-H", "Connection: close",
		fmt.Sprintf("http://web-%s.default.svc.cluster.local/", to.role))
	r.End = time.Now()
	want := "pod-" + to.role + "\n"
	r.OK = err == nil && out == want
	if !r.OK {
		r.Detail = fmt.Sprintf("%v: %q (want %q)", err, tailLines(out, 3), want)
	}
	return r
}

// loopFetch requests web-<to> from from's node in a loop until the loop is stopped.
func loopFetch(from, to *natHost, timeout time.Duration) *RequestLoop {
	return StartLoop(func() Result { return fetch(from, to, timeout) })
}

// echo sends 3 datagrams to echo-<to> by name from from's node and checks the replies.
func echo(from, to *natHost) error {
	out, err := from.node.Exec(bins.Testserver, "udpclient", "--server", fmt.Sprintf("echo-%s.default.svc.cluster.local:9000", to.role),
		"--msg", from.role+"-%d", "--count", "3", "--timeout", "2s")
	want := fmt.Sprintf("pod-%[1]s:%[2]s-0\npod-%[1]s:%[2]s-1\npod-%[1]s:%[2]s-2\n", to.role, from.role)
	if err != nil || out != want {
		return fmt.Errorf("udpclient %s → echo-%s: %v: %q, want %q", from.role, to.role, err, tailLines(out, 5), want)
	}
	return nil
}

// traffic checks HTTP and UDP from a to b and from b to a, allowing timeout for the first HTTP
// request of each direction to get through.
func traffic(t *testing.T, a, b *natHost, timeout time.Duration) {
	t.Helper()
	for _, d := range [][2]*natHost{{a, b}, {b, a}} {
		from, to := d[0], d[1]
		took := Eventually(t, timeout, 200*time.Millisecond, fmt.Sprintf("HTTP %s → web-%s", from.role, to.role), func() error {
			if r := fetch(from, to, 2*time.Second); !r.OK {
				return errors.New(r.Detail)
			}
			return nil
		})
		if err := echo(from, to); err != nil {
			t.Error(err)
		}
		t.Logf("%s → %s: HTTP by name and UDP echo work (first HTTP success after %v)", from.role, to.role, took.Round(time.Millisecond))
	}
}

// logPing runs `meshctl ping` from → to and logs each probe; it fails t when the command fails.
func logPing(t *testing.T, from, to *natHost, extra ...string) []PingProbe {
	t.Helper()
	start := time.Now()
	probes, err := from.agent.Ping(40*time.Second, to.name, extra...)
	if err != nil {
		t.Errorf("meshctl ping %s %v from %s: %v", to.name, extra, from.role, err)
	}
	var b strings.Builder
	for _, p := range probes {
		fmt.Fprintf(&b, "\n  seq %d %s %s rtt %.3f ms %s", p.Seq, p.Path, p.Addr, p.RTTMs, p.Error)
	}
	t.Logf("meshctl ping %s %v from %s: %d probes in %v:%s", to.name, extra, from.role, len(probes),
		time.Since(start).Round(time.Millisecond), b.String())
	if err == nil && len(probes) == 0 {
		t.Errorf("meshctl ping %s from %s printed no probe", to.name, from.role)
	}
	return probes
}

func (l *natLab) testSameSubnet(t *testing.T) {
	a1, a2 := l.h("a1"), l.h("a2")
	for _, d := range [][2]*natHost{{a1, a2}, {a2, a1}} {
		p := l.waitPath(t, d[0], d[1], 20*time.Second, "lan")
		if want := d[1].addr.String() + ":" + wgPort; p.Addr != want {
			t.Errorf("%s's lan path to %s is %s, want its LAN address %s", d[0].role, d[1].role, p.Addr, want)
		}
	}
	traffic(t, a1, a2, 15*time.Second)
	for _, p := range logPing(t, a1, a2, "--count", "3") {
		if p.Path != "lan" || p.Error != "" {
			t.Errorf("ping a1 → a2 probe %d: path %q %s error %q, want lan", p.Seq, p.Path, p.Addr, p.Error)
		}
	}
	// LAN first: the LAN path answered before the first punch request for a peer on the own
	// subnet fell due (1 s after it appeared; the pings above took 2 s), so neither asked for one.
	for _, d := range [][2]*natHost{{a1, a2}, {a2, a1}} {
		for line := range strings.Lines(d[0].agent.Log()) {
			if strings.Contains(line, `msg="requesting punch"`) && strings.Contains(line, " peer="+d[1].name+" ") {
				t.Errorf("%s asked for a punch with %s, on its own LAN: %s", d[0].role, d[1].role, strings.TrimSpace(line))
			}
		}
	}
}

func (l *natLab) testEasyEasy(t *testing.T) {
	a1, b1 := l.h("a1"), l.h("b1")
	for _, d := range [][2]*natHost{{a1, b1}, {b1, a1}} {
		from, to := d[0], d[1]
		p := l.waitPath(t, from, to, 45*time.Second, "direct")
		if ap, err := netip.ParseAddrPort(p.Addr); err != nil || ap.Addr() != to.site.Public {
			t.Errorf("%s's direct path to %s is %q, want an address of nat%s (%s)", from.role, to.role, p.Addr, to.site.Name, to.site.Public)
		}
		at, _ := l.watch.First(from.name, to.name, "direct")
		t.Logf("%s → %s direct via %s, %v after the agents were started (path history: %s)", from.role, to.role, p.Addr,
			at.Sub(l.agentsStart).Round(10*time.Millisecond), l.watch.History(from.name, to.name, l.agentsStart))
	}
	traffic(t, a1, b1, 15*time.Second)
	for _, p := range logPing(t, a1, b1, "--until-direct") {
		if p.Error == "" && p.Path != "direct" && p.Path != "relay" {
			t.Errorf("ping a1 → b1 probe %d: path %q, want direct (or relay before it)", p.Seq, p.Path)
		}
	}
}

func (l *natLab) testHardHard(t *testing.T) {
	c1, d1 := l.h("c1"), l.h("d1")
	var paths []PeerPath
	for _, d := range [][2]*natHost{{c1, d1}, {d1, c1}} {
		p := l.waitPath(t, d[0], d[1], 30*time.Second, "relay")
		// Debian's wg parses endpoints as IP:port and crashes on anything else.
		if _, err := netip.ParseAddrPort(p.Addr); err != nil {
			t.Errorf("%s's relay path to %s has address %q, want a synthetic IP:port: %v", d[0].role, d[1].role, p.Addr, err)
		}
		paths = append(paths, p)
	}
	traffic(t, c1, d1, 20*time.Second)
	out, err := c1.node.Exec("wg", "show", c1.wgIface, "endpoints")
	if err != nil || !strings.Contains(out, paths[0].Addr) {
		t.Errorf("wg show %s endpoints on c1: %v, want d1's relay endpoint %s in:\n%s", c1.wgIface, err, paths[0].Addr, out)
	}
	for _, p := range logPing(t, c1, d1, "--count", "3") {
		if p.Path != "relay" || p.Error != "" {
			t.Errorf("ping c1 → d1 probe %d: path %q error %q, want relay", p.Seq, p.Path, p.Error)
		}
	}
	const size = 20 << 20
	start := time.Now()
	out, err = c1.node.ExecTimeout(40*time.Second, "curl", "-sS", "-m", "30", "-o", "/dev/null", "-w", "%{size_download}",
		fmt.Sprintf("http://web-d1.default.svc.cluster.local/big?n=%d", size))
	took := time.Since(start)
	if err != nil || out != fmt.Sprint(size) {
		t.Errorf("%d MiB c1 → d1 through the relay: %v: %q", size>>20, err, out)
	} else {
		t.Logf("%d MiB c1 → d1 through the relay in %v (%.0f Mbit/s)", size>>20, took.Round(time.Millisecond),
			float64(size)*8/took.Seconds()/1e6)
	}
}

func (l *natLab) testEasyHard(t *testing.T) {
	a1, c1 := l.h("a1"), l.h("c1")
	for _, d := range [][2]*natHost{{a1, c1}, {c1, a1}} {
		p := l.waitPath(t, d[0], d[1], 30*time.Second, "direct", "relay")
		t.Logf("%s → %s: path %s %s (history %s)", d[0].role, d[1].role, p.Kind, p.Addr,
			l.watch.History(d[0].name, d[1].name, l.agentsStart))
	}
	traffic(t, a1, c1, 20*time.Second)
	logPing(t, a1, c1, "--count", "2")
}

func (l *natLab) testCloud(t *testing.T) {
	cloud := l.h("cloud")
	for _, role := range []string{"a1", "c1"} {
		edge := l.h(role)
		t.Run(role, func(t *testing.T) {
			traffic(t, edge, cloud, 20*time.Second)
			// DESIGN.md: even a hard NAT reaches a public host directly, the cloud replying to the
			// source it observes. The cloud's own address is its "LAN" address: an edge reaching it
			// there reports lan.
			for _, d := range [][2]*natHost{{edge, cloud}, {cloud, edge}} {
				p := l.waitPath(t, d[0], d[1], 30*time.Second, "direct", "lan")
				t.Logf("%s → %s: %s %s (history %s)", d[0].role, d[1].role, p.Kind, p.Addr,
					l.watch.History(d[0].name, d[1].name, l.agentsStart))
			}
		})
	}
}

// testRelayKilledDirect kills relay1 (every agent's only relay) during a transfer over the direct
// path a1 ↔ b1 and while b1 requests a1's service in a loop: neither notices.
func (l *natLab) testRelayKilledDirect(t *testing.T) {
	a1, peer, a2 := l.h("a1"), l.h("b1"), l.h("a2")
	if paths, err := a1.agent.Paths(); err != nil || paths[peer.name].Kind != "direct" {
		peer = l.h("cloud")
	}
	l.waitPath(t, a1, peer, 5*time.Second, "direct", "lan")
	t.Logf("transfer a1 ← %s", peer.role)
	const size, rate = 24 << 20, 6 << 20 // four seconds of transfer
	type result struct {
		out string
		err error
	}
	transfer := make(chan result, 1)
	start := time.Now()
	go func() {
		out, err := a1.node.ExecTimeout(60*time.Second, "curl", "-sS", "-m", "50", "--limit-rate", fmt.Sprint(rate),
			"-o", "/dev/null", "-w", "%{size_download}", fmt.Sprintf("http://web-%s.default.svc.cluster.local/big?n=%d", peer.role, size))
		transfer <- result{out, err}
	}()
	lp := loopFetch(peer, a1, 3*time.Second)
	defer lp.Stop()
	lp.WaitSuccess(t, "requests to a1 succeed", start, 10*time.Second)
	// The relay dies while the transfer (size/rate: 4 s in all) is under way.
	Eventually(t, 10*time.Second, 50*time.Millisecond, "a1's transfer connection is established", func() error {
		out, err := a1.node.Exec("ss", "-Htn", "state", "established", "dport", "=", ":80")
		if err == nil && strings.TrimSpace(out) == "" {
			err = errors.New("no connection to port 80 yet")
		}
		return err
	})
	killedAt := time.Now()
	l.relays[0].Kill(t)
	t.Logf("relay1 killed %v into the transfer", killedAt.Sub(start).Round(time.Millisecond))
	var res result
	select {
	case res = <-transfer:
	case <-time.After(70 * time.Second):
		t.Fatal("the transfer never ended")
	}
	end := time.Now()
	if res.err != nil || res.out != fmt.Sprint(size) {
		t.Errorf("transfer a1 ← %s across the relay's death: %v: %q, want %d bytes", peer.role, res.err, res.out, size)
	} else {
		t.Logf("%d MiB at %d MiB/s a1 ← %s completed %v after relay1 died (took %v in all)", size>>20, rate>>20,
			peer.role, end.Sub(killedAt).Round(time.Millisecond), end.Sub(start).Round(time.Millisecond))
	}
	// Some requests after the transfer too: the paths outlive the relay.
	Eventually(t, 10*time.Second, 100*time.Millisecond, "3 s of requests to a1 after the transfer", func() error {
		if rs := lp.Results(); len(rs) == 0 || rs[len(rs)-1].Start.Sub(end) < 3*time.Second {
			return errors.New("still running")
		}
		return nil
	})
	rs := lp.Stop()
	n, failed, gap := Summarize(rs, killedAt, time.Now())
	t.Logf("%s → a1: %d requests after relay1 died, %d failed, longest gap between successes %v", peer.role, n, len(failed), gap.Round(time.Millisecond))
	for _, f := range failed {
		t.Errorf("%s → a1 request at %s after relay1 died failed", peer.role, f)
	}
	for _, d := range [][2]*natHost{{a1, peer}, {peer, a1}, {a1, a2}} {
		if paths, err := d[0].agent.Paths(); err != nil {
			t.Error(err)
		} else if p := paths[d[1].name]; p.Kind != "direct" && p.Kind != "lan" {
			t.Errorf("%s → %s after relay1 died: path %q %s, want it kept (history %s)", d[0].role, d[1].role, p.Kind, p.Addr,
				l.watch.History(d[0].name, d[1].name, l.agentsStart))
		}
	}
	if r := fetch(a1, a2, 3*time.Second); !r.OK {
		t.Errorf("a1 → a2 (lan) after relay1 died: %s", r.Detail)
	}
}

// testRelayRestarted: relay1 died in scenario 6 while c1 ↔ d1 was relayed. Restarted, the relayed
// traffic resumes within 10 s; then the same again with a loop running across a 2 s outage.
func (l *natLab) testRelayRestarted(t *testing.T) {
	c1, d1 := l.h("c1"), l.h("d1")
	r := l.relays[0]
	if !r.Proc.Exited() { // scenario 6 did not run
		r.Kill(t)
	}
	lp := loopFetch(c1, d1, 2*time.Second)
	defer lp.Stop()
	restartAt := time.Now()
	r.Start(t, 20*time.Second)
	took := lp.WaitSuccess(t, "c1 → d1 requests succeed after relay1 restarted", restartAt, 30*time.Second)
	t.Logf("after an outage of relay1 since scenario 6, c1 → d1 traffic resumed %v after its restart", took.Round(time.Millisecond))
	if took > 10*time.Second {
		t.Errorf("c1 → d1 resumed %v after relay1 restarted, want within 10 s", took.Round(time.Millisecond))
	}
	l.waitPath(t, c1, d1, 5*time.Second, "relay")

	killedAt := time.Now()
	r.Kill(t)
	// The outage itself: the relay stays down this long.
	time.Sleep(2 * time.Second)
	restartAt = time.Now()
	r.Start(t, 20*time.Second)
	took = lp.WaitSuccess(t, "c1 → d1 requests succeed after relay1's second restart", restartAt, 30*time.Second)
	rs := lp.Stop()
	n, failed, _ := Summarize(rs, killedAt, restartAt)
	t.Logf("relay1 down %v: %d c1 → d1 requests then, %d failed; traffic resumed %v after the restart",
		restartAt.Sub(killedAt).Round(time.Millisecond), n, len(failed), took.Round(time.Millisecond))
	if took > 10*time.Second {
		t.Errorf("c1 → d1 resumed %v after relay1 restarted, want within 10 s", took.Round(time.Millisecond))
	}
	if err := echo(c1, d1); err != nil {
		t.Errorf("UDP after the restart: %v", err)
	}
}

// testTwoRelays restarts c1's and d1's agents registered with relay1 (host:port) and relay2
// (multiaddr with its peer ID), then kills one relay, restarts it, and kills the other, while c1
// requests d1's service in a loop: every request succeeds.
func (l *natLab) testTwoRelays(t *testing.T) {
	c1, d1 := l.h("c1"), l.h("d1")
	r1, r2 := l.relays[0], l.relays[1]
	if r1.Proc.Exited() {
		r1.Start(t, 20*time.Second)
	}
	for _, h := range []*natHost{c1, d1} {
		if err := h.agent.Stop(10 * time.Second); err != nil {
			t.Errorf("stop %s's agent: %v", h.role, err)
		}
	}
	restart := time.Now()
	for _, h := range []*natHost{c1, d1} {
		l.startAgent(t, h, r1.HostPort(), r2.Multiaddr())
		h.agent.WaitReady(t, 30*time.Second)
	}
	l.waitPath(t, c1, d1, 30*time.Second, "relay")
	l.waitPath(t, d1, c1, 30*time.Second, "relay")
	traffic(t, c1, d1, 20*time.Second)
	t.Logf("c1 and d1 restarted with two relays: relayed traffic flows %v after the restart", time.Since(restart).Round(time.Millisecond))

	lp := loopFetch(c1, d1, 3*time.Second)
	defer lp.Stop()
	for i, r := range []*Relay{r1, r2} {
		lp.WaitSuccess(t, "c1 → d1 requests succeed", time.Now(), 10*time.Second)
		killedAt := time.Now()
		r.Kill(t)
		Eventually(t, 15*time.Second, 100*time.Millisecond, "5 s of c1 → d1 requests after "+r.Name+" died", func() error {
			if rs := lp.Results(); len(rs) == 0 || rs[len(rs)-1].Start.Sub(killedAt) < 5*time.Second {
				return errors.New("still running")
			}
			return nil
		})
		n, failed, gap := Summarize(lp.Results(), killedAt, time.Now())
		t.Logf("%s killed: %d c1 → d1 requests in the next 5 s, %d failed, longest gap between successes %v",
			r.Name, n, len(failed), gap.Round(time.Millisecond))
		for _, f := range failed {
			t.Errorf("c1 → d1 request at %s after %s died failed", f, r.Name)
		}
		if i == 0 {
			// relay1 back before relay2 dies: the agents re-register with it (back-off).
			offset := len(r.Proc.Log())
			r.Start(t, 20*time.Second)
			l.waitRegistered(t, r, offset, 30*time.Second, c1, d1)
		}
	}
	if paths, err := c1.agent.Paths(); err != nil || paths[d1.name].Kind != "relay" {
		t.Errorf("c1 → d1 with relay1 alone: %v %+v, want relay", err, paths[d1.name])
	}
}

// waitRegistered waits until relay r's log, since offset, has a line saying each of hosts
// registered ("node registered ... node=NAME").
func (l *natLab) waitRegistered(t testing.TB, r *Relay, offset int, timeout time.Duration, hosts ...*natHost) {
	t.Helper()
	took := Eventually(t, timeout, 100*time.Millisecond, r.Name+" logs the registration of "+fmt.Sprint(len(hosts))+" nodes", func() error {
		log := r.Proc.Log()
		log = log[min(offset, len(log)):]
		for _, h := range hosts {
			registered := false
			for line := range strings.Lines(log) {
				registered = registered || strings.Contains(line, "registered") && strings.Contains(line, h.name)
			}
			if !registered {
				return fmt.Errorf("no registration of %s in %s's log since its restart:\n%s", h.name, r.Name, tailLines(log, 10))
			}
		}
		return nil
	})
	t.Logf("%s re-registered %d nodes %v after its restart", r.Name, len(hosts), took.Round(time.Millisecond))
}

// testTokenNotLogged: no log of any agent or relay holds the join token.
func (l *natLab) testTokenNotLogged(t *testing.T) {
	logs, err := filepath.Glob(filepath.Join(l.lab.Dir, "*.log"))
	if err != nil || len(logs) == 0 {
		t.Fatalf("no logs in %s: %v", l.lab.Dir, err)
	}
	for _, path := range logs {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(b), l.token) {
			t.Errorf("%s contains the join token", filepath.Base(path))
		}
	}
	t.Logf("join token absent from %d logs", len(logs))
}
