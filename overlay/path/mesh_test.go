package path

import (
	"cmp"
	"context"
	"crypto/rand"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/curve25519"
	"golang.zx2c4.com/wireguard/conn"

	"github.com/edgewire/edgewire/overlay/path/pathtest"
)

// testProbeInterval keeps the scenarios quick: alive re-checks every 250ms, misses after 50ms.
const testProbeInterval = 100 * time.Millisecond

// lab is a set of nodes with Managers on a pathtest network, with fake relays.
type lab struct {
	tb     testing.TB
	net    *pathtest.Network
	relays []*pathtest.Relay
	nodes  []*labNode
	// probe is the nodes' ProbeInterval; zero: testProbeInterval.
	probe time.Duration
	// onPunch, when set, is told of every punch request (from the requesting node's Manager).
	onPunch func(from *labNode, peer string)
	// inner, when set, wraps the socket of every node added (a fault injector).
	inner func(name string, b conn.Bind) conn.Bind
}

// labNode is one node: a Bind over a pathtest socket, a receive loop standing in for
// wireguard-go, and a Manager whose SetEndpoint is recorded.
type labNode struct {
	name     string
	priv     [32]byte
	pub      [32]byte
	id       uint32 // node ID on every relay
	key      []byte // relay session key
	lanAddr  netip.Addr
	bind     *Bind
	mgr      *Manager
	loops    sync.WaitGroup
	mu       sync.Mutex // guards all following fields
	endpoint map[[32]byte]string
	sets     map[[32]byte]int // SetEndpoint calls by peer
}

func newLab(tb testing.TB) *lab {
	return &lab{tb: tb, net: pathtest.NewNetwork()}
}

func (l *lab) addRelay(addr string) *pathtest.Relay {
	l.tb.Helper()
	r, err := l.net.NewRelay(netip.MustParseAddrPort(addr))
	if err != nil {
		l.tb.Fatalf("relay: %v", err)
	}
	l.tb.Cleanup(func() { r.Close() })
	l.relays = append(l.relays, r)
	for _, n := range l.nodes {
		r.Register(n.id, n.key)
	}
	return r
}

// addNode adds a node at addr behind nat (nil: public), started.
func (l *lab) addNode(name, addr string, nat *pathtest.NAT) *labNode {
	l.tb.Helper()
	n := &labNode{name: name, id: uint32(len(l.nodes) + 1), lanAddr: netip.MustParseAddr(addr),
		endpoint: map[[32]byte]string{}, sets: map[[32]byte]int{}}
	if _, err := rand.Read(n.priv[:]); err != nil {
		l.tb.Fatal(err)
	}
	pub, err := curve25519.X25519(n.priv[:], curve25519.Basepoint)
	if err != nil {
		l.tb.Fatal(err)
	}
	copy(n.pub[:], pub)
	n.key = make([]byte, 32)
	rand.Read(n.key)
	var inner conn.Bind = l.net.NewBind(n.lanAddr, nat)
	if l.inner != nil {
		inner = l.inner(name, inner)
	}
	n.bind = NewBind(Config{Inner: inner})
	fns, _, err := n.bind.Open(0)
	if err != nil {
		l.tb.Fatalf("open: %v", err)
	}
	for _, fn := range fns {
		n.loops.Add(1)
		go func() {
			defer n.loops.Done()
			bufs, sizes, eps := batch(16)
			for {
				if _, err := fn(bufs, sizes, eps); err != nil {
					return
				}
			}
		}()
	}
	n.mgr = NewManager(ManagerConfig{
		Bind:       n.bind,
		PrivateKey: n.priv,
		PublicKey:  n.pub,
		SetEndpoint: func(peer [32]byte, ep string, _ Kind) error {
			n.mu.Lock()
			n.endpoint[peer] = ep
			n.sets[peer]++
			n.mu.Unlock()
			return nil
		},
		RequestPunch: func(ctx context.Context, r int, peer string) error {
			if l.onPunch != nil {
				l.onPunch(n, peer)
			}
			return l.punch(r, n, peer)
		},
		ProbeInterval: cmp.Or(l.probe, testProbeInterval),
	})
	n.mgr.prime = nil // no raw sockets on the in-memory network
	l.tb.Cleanup(func() {
		n.mgr.Close()
		n.bind.Close()
		n.loops.Wait()
	})
	for _, r := range l.relays {
		r.Register(n.id, n.key)
	}
	l.nodes = append(l.nodes, n)
	if err := n.mgr.Start(); err != nil {
		l.tb.Fatalf("start: %v", err)
	}
	return n
}

func (n *labNode) lan() netip.AddrPort { return netip.AddrPortFrom(n.lanAddr, n.bind.Port()) }

func (n *labNode) applied(peer *labNode) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.endpoint[peer.pub]
}

