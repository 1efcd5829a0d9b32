package overlay

import (
	"net/netip"
	"testing"

	"github.com/edgewire/edgewire/overlay/path/pathtest"
	"github.com/edgewire/edgewire/relay"
)

const testJoinToken = "engine-test-token"

// testRelay is a real mesh-relay in this process: its control plane is libp2p over loopback TCP,
// and its datagram socket is reached from the in-memory network through a pathtest.Bridge at the
// address the relay client derives (127.0.0.1, the relay's port).
type testRelay struct {
	srv    *relay.Server
	bridge *pathtest.Bridge
	addr   string // multiaddr with /p2p/
}

// startRelay starts a relay on 127.0.0.1 with state in dir and port (0: any) and bridges its UDP
// socket into n.
func startRelay(t *testing.T, n *pathtest.Network, dir string, port uint16) *testRelay {
	t.Helper()
	srv, err := relay.NewServer(relay.ServerConfig{
		Logger:     testLogger(t, "relay"),
		ListenAddr: netip.MustParseAddr("127.0.0.1"),
		ListenPort: port,
		JoinToken:  testJoinToken,
		StateDir:   dir,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	udp := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), srv.Port())
	br, err := n.NewBridge(udp, udp, 16)
	if err != nil {
		srv.Close()
		t.Fatal(err)
	}
	r := &testRelay{srv: srv, bridge: br, addr: srv.Multiaddrs()[0]}
	t.Cleanup(r.close)
	return r
}

// close stops the relay and its bridge; later calls do nothing.
func (r *testRelay) close() {
	if r.srv == nil {
		return
	}
	r.srv.Close()
	r.bridge.Close()
	r.srv = nil
}

// natTrio is a, b and c each behind a NAT of its own: a and b behind easy NATs (a punch joins
// them), c behind a hard one (only a relay reaches it).
func natTrio(t *testing.T) *trio {
	n := pathtest.NewNetwork()
	natA := n.AddNAT(addr("203.0.113.1"), pathtest.Easy)
	natB := n.AddNAT(addr("203.0.113.2"), pathtest.Easy)
	natC := n.AddNAT(addr("203.0.113.3"), pathtest.Hard)
	return &trio{
		net: n,
		a:   newTestAgent(t, "node-a", ap("10.1.0.1:51820"), natA, addr("192.168.50.1")),
		b:   newTestAgent(t, "node-b", ap("10.2.0.1:51820"), natB, addr("192.168.50.2")),
		c:   newTestAgent(t, "node-c", ap("10.3.0.1:51820"), natC, addr("192.168.50.3")),
	}
}

// TestEngineRelay runs three agents behind NATs with a relay: a and b punch a direct path, c is
// reached through the relay; cutting a-b's direct datagrams moves their path to the relay and
// mending it moves it back, traffic flowing in each phase; when the relay goes away the direct
// path carries on, and when it comes back at the same address the agents register again.
func TestEngineRelay(t *testing.T) {
	tr := natTrio(t)
	relayDir := t.TempDir()
	r := startRelay(t, tr.net, relayDir, 0)
	port := r.srv.Port()
	for _, ta := range tr.agents() {
		cfg := ta.config(t, tr.net)
		cfg.Relays = []string{r.addr}
		cfg.JoinToken = testJoinToken
		ta.src.snaps <- tr.catalog()
		ta.start(t, cfg)
	}
	for _, ta := range tr.agents() {
		ta.waitUp(t)
		ta.echoOn(t, echoPort)
	}
	a, b, c := tr.a, tr.b, tr.c
	waitPath := func(t *testing.T, from, to *testAgent, kind string) {
		t.Helper()
		waitCond(t, from.name+"'s path to "+to.name+" is "+kind, func() bool { return from.pathTo(to) == kind })
	}
	// cut drops the datagrams between a's and b's NATs: their direct path, not the relay's.
	cut := func(from, to netip.AddrPort) bool {
		pa, pb := addr("203.0.113.1"), addr("203.0.113.2")
		return (from.Addr() == pa && to.Addr() == pb) || (from.Addr() == pb && to.Addr() == pa)
	}

	steps := []struct {
		name string
		do   func(t *testing.T)
	}{
		{"a and b punch a direct path", func(t *testing.T) {
			a.waitReach(t, b, echoPort)
			waitPath(t, a, b, "direct")
			waitPath(t, b, a, "direct")
			a.waitReach(t, b, echoPort)
		}},
		{"c behind the hard NAT is relayed", func(t *testing.T) {
			a.waitReach(t, c, echoPort)
			c.waitReach(t, b, echoPort)
			waitPath(t, a, c, "relay")
		}},
		{"direct to relay when the direct path is cut", func(t *testing.T) {
			tr.net.SetDrop(cut)
			waitPath(t, a, b, "relay")
			a.waitReach(t, b, echoPort)
			b.waitReach(t, a, echoPort)
		}},
		{"relay to direct when it is mended", func(t *testing.T) {
			tr.net.SetDrop(nil)
			waitPath(t, a, b, "direct")
			a.waitReach(t, b, echoPort)
		}},
		{"the relay goes away: the direct path carries on", func(t *testing.T) {
			r.close()
			waitCond(t, "a's relay session down", func() bool { return len(a.agent.meshP.Load().relays.Sessions()) == 0 })
			a.waitReach(t, b, echoPort)
			if k := a.pathTo(b); k != "direct" {
				t.Errorf("a's path to b is %s, want direct", k)
			}
		}},
		{"the relay comes back at its address: the agents register again", func(t *testing.T) {
			r = startRelay(t, tr.net, relayDir, port)
			for _, ta := range tr.agents() {
				waitCond(t, ta.name+" registered again", func() bool { return len(ta.agent.meshP.Load().relays.Sessions()) == 1 })
			}
			a.waitReach(t, c, echoPort)
		}},
	}
	for _, st := range steps {
		if !t.Run(st.name, st.do) {
			return
		}
	}
}

// TestEngineRelayFromCatalog starts agents with no relay of their own and a catalog that names
// one (as the Kubernetes source does from the relay Secret): they register with it, and c behind
// the hard NAT is reached through it.
func TestEngineRelayFromCatalog(t *testing.T) {
	tr := natTrio(t)
	r := startRelay(t, tr.net, t.TempDir(), 0)
	cat := tr.catalog()
	cat.Relays = []string{r.addr}
	for _, ta := range tr.agents() {
		cfg := ta.config(t, tr.net)
		cfg.JoinToken = testJoinToken
		ta.src.snaps <- cloneSnapshot(cat) // apply assigns service IPs in place
		ta.start(t, cfg)
	}
	for _, ta := range tr.agents() {
		m := ta.waitUp(t)
		ta.echoOn(t, echoPort)
		waitCond(t, ta.name+" registered", func() bool { return m.relays != nil && len(m.relays.Sessions()) == 1 })
	}
	tr.a.waitReach(t, tr.c, echoPort)
	tr.c.waitReach(t, tr.b, echoPort)
	if k := tr.a.pathTo(tr.c); k != "relay" {
		t.Errorf("a's path to c is %s, want relay", k)
	}
	st := (*backend)(tr.a.agent).Status()
	if len(st.Relays) != 1 || len(st.Peers) != 2 {
		t.Errorf("a's status: relays %v, %d peers; want 1 relay session and 2 peers", st.Relays, len(st.Peers))
	}
}
