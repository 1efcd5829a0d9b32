package overlay

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/path/pathtest"
)

var (
	ap   = netip.MustParseAddrPort
	addr = netip.MustParseAddr
)

// echoPort is where each test host serves a TCP echo on its overlay address.
const echoPort = 7000

// trio is the engine tests' mesh: a and b on one LAN behind an easy NAT, c on the public internet.
type trio struct {
	net     *pathtest.Network
	a, b, c *testAgent
}

func newTrio(t *testing.T) *trio {
	n := pathtest.NewNetwork()
	lan := n.AddNAT(addr("203.0.113.1"), pathtest.Easy)
	return &trio{
		net: n,
		a:   newTestAgent(t, "node-a", ap("10.1.0.1:51820"), lan, addr("192.168.50.1")),
		b:   newTestAgent(t, "node-b", ap("10.1.0.2:51820"), lan, addr("192.168.50.2")),
		c:   newTestAgent(t, "node-c", ap("198.51.100.3:51820"), nil, addr("192.168.50.3")),
	}
}

func (tr *trio) agents() []*testAgent { return []*testAgent{tr.a, tr.b, tr.c} }

// catalog is the snapshot every agent gets: the three nodes and a service "echo" with one
// endpoint on a (10.77.0.1:8080), so that a's service flows end at a local endpoint.
func (tr *trio) catalog() *discovery.Snapshot {
	return &discovery.Snapshot{
		Nodes: []*discovery.Node{tr.a.node(), tr.b.node(), tr.c.node()},
		Services: []*discovery.Service{{
			Namespace: "default", Name: "echo",
			Ports: []discovery.ServicePort{{Name: "tcp", Protocol: discovery.TCP, Port: 80, TargetPort: 8080}},
			Endpoints: []discovery.Endpoint{
				{Addresses: []netip.Addr{addr("10.77.0.1")}, NodeName: tr.a.name, Ready: true},
			},
		}},
	}
}

// startAll gives each agent the catalog and starts it, and waits until all are up.
func (tr *trio) startAll(t *testing.T) {
	for _, ta := range tr.agents() {
		ta.src.snaps <- tr.catalog()
		ta.start(t, ta.config(t, tr.net))
	}
	for _, ta := range tr.agents() {
		ta.waitUp(t)
		ta.echoOn(t, echoPort)
	}
}

// freeUDPPort returns a UDP port that is free on all addresses now.
func freeUDPPort(t *testing.T) uint16 {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return uint16(c.LocalAddr().(*net.UDPAddr).Port)
}

// loopbackTrio is the trio with real WireGuard sockets (wireguard-go's StdNetBind) on free ports,
// reached at 127.0.0.1: the same engine over real sockets, as wireguard-go's genTestPair does.
func loopbackTrio(t *testing.T) *trio {
	tr := &trio{net: pathtest.NewNetwork()}
	for i, p := range []**testAgent{&tr.a, &tr.b, &tr.c} {
		sock := netip.AddrPortFrom(addr("127.0.0.1"), freeUDPPort(t))
		*p = newTestAgent(t, fmt.Sprintf("node-%c", 'a'+i), sock, nil, netip.AddrFrom4([4]byte{192, 168, 50, byte(i + 1)}))
		(*p).real = true
	}
	return tr
}

// TestEngineRealSockets runs the three agents with real UDP sockets on loopback: every pair
// reaches the other over WireGuard on the published endpoint (kind lan).
func TestEngineRealSockets(t *testing.T) {
	tr := loopbackTrio(t)
	tr.startAll(t)
	pairs := []struct {
		name     string
		from, to *testAgent
	}{
		{"a to b", tr.a, tr.b}, {"b to c", tr.b, tr.c}, {"c to a", tr.c, tr.a},
	}
	for _, tc := range pairs {
		t.Run(tc.name, func(t *testing.T) {
			tc.from.waitReach(t, tc.to, echoPort)
			if k := tc.from.pathTo(tc.to); k != "lan" {
				t.Errorf("path %s, want lan", k)
			}
		})
	}
}