// setCount is how many times n's Manager called SetEndpoint for peer.
func (n *labNode) setCount(peer *labNode) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.sets[peer.pub]
}

// path is n's path to peer as Paths reports it.
func (n *labNode) path(peer *labNode) PeerPath {
	for _, p := range n.mgr.Paths() {
		if p.Key == peer.pub {
			return p
		}
	}
	return PeerPath{}
}

// connect gives every node its relay sessions, waits for the BINDs, and gives every node the
// directory (LAN address, reflexive address from relay 0, routes on every relay).
func (l *lab) connect() {
	l.tb.Helper()
	for _, n := range l.nodes {
		var sess []RelaySession
		for i, r := range l.relays {
			sess = append(sess, RelaySession{Relay: i, UDPAddr: r.Addr(), ID: n.id, Key: n.key})
		}
		n.mgr.SetRelays(sess)
	}
	for _, n := range l.nodes {
		for i, r := range l.relays {
			waitUntil(l.tb, fmt.Sprintf("%s bound on relay %d", n.name, i), func() bool {
				_, ok := r.Bound(n.id)
				return ok && n.mgr.Reflexive().IsValid()
			})
		}
	}
	l.directory()
}

func (l *lab) directory() {
	for _, n := range l.nodes {
		var peers []PeerInfo
		for _, o := range l.nodes {
			if o == n {
				continue
			}
			info := PeerInfo{Name: o.name, Key: o.pub, LAN: []netip.AddrPort{o.lan()}}
			if len(l.relays) > 0 {
				info.Reflexive, _ = l.relays[0].Bound(o.id)
			}
			for i := range l.relays {
				info.Relays = append(info.Relays, RelayRoute{Relay: i, ID: o.id})
			}
			peers = append(peers, info)
		}
		n.mgr.SetPeers(peers)
	}
}

// punch plays the relay's punch coordination: both sides get the signal, the requester's peer a
// little later.
func (l *lab) punch(r int, from *labNode, peer string) error {
	var to *labNode
	for _, n := range l.nodes {
		if n.name == peer {
			to = n
		}
	}
	if to == nil {
		return fmt.Errorf("no peer %s", peer)
	}
	fromRefl, _ := l.relays[r].Bound(from.id)
	toRefl, _ := l.relays[r].Bound(to.id)
	from.mgr.OnPunch(r, Punch{Peer: to.name, PeerReflexive: toRefl, PeerLAN: []netip.AddrPort{to.lan()}})
	to.mgr.OnPunch(r, Punch{Peer: from.name, PeerReflexive: fromRefl, PeerLAN: []netip.AddrPort{from.lan()}, Delay: 10 * time.Millisecond})
	return nil
}

// waitPath waits until n's path to peer has kind want and that endpoint was applied.
func waitPath(tb testing.TB, n, peer *labNode, want Kind) PeerPath {
	tb.Helper()
	var p PeerPath
	waitUntil(tb, fmt.Sprintf("%s → %s path %s", n.name, peer.name, want), func() bool {
		p = n.path(peer)
		return p.Kind == want && p.Addr != "" && n.applied(peer) == p.Addr
	})
	return p
}

