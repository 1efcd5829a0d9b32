package path

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"maps"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/tuntest"

	"github.com/edgewire/edgewire/overlay/path/pathtest"
)

// wgRelayNode is a wireguard-go device behind a hard NAT whose Manager reaches its one peer
// through relays only.
type wgRelayNode struct {
	testNode
	mgr      *Manager
	priv     [32]byte
	pub      [32]byte
	id       uint32
	key      []byte
	lan      netip.AddrPort
	sessions map[int]RelaySession
}

// newWGRelayPair builds two such nodes, registered with every relay of rls but with no session
// yet, and their devices up. Probes every probeInterval: a roaming check comes every 2.5 of them.
func newWGRelayPair(t *testing.T, network *pathtest.Network, rls []*pathtest.Relay, probeInterval time.Duration) [2]*wgRelayNode {
	t.Helper()
	var nodes [2]*wgRelayNode
	for i := range nodes {
		privHex, pubHex := genKeyPair(t)
		n := &wgRelayNode{id: uint32(i + 1), key: bytes.Repeat([]byte{byte(i + 1)}, 32), sessions: map[int]RelaySession{}}
		if _, err := hex.Decode(n.priv[:], []byte(privHex)); err != nil {
			t.Fatal(err)
		}
		if _, err := hex.Decode(n.pub[:], []byte(pubHex)); err != nil {
			t.Fatal(err)
		}
		n.tun = tuntest.NewChannelTUN()
		n.ip = netip.AddrFrom4([4]byte{1, 0, 0, byte(i + 1)})
		nat := network.AddNAT(netip.AddrFrom4([4]byte{203, 0, 113, byte(i + 1)}), pathtest.Hard)
		lanIP := netip.AddrFrom4([4]byte{10, 0, byte(i + 1), 1})
		n.bind = NewBind(Config{Inner: network.NewBind(lanIP, nat)})
		n.spy = &spyBind{Bind: n.bind}
		n.dev = device.NewDevice(n.tun.TUN(), n.spy, &device.Logger{Verbosef: device.DiscardLogf, Errorf: t.Logf})
		t.Cleanup(n.dev.Close)
		dev := n.dev
		n.mgr = NewManager(ManagerConfig{
			Bind: n.bind, PrivateKey: n.priv, PublicKey: n.pub, ProbeInterval: probeInterval,
			SetEndpoint: func(peer [32]byte, ep string, _ Kind) error {
				return dev.IpcSet(fmt.Sprintf("public_key=%x\nupdate_only=true\nendpoint=%s\n", peer, ep))
			},
		})
		n.mgr.prime = nil
		t.Cleanup(func() { n.mgr.Close() })
		for _, rl := range rls {
			rl.Register(n.id, n.key)
		}
		nodes[i] = n
		n.lan = netip.AddrPortFrom(lanIP, 0)
	}
	for i, n := range nodes {
		peer := nodes[i^1]
		uapi := uapiCfg("private_key", fmt.Sprintf("%x", n.priv), "listen_port", "0",
			"replace_peers", "true", "public_key", fmt.Sprintf("%x", peer.pub),
			"allowed_ip", netip.PrefixFrom(peer.ip, 32).String())
		if err := n.dev.IpcSet(uapi); err != nil {
			t.Fatalf("configure %d: %v", i, err)
		}
		if err := n.dev.Up(); err != nil {
			t.Fatalf("up %d: %v", i, err)
		}
		n.lan = netip.AddrPortFrom(n.lan.Addr(), n.bind.Port())
		if err := n.mgr.Start(); err != nil {
			t.Fatal(err)
		}
	}
	for i, n := range nodes {
		peer := nodes[i^1]
		var routes []RelayRoute
		for r := range rls {
			routes = append(routes, RelayRoute{Relay: r, ID: peer.id})
		}
		// No reflexive address: no punch, the relays are the only paths.
		n.mgr.SetPeers([]PeerInfo{{Name: fmt.Sprint("node", i^1), Key: peer.pub, LAN: []netip.AddrPort{peer.lan}, Relays: routes}})
	}
	return nodes
}