// TestEngineThreeAgents starts three agents in one process and checks that traffic flows: between
// overlay addresses through WireGuard over the in-memory network (LAN, and through a NAT to a
// public node), from a host to a service IP through the service netstack and the proxy to a local
// endpoint, DNS on the netstack, /readyz, and the WireGuard UAPI socket.
func TestEngineThreeAgents(t *testing.T) {
	tr := newTrio(t)
	tr.startAll(t)
	a, b, c := tr.a, tr.b, tr.c

	t.Run("overlay", func(t *testing.T) {
		tests := []struct {
			name     string
			from, to *testAgent
			kind     string
		}{
			{"a to b on their LAN", a, b, "lan"},
			{"b to a on their LAN", b, a, "lan"},
			// c's published endpoint is a candidate of kind lan (a node lists its LAN addresses
			// first); c learns a's NAT mapping from a's probes (peer-reflexive: direct).
			{"a behind the NAT to public c", a, c, "lan"},
			{"public c back to a behind the NAT", c, a, "direct"},
			{"b to c", b, c, "lan"},
			{"c to b", c, b, "direct"},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				tc.from.waitReach(t, tc.to, echoPort)
				waitCond(t, fmt.Sprintf("%s's path to %s is %s", tc.from.name, tc.to.name, tc.kind), func() bool {
					return tc.from.pathTo(tc.to) == tc.kind
				})
			})
		}
	})

	t.Run("service flow to a local endpoint", func(t *testing.T) {
		svcIP := a.agent.snap.Load().Services[0].IP
		if !svcIP.IsValid() {
			t.Fatal("service echo got no IP")
		}
		before := a.local.dials.Load()
		if err := a.roundTrip(netip.AddrPortFrom(svcIP, 80), "through the proxy", 10*time.Second); err != nil {
			t.Fatalf("flow to %s:80: %v", svcIP, err)
		}
		if got := a.local.dials.Load() - before; got < 1 {
			t.Errorf("the proxy dialled %d local endpoints, want at least 1", got)
		}
	})

	t.Run("dns on the netstack", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, err := a.host.Load().DialContext(ctx, "udp", netip.AddrPortFrom(a.agent.cfg.DNSIP, 53).String())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		q := new(mdns.Msg)
		q.SetQuestion("echo.default.svc.cluster.local.", mdns.TypeA)
		co := &mdns.Conn{Conn: conn}
		if err := co.WriteMsg(q); err != nil {
			t.Fatal(err)
		}
		r, err := co.ReadMsg()
		if err != nil {
			t.Fatal(err)
		}
		want := a.agent.snap.Load().Services[0].IP
		if len(r.Answer) != 1 || r.Answer[0].(*mdns.A).A.String() != want.String() {
			t.Fatalf("answer %v, want one A record %s", r.Answer, want)
		}
	})

	t.Run("readyz", func(t *testing.T) {
		waitCond(t, "a ready", func() bool {
			resp, err := http.Get("http://" + a.agent.health.Addr().String() + "/readyz")
			if err != nil {
				return false
			}
			defer resp.Body.Close()
			_, _ = io.Copy(io.Discard, resp.Body)
			return resp.StatusCode == http.StatusOK
		})
	})

	t.Run("UAPI socket", func(t *testing.T) {
		// What `wg show` does: get=1 on the UAPI socket, the device's state back as key=value lines.
		c, err := net.Dial("unix", filepath.Join(a.dir, a.agent.cfg.WGInterface+".sock"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, "get=1\n\n"); err != nil {
			t.Fatal(err)
		}
		var peers, errno int
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			line := sc.Text()
			if line == "" {
				break
			}
			if strings.HasPrefix(line, "public_key=") {
				peers++
			}
			if line == "errno=0" {
				errno++
			}
		}
		if peers != 2 || errno != 1 {
			t.Errorf("UAPI get: %d peers, errno=0 seen %d times; want 2 peers and errno=0", peers, errno)
		}
	})

	t.Run("wg show", func(t *testing.T) {
		di, err := (*backend)(a.agent).WireGuard()
		if err != nil {
			t.Fatal(err)
		}
		if len(di.Peers) != 2 {
			t.Fatalf("a has %d WireGuard peers, want 2 (b and c): %+v", len(di.Peers), di.Peers)
		}
		for _, p := range di.Peers {
			if p.LatestHandshake.IsZero() {
				t.Errorf("peer %s: no handshake", p.Node)
			}
		}
	})
}

// stormSource is a catalog source that, after its first snapshot, applies snapshots without pause
// until stop is closed, alternating between the full catalog and one without node b (so every
// second one adds a WireGuard peer and the next removes it). It counts the updates it applied while
// the agent's mesh was not up yet: the ones that today's engine had to keep for later.
type stormSource struct {
	first, without *discovery.Snapshot
	agent          func() *Agent
	stop           chan struct{}
	duringStart    int // updates applied before the mesh was up; read after stop
	done           chan struct{}
}

func (s *stormSource) Run(ctx context.Context, update func(*discovery.Snapshot)) error {
	defer close(s.done)
	update(s.first)
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return nil
		case <-s.stop:
			<-ctx.Done()
			return nil
		default:
		}
		up := s.agent().meshP.Load() != nil
		snap := s.first
		if i%2 == 0 {
			snap = s.without
		}
		// A fresh copy each time: apply assigns service IPs in place.
		update(cloneSnapshot(snap))
		if !up {
			s.duringStart++
		}
	}
}

func cloneSnapshot(s *discovery.Snapshot) *discovery.Snapshot {
	c := &discovery.Snapshot{Nodes: s.Nodes, Relays: s.Relays}
	for _, svc := range s.Services {
		cp := *svc
		c.Services = append(c.Services, &cp)
	}
	return c
}

// TestEngineCatalogDuringStart applies catalog updates without pause while the agent starts: the
// mesh must never see one before it is up (run with -race: the engine used to publish the mesh
// before start had set its device, Bind and path manager, which the updates read), and once up it
// must hold the latest snapshot, and the WireGuard peers of it.
func TestEngineCatalogDuringStart(t *testing.T) {
	tr := newTrio(t)
	a := tr.a
	full := tr.catalog()
	without := tr.catalog()
	without.Nodes = []*discovery.Node{tr.a.node(), tr.c.node()}
	src := &stormSource{first: full, without: without, agent: func() *Agent { return a.agent },
		stop: make(chan struct{}), done: make(chan struct{})}
	cfg := a.config(t, tr.net)
	cfg.Source = src
	a.start(t, cfg)
	m := a.waitUp(t)
	close(src.stop)
	a.stop(t)
	<-src.done
	if src.duringStart == 0 {
		t.Fatal("no update arrived while the agent started: the test checked nothing")
	}
	t.Logf("%d catalog updates arrived while the agent started", src.duringStart)
	last := a.agent.snap.Load()
	m.mu.Lock()
	got := m.snap
	peers := len(m.peers)
	m.mu.Unlock()
	if got != last {
		t.Errorf("the mesh holds a snapshot with %d nodes, not the agent's latest (%d nodes)", len(got.Nodes), len(last.Nodes))
	}
	if want := len(last.Nodes) - 1; peers != want {
		t.Errorf("the mesh has %d WireGuard peers, want %d (the latest snapshot's nodes but itself)", peers, want)
	}
}