func TestPathChoice(t *testing.T) {
	tests := []struct {
		name       string
		build      func(l *lab) (a, b *labNode)
		wantA      Kind
		wantB      Kind
		wantAddrA  func(a, b *labNode) string // "" → any
		stableKind bool                       // the kind must hold for a while (no upgrade possible)
	}{
		{
			name: "same LAN",
			build: func(l *lab) (*labNode, *labNode) {
				nat := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Easy)
				return l.addNode("a", "10.0.0.1", nat), l.addNode("b", "10.0.0.2", nat)
			},
			wantA: KindLAN, wantB: KindLAN,
			wantAddrA: func(a, b *labNode) string { return b.lan().String() },
		},
		{
			name: "easy to easy punches direct",
			build: func(l *lab) (*labNode, *labNode) {
				n1 := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Easy)
				n2 := l.net.AddNAT(netip.MustParseAddr("203.0.113.2"), pathtest.Easy)
				return l.addNode("a", "10.0.1.1", n1), l.addNode("b", "10.0.2.1", n2)
			},
			wantA: KindDirect, wantB: KindDirect,
		},
		{
			name: "easy to hard stays relayed",
			build: func(l *lab) (*labNode, *labNode) {
				n1 := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Easy)
				n2 := l.net.AddNAT(netip.MustParseAddr("203.0.113.2"), pathtest.Hard)
				return l.addNode("a", "10.0.1.1", n1), l.addNode("b", "10.0.2.1", n2)
			},
			wantA: KindRelay, wantB: KindRelay, stableKind: true,
		},
		{
			name: "hard to hard stays relayed",
			build: func(l *lab) (*labNode, *labNode) {
				n1 := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Hard)
				n2 := l.net.AddNAT(netip.MustParseAddr("203.0.113.2"), pathtest.Hard)
				return l.addNode("a", "10.0.1.1", n1), l.addNode("b", "10.0.2.1", n2)
			},
			wantA: KindRelay, wantB: KindRelay, stableKind: true,
			wantAddrA: func(a, b *labNode) string {
				ep, _ := SyntheticEndpoint(0, b.id)
				return ep.String()
			},
		},
		{
			name: "hard edge to public cloud learns peer-reflexive",
			build: func(l *lab) (*labNode, *labNode) {
				n1 := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Hard)
				return l.addNode("edge", "10.0.1.1", n1), l.addNode("cloud", "198.51.100.10", nil)
			},
			wantA: KindLAN, wantB: KindDirect, // the cloud's LAN address is public
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			l.addRelay("192.0.2.1:3478")
			a, b := tc.build(l)
			l.connect()
			pa := waitPath(t, a, b, tc.wantA)
			waitPath(t, b, a, tc.wantB)
			if tc.wantAddrA != nil {
				if want := tc.wantAddrA(a, b); pa.Addr != want {
					t.Errorf("a's endpoint for b = %s, want %s", pa.Addr, want)
				}
			}
			if tc.stableKind {
				deadline := time.Now().Add(20 * testProbeInterval)
				for time.Now().Before(deadline) {
					if k := a.path(b).Kind; k != tc.wantA {
						t.Fatalf("path changed to %s, want it to stay %s", k, tc.wantA)
					}
					time.Sleep(testProbeInterval / 2)
				}
				if n := a.mgr.Stats().Punches; n == 0 {
					t.Errorf("no punch was attempted")
				}
			}
			if tc.name == "hard edge to public cloud learns peer-reflexive" {
				found := false
				for _, c := range b.path(a).Candidates {
					found = found || (c.Source == "peer-reflexive" && c.Alive)
				}
				if !found {
					t.Errorf("cloud has no alive peer-reflexive candidate: %+v", b.path(a).Candidates)
				}
			}
		})
	}
}

// TestDirectDiesAndReturns breaks a punched direct path: both sides fall back to the relay, then
// upgrade again once the direct path answers.
func TestDirectDiesAndReturns(t *testing.T) {
	l := newLab(t)
	l.addRelay("192.0.2.1:3478")
	n1 := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Easy)
	n2 := l.net.AddNAT(netip.MustParseAddr("203.0.113.2"), pathtest.Easy)
	a, b := l.addNode("a", "10.0.1.1", n1), l.addNode("b", "10.0.2.1", n2)
	l.connect()
	waitPath(t, a, b, KindDirect)
	waitPath(t, b, a, KindDirect)

	relayAddr := l.relays[0].Addr()
	l.net.SetDrop(func(from, to netip.AddrPort) bool { return from != relayAddr && to != relayAddr })
	start := time.Now()
	waitPath(t, a, b, KindRelay)
	waitPath(t, b, a, KindRelay)
	t.Logf("fell back to the relay in %v", time.Since(start))

	l.net.SetDrop(nil)
	start = time.Now()
	waitPath(t, a, b, KindDirect)
	waitPath(t, b, a, KindDirect)
	t.Logf("upgraded again in %v", time.Since(start))
}

// TestTwoRelaysOneDies kills one relay of two: relayed peers move to the other.
func TestTwoRelaysOneDies(t *testing.T) {
	l := newLab(t)
	l.addRelay("192.0.2.1:3478")
	l.addRelay("192.0.2.2:3478")
	n1 := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Hard)
	n2 := l.net.AddNAT(netip.MustParseAddr("203.0.113.2"), pathtest.Hard)
	a, b := l.addNode("a", "10.0.1.1", n1), l.addNode("b", "10.0.2.1", n2)
	l.connect()
	var p PeerPath
	waitUntil(t, "a relayed path that answers", func() bool {
		p = a.path(b)
		return p.Kind == KindRelay && !p.LastPong.IsZero() && a.applied(b) == p.Addr
	})
	used, _, _ := ParseSynthetic(netip.MustParseAddrPort(p.Addr))
	l.relays[used].Close()
	start := time.Now()
	want, _ := SyntheticEndpoint(1-used, b.id)
	waitUntil(t, "a to move to the other relay", func() bool {
		p := a.path(b)
		return p.Kind == KindRelay && p.Addr == want.String() && a.applied(b) == want.String()
	})
	t.Logf("moved to the other relay in %v", time.Since(start))
}