// setSessions gives n sessions with the relays of rls named by index.
func (n *wgRelayNode) setSessions(rls []*pathtest.Relay, indexes ...int) {
	var sess []RelaySession
	for _, r := range indexes {
		sess = append(sess, RelaySession{Relay: r, UDPAddr: rls[r].Addr(), ID: n.id, Key: n.key})
	}
	n.mgr.SetRelays(sess)
}

// waitAlive waits until n's relayed candidates through the relays named answer.
func (n *wgRelayNode) waitAlive(t *testing.T, indexes ...int) {
	t.Helper()
	for _, r := range indexes {
		waitUntil(t, fmt.Sprintf("node %d's path through relay %d answers", n.id, r), func() bool {
			for _, p := range n.mgr.Paths() {
				for _, c := range p.Candidates {
					if ap, err := netip.ParseAddrPort(c.Addr); err == nil {
						if rr, _, ok := ParseSynthetic(ap); ok && rr == r && c.Alive {
							return true
						}
					}
				}
			}
			return false
		})
	}
}

// choose makes n's path to its peer the one through relay r.
func (n *wgRelayNode) choose(r int) {
	n.mgr.mu.Lock()
	for _, p := range n.mgr.peers {
		for _, c := range p.cands {
			if c.src == srcRelay && c.relay == r {
				p.chosen = c
			}
		}
	}
	n.mgr.mu.Unlock()
	n.mgr.poke()
}

// wgEndpoint is the endpoint n's wireguard-go uses for its peer.
func (n *wgRelayNode) wgEndpoint(t *testing.T) string {
	t.Helper()
	uapi, err := n.dev.IpcGet()
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(uapi) {
		if ep, ok := strings.CutPrefix(strings.TrimSpace(line), "endpoint="); ok {
			return ep
		}
	}
	return ""
}

// pingWithin sends pings from → to until one comes out of to's TUN or d passes.
func pingWithin(from, to *testNode, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		msg := tuntest.Ping(to.ip, from.ip)
		from.tun.Outbound <- msg
		timer := time.NewTimer(100 * time.Millisecond)
		select {
		case got := <-to.tun.Inbound:
			timer.Stop()
			if bytes.Equal(got, msg) {
				return nil
			}
		case <-timer.C:
		}
	}
	return fmt.Errorf("no ping %v → %v went through within %v", from.ip, to.ip, d)
}