func TestPing(t *testing.T) {
	l := newLab(t)
	l.addRelay("192.0.2.1:3478")
	n1 := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Easy)
	n2 := l.net.AddNAT(netip.MustParseAddr("203.0.113.2"), pathtest.Easy)
	a, b := l.addNode("a", "10.0.1.1", n1), l.addNode("b", "10.0.2.1", n2)
	// Direct datagrams are dropped until the relayed pings are done.
	relayAddr := l.relays[0].Addr()
	l.net.SetDrop(func(from, to netip.AddrPort) bool { return from != relayAddr && to != relayAddr })
	l.connect()
	waitPath(t, a, b, KindRelay)
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()

	var got []PingResult
	if err := a.mgr.Ping(ctx, "b", 3, false, func(r PingResult) { got = append(got, r) }); err != nil {
		t.Fatalf("Ping: %v", err)
	}
	synth, _ := SyntheticEndpoint(0, b.id)
	if len(got) != 3 {
		t.Fatalf("got %d results, want 3", len(got))
	}
	for i, r := range got {
		if r.Seq != i+1 || r.Kind != KindRelay || r.Addr != synth.String() || r.Err != nil || r.RTT <= 0 {
			t.Errorf("result %d = %+v, want relay via %s with an RTT", i, r, synth)
		}
	}

	l.net.SetDrop(nil)
	got = nil
	if err := a.mgr.Ping(ctx, "b", 0, true, func(r PingResult) { got = append(got, r) }); err != nil {
		t.Fatalf("Ping --until-direct: %v (results %+v)", err, got)
	}
	last := got[len(got)-1]
	if last.Kind != KindDirect || last.Err != nil || last.Addr == synth.String() {
		t.Errorf("last result %+v, want a direct pong", last)
	}

	if err := a.mgr.Ping(ctx, "nobody", 1, false, nil); err == nil {
		t.Errorf("Ping of an unknown peer succeeded")
	}
}

// TestMalformedCounted sends bad frames to a node's socket: each is counted, none hurts the path.
func TestMalformedCounted(t *testing.T) {
	l := newLab(t)
	l.addRelay("192.0.2.1:3478")
	nat := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Easy)
	a, b := l.addNode("a", "10.0.0.1", nat), l.addNode("b", "10.0.0.2", nat)
	l.connect()
	waitPath(t, a, b, KindLAN)
	bad, err := l.net.ListenPacket(netip.MustParseAddrPort("10.0.0.9:999"), nat)
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	var stranger [32]byte
	stranger[0] = 9
	tests := []struct {
		name  string
		pkt   []byte
		field func(ManagerStats) uint64
	}{
		{"not a frame", []byte("hello"), func(s ManagerStats) uint64 { return s.Malformed }},
		{"oversized", append(relayPing(b.pub, 1, b.key), make([]byte, 200)...), func(s ManagerStats) uint64 { return s.Malformed }},
		{"truncated ping", relayPing(b.pub, 1, b.key)[:20], func(s ManagerStats) uint64 { return s.Malformed }},
		{"ping from a stranger", relayPing(stranger, 1, b.key), func(s ManagerStats) uint64 { return s.UnknownSender }},
		{"ping with a bad MAC", relayPing(b.pub, 1, make([]byte, 32)), func(s ManagerStats) uint64 { return s.BadMAC }},
		{"bindack from a stranger", relayBindAck(7, bad.Addr()), func(s ManagerStats) uint64 { return s.BadMAC }},
		{"unknown frame type", []byte{0xE7, 0x77, 1, 0x7f}, func(s ManagerStats) uint64 { return s.Malformed }},
		{"data from a stranger", append(relayDataHeader(b.id), wgMsg(wgTypeTransport, 32)...), func(s ManagerStats) uint64 { return s.Malformed }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := tc.field(a.mgr.Stats())
			if err := bad.WriteTo(tc.pkt, a.lan()); err != nil {
				t.Fatal(err)
			}
			waitUntil(t, "the counter to move", func() bool { return tc.field(a.mgr.Stats()) == before+1 })
		})
	}
	if p := a.path(b); p.Kind != KindLAN {
		t.Errorf("path after junk = %s, want lan", p.Kind)
	}
}

// TestManagerLifecycle: New starts nothing, Close is idempotent, a closed Manager refuses Start.
func TestManagerLifecycle(t *testing.T) {
	b := NewBind(Config{Inner: pathtest.NewNetwork().NewBind(netip.MustParseAddr("10.0.0.1"), nil)})
	m := NewManager(ManagerConfig{Bind: b, SetEndpoint: func([32]byte, string, Kind) error { return nil }})
	if err := m.Close(); err != nil {
		t.Fatalf("Close before Start: %v", err)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := m.Start(); err == nil {
		t.Fatal("Start after Close succeeded")
	}
	if h := b.handler(); h != nil {
		t.Error("a closed Manager is still the Bind's handler")
	}
	if err := NewManager(ManagerConfig{Bind: b}).Start(); err == nil {
		t.Fatal("Start without SetEndpoint succeeded")
	}
}

var _ conn.Bind = (*pathtest.Bind)(nil)