// TestRelayFailureWithDifferentRelays: node 0 sends through relay 0, node 1 through relay 1 (each
// chose the first relay that answered it, as two agents do). wireguard-go roams to the source of
// every datagram; node 1 must not follow node 0's datagrams onto relay 0, or node 1 is left
// sending into relay 0 when it dies, its own choice unchanged, until the next roaming check (NAT
// lab scenario 8: requests through the remaining relay failed for up to 5 s). And when
// wireguard-go did roam before a path was chosen, the death of a relay re-applies the choice at once.
func TestRelayFailureWithDifferentRelays(t *testing.T) {
	// A roaming check comes every 2.5 probe intervals (5 s): what it would repair is too late.
	const probe = 2 * time.Second
	for _, tc := range []struct {
		name string
		roam bool // wireguard-go on node 1 is put on relay 0 by hand, as a roam before a choice would
	}{
		{"datagrams through the other relay do not move wireguard-go", false},
		{"wireguard-go on the dead relay is moved at once", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			network := pathtest.NewNetwork()
			var rls []*pathtest.Relay
			for i := range 2 {
				rl, err := network.NewRelay(netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)}), 3478))
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { rl.Close() })
				rls = append(rls, rl)
			}
			nodes := newWGRelayPair(t, network, rls, probe)
			synth := func(r int, n *wgRelayNode) string { ep, _ := SyntheticEndpoint(r, n.id); return ep.String() }
			for _, n := range nodes {
				n.setSessions(rls, 0, 1)
			}
			for _, n := range nodes {
				n.waitAlive(t, 0, 1)
			}
			// Node 0 sends through relay 0, node 1 through relay 1: two agents get there when each
			// takes the first relay that answered it (both answer now, and the current choice wins
			// ties, so it stays).
			nodes[0].choose(0)
			nodes[1].choose(1)
			waitUntil(t, "node 0 on relay 0 and node 1 on relay 1", func() bool {
				return nodes[0].wgEndpoint(t) == synth(0, nodes[1]) && nodes[1].wgEndpoint(t) == synth(1, nodes[0])
			})
			pair := [2]*testNode{&nodes[0].testNode, &nodes[1].testNode}
			for range 3 {
				pingBothWays(t, pair)
			}
			for i, want := range []string{synth(0, nodes[1]), synth(1, nodes[0])} {
				if got := nodes[i].wgEndpoint(t); got != want {
					t.Fatalf("node %d's wireguard-go moved to %s with its peer's datagrams through the other relay, want it on its own choice %s", i, got, want)
				}
			}
			if tc.roam {
				if err := nodes[1].dev.IpcSet(fmt.Sprintf("public_key=%x\nupdate_only=true\nendpoint=%s\n", nodes[0].pub, synth(0, nodes[0]))); err != nil {
					t.Fatal(err)
				}
			}

			// Relay 0 dies: both nodes lose their session with it.
			rls[0].Close()
			died := time.Now()
			nodes[0].setSessions(rls, 1)
			nodes[1].setSessions(rls, 1)
			limit := probe / 2
			// Node 1 speaks first: a wireguard-go left on relay 0 would have nothing to roam on.
			for i, d := range [][2]*wgRelayNode{{nodes[1], nodes[0]}, {nodes[0], nodes[1]}} {
				if err := pingWithin(&d[0].testNode, &d[1].testNode, limit-time.Since(died)); err != nil {
					t.Fatalf("direction %d after relay 0 died: %v (node 1's wireguard-go endpoint %s)", i, err, nodes[1].wgEndpoint(t))
				}
			}
			t.Logf("both directions through relay 1 %v after relay 0 died", time.Since(died).Round(time.Millisecond))
		})
	}
}

// TestPreferredPaths: the Bind presents a peer's datagrams through a relay as coming from the
// path this node chose, when that path answers: a direct path, or another relay.
func TestPreferredPaths(t *testing.T) {
	ap := netip.MustParseAddrPort
	s0, _ := SyntheticEndpoint(0, 7)
	s1, _ := SyntheticEndpoint(1, 7)
	direct := ap("198.51.100.7:51820")
	tests := []struct {
		name   string
		chosen *candidate // nil: no choice
		want   map[netip.AddrPort]netip.AddrPort
	}{
		{"direct path answers", &candidate{addr: direct, src: srcPunch, alive: true},
			map[netip.AddrPort]netip.AddrPort{s0: direct, s1: direct}},
		{"relay 1 answers", &candidate{addr: s1, src: srcRelay, relay: 1, alive: true},
			map[netip.AddrPort]netip.AddrPort{s0: s1}},
		{"relay 1 has not answered yet", &candidate{addr: s1, src: srcRelay, relay: 1},
			map[netip.AddrPort]netip.AddrPort{}},
		{"unconfirmed LAN guess", &candidate{addr: ap("10.0.0.7:51820"), src: srcLAN},
			map[netip.AddrPort]netip.AddrPort{}},
		{"no choice", nil, map[netip.AddrPort]netip.AddrPort{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := NewBind(Config{Inner: pathtest.NewNetwork().NewBind(netip.MustParseAddr("10.0.0.1"), nil)})
			m := NewManager(ManagerConfig{Bind: b})
			defer m.Close()
			p := &peerState{info: PeerInfo{Name: "peer", Relays: []RelayRoute{{Relay: 0, ID: 7}, {Relay: 1, ID: 7}}}, chosen: tc.chosen}
			m.mu.Lock()
			m.peers[[32]byte{7}] = p
			m.updatePreferredLocked()
			m.mu.Unlock()
			got := map[netip.AddrPort]netip.AddrPort{}
			if pref := b.preferred.Load(); pref != nil {
				got = *pref
			}
			if !maps.Equal(got, tc.want) {
				t.Errorf("preferred %v, want %v", got, tc.want)
			}
		})
	}
}
