package path

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/edgewire/edgewire/overlay/path/pathtest"
)

// TestPunchRequestSchedule drives maybeRequestPunchLocked with a fixed clock: when the first
// request goes out (LAN peers later than others), the back-off after one, what keeps a request
// back for good, and the due time it reports when only time does.
func TestPunchRequestSchedule(t *testing.T) {
	t0 := time.Unix(1000, 0)
	tm := newTiming(DefaultProbeInterval)
	ap := netip.MustParseAddrPort
	tests := []struct {
		name    string
		lan     string        // the peer's LAN address
		at      time.Duration // now, after the peer appeared
		last    time.Duration // the last request, after the peer appeared; -1: none
		bound   bool          // the relay session is bound
		direct  bool          // an alive direct candidate
		force   bool
		wantReq bool
		wantDue time.Duration // after the peer appeared; -1: zero
	}{
		{name: "peer behind another NAT waits punchFirst", lan: "192.168.2.7:51820", at: time.Millisecond, last: -1, bound: true,
			wantDue: tm.punchFirst},
		{name: "peer behind another NAT after punchFirst", lan: "192.168.2.7:51820", at: tm.punchFirst, last: -1, bound: true,
			wantReq: true, wantDue: -1},
		{name: "peer on this node's LAN waits punchFirstLAN", lan: "192.168.1.7:51820", at: tm.punchFirst, last: -1, bound: true,
			wantDue: tm.punchFirstLAN},
		{name: "peer on this node's LAN after punchFirstLAN", lan: "192.168.1.7:51820", at: tm.punchFirstLAN, last: -1, bound: true,
			wantReq: true, wantDue: -1},
		{name: "back-off after a request", lan: "192.168.2.7:51820", at: 3 * time.Second, last: time.Second, bound: true,
			wantDue: time.Second + tm.punchBackoff},
		{name: "back-off over", lan: "192.168.2.7:51820", at: time.Second + tm.punchBackoff, last: time.Second, bound: true,
			wantReq: true, wantDue: -1},
		{name: "no bound relay: nothing to wait for", lan: "192.168.2.7:51820", at: time.Millisecond, last: -1,
			wantDue: -1},
		{name: "alive direct path: no punch", lan: "192.168.2.7:51820", at: time.Hour, last: -1, bound: true, direct: true,
			wantDue: -1},
		{name: "ping --until-direct does not wait", lan: "192.168.1.7:51820", at: time.Millisecond, last: -1, bound: true, force: true,
			wantReq: true, wantDue: -1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var requested []string
			b := NewBind(Config{Inner: pathtest.NewNetwork().NewBind(netip.MustParseAddr("192.168.1.11"), nil)})
			m := NewManager(ManagerConfig{Bind: b, SetEndpoint: func([32]byte, string, Kind) error { return nil },
				RequestPunch: func(_ context.Context, _ int, peer string) error {
					mu.Lock()
					requested = append(requested, peer)
					mu.Unlock()
					return nil
				}})
			defer m.Close()
			m.onLink.interfaces = func() ([]InterfacePrefix, error) {
				return []InterfacePrefix{{"eth0", netip.MustParsePrefix("192.168.1.11/24")}}, nil
			}
			synth, _ := SyntheticEndpoint(0, 7)
			p := &peerState{added: t0,
				info:  PeerInfo{Name: "peer", LAN: []netip.AddrPort{ap(tc.lan)}, Reflexive: ap("203.0.113.9:51820")},
				cands: []*candidate{{addr: ap("203.0.113.9:51820"), src: srcReflexive, alive: tc.direct}, {addr: synth, src: srcRelay}}}
			if tc.last >= 0 {
				p.lastPunchReq = t0.Add(tc.last)
			}
			m.mu.Lock()
			m.started = true
			m.relays[0] = &relayState{bound: tc.bound}
			due := m.maybeRequestPunchLocked(p, t0.Add(tc.at), tc.force)
			req := p.lastPunchReq.Equal(t0.Add(tc.at))
			m.mu.Unlock()
			m.Close() // waits for the request's goroutine
			if req != tc.wantReq {
				t.Errorf("requested %v, want %v", req, tc.wantReq)
			}
			if n := len(requested); tc.wantReq && n != 1 || !tc.wantReq && n != 0 {
				t.Errorf("RequestPunch called %d times", n)
			}
			want := time.Time{}
			if tc.wantDue >= 0 {
				want = t0.Add(tc.wantDue)
			}
			if !due.Equal(want) {
				t.Errorf("due %v after the peer appeared, want %v", due.Sub(t0), want.Sub(t0))
			}
		})
	}
}

func TestBindRetry(t *testing.T) {
	tm := newTiming(DefaultProbeInterval)
	tests := []struct {
		name    string
		bound   bool
		unacked int
		want    time.Duration
	}{
		{"bound: keepalive", true, 1, tm.bind},
		{"first BIND unanswered", false, 1, tm.probe / 8},
		{"second", false, 2, tm.probe / 4},
		{"third", false, 3, tm.probe / 2},
		{"fourth: a probe interval", false, 4, tm.probe},
		{"many: still a probe interval", false, 40, tm.probe},
	}
	m := &Manager{t: tm}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := m.bindRetryLocked(&relayState{bound: tc.bound, unacked: tc.unacked}); got != tc.want {
				t.Errorf("%v, want %v", got, tc.want)
			}
		})
	}
}

// TestLostBindRepeatedSoon drops a node's first BIND: the next follows an eighth of a probe
// interval later, not a whole one (until then the relay relays nothing to or from the node).
func TestLostBindRepeatedSoon(t *testing.T) {
	l := newLab(t)
	l.probe = time.Second
	r := l.addRelay("192.0.2.1:3478")
	nat := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Easy)
	n := l.addNode("a", "10.0.1.1", nat)
	var mu sync.Mutex
	dropped := 0
	l.net.SetDrop(func(_, to netip.AddrPort) bool {
		mu.Lock()
		defer mu.Unlock()
		if to == r.Addr() && dropped == 0 {
			dropped++
			return true
		}
		return false
	})
	start := time.Now()
	n.mgr.SetRelays([]RelaySession{{Relay: 0, UDPAddr: r.Addr(), ID: n.id, Key: n.key}})
	waitUntil(t, "bound", func() bool { return n.mgr.Reflexive().IsValid() })
	took := time.Since(start)
	mu.Lock()
	defer mu.Unlock()
	if dropped != 1 {
		t.Fatalf("%d BINDs dropped, want the first", dropped)
	}
	if limit := l.probe / 2; took >= limit {
		t.Errorf("bound %v after the first BIND was lost, want within %v", took, limit)
	}
	t.Logf("bound %v after the first BIND was lost", took)
}

// TestDirectPathTiming: the first punch request for a peer behind another NAT leaves punchFirst
// after the peer appeared, not at the next tick nor after punchFirstLAN, and the direct path is
// given to WireGuard as soon as its PONG makes it the choice.
func TestDirectPathTiming(t *testing.T) {
	l := newLab(t)
	l.probe = time.Second // tick 250ms, punchFirst 62.5ms, punchFirstLAN 500ms
	tm := newTiming(l.probe)
	var mu sync.Mutex
	first := map[string]time.Time{}
	l.onPunch = func(from *labNode, _ string) {
		mu.Lock()
		if _, ok := first[from.name]; !ok {
			first[from.name] = time.Now()
		}
		mu.Unlock()
	}
	l.addRelay("192.0.2.1:3478")
	n1 := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Easy)
	n2 := l.net.AddNAT(netip.MustParseAddr("203.0.113.2"), pathtest.Easy)
	a, b := l.addNode("a", "10.0.1.1", n1), l.addNode("b", "10.0.2.1", n2)
	for _, n := range l.nodes {
		n.mgr.mu.Lock()
		n.mgr.onLink.interfaces = func() ([]InterfacePrefix, error) {
			return []InterfacePrefix{{"eth0", netip.PrefixFrom(n.lanAddr, 24)}}, nil
		}
		n.mgr.mu.Unlock()
	}
	for _, n := range l.nodes {
		n.mgr.SetRelays([]RelaySession{{Relay: 0, UDPAddr: l.relays[0].Addr(), ID: n.id, Key: n.key}})
	}
	waitUntil(t, "both bound", func() bool { return a.mgr.Reflexive().IsValid() && b.mgr.Reflexive().IsValid() })
	appeared := time.Now()
	l.directory()
	var direct time.Time
	waitUntil(t, "a's path to b direct", func() bool {
		if a.path(b).Kind == KindDirect && direct.IsZero() {
			direct = time.Now()
		}
		return !direct.IsZero() && a.applied(b) == a.path(b).Addr
	})
	applied := time.Now()
	mu.Lock()
	req, ok := first["a"]
	if !ok {
		req, ok = first["b"]
	}
	mu.Unlock()
	if !ok {
		t.Fatal("no punch was requested")
	}
	if d := req.Sub(appeared); d < tm.punchFirst || d >= tm.punchFirstLAN {
		t.Errorf("first punch request %v after the peers appeared, want from %v and well before %v", d, tm.punchFirst, tm.punchFirstLAN)
	}
	if d := applied.Sub(direct); d >= tm.tick/2 {
		t.Errorf("direct path given to WireGuard %v after it was chosen, want within %v (not at the next tick)", d, tm.tick/2)
	}
	t.Logf("punch requested %v after the peers appeared; direct %v after; applied %v after that",
		req.Sub(appeared), direct.Sub(appeared), applied.Sub(direct))
}

// TestLANPeerLearnsLater: b learns of a some time after a learned of b, so a's first LAN probe
// reached a b that ignored it. b's own probe then triggers a check from a at once: a's LAN path
// is up long before a's next probe and before its first punch request (half a probe interval
// for a peer on its own subnet), so no punch is ever requested between the two.
func TestLANPeerLearnsLater(t *testing.T) {
	for _, tc := range []struct {
		name  string
		later time.Duration
	}{
		{"a few milliseconds later", 5 * time.Millisecond},
		{"a third of a second later", 300 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			l.probe = 2 * time.Second // next probe after 2 s; first punch request for a LAN peer after 1 s
			var mu sync.Mutex
			punches := 0
			l.onPunch = func(*labNode, string) {
				mu.Lock()
				punches++
				mu.Unlock()
			}
			l.addRelay("192.0.2.1:3478")
			nat := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Easy)
			a, b := l.addNode("a", "10.0.0.1", nat), l.addNode("b", "10.0.0.2", nat)
			for _, n := range l.nodes {
				n.mgr.mu.Lock()
				n.mgr.onLink.interfaces = func() ([]InterfacePrefix, error) {
					return []InterfacePrefix{{"eth0", netip.PrefixFrom(n.lanAddr, 24)}}, nil
				}
				n.mgr.mu.Unlock()
				n.mgr.SetRelays([]RelaySession{{Relay: 0, UDPAddr: l.relays[0].Addr(), ID: n.id, Key: n.key}})
			}
			waitUntil(t, "both bound", func() bool { return a.mgr.Reflexive().IsValid() && b.mgr.Reflexive().IsValid() })
			peer := func(o *labNode) PeerInfo {
				refl, _ := l.relays[0].Bound(o.id)
				return PeerInfo{Name: o.name, Key: o.pub, LAN: []netip.AddrPort{o.lan()}, Reflexive: refl,
					Relays: []RelayRoute{{Relay: 0, ID: o.id}}}
			}
			sent := a.mgr.Stats().PingsSent
			a.mgr.SetPeers([]PeerInfo{peer(b)})
			waitUntil(t, "a's first LAN probe to b", func() bool { return a.mgr.Stats().PingsSent > sent })
			time.Sleep(tc.later)
			learned := time.Now()
			b.mgr.SetPeers([]PeerInfo{peer(a)})
			waitPath(t, a, b, KindLAN)
			took := time.Since(learned)
			if limit := l.probe / 4; took >= limit {
				t.Errorf("a's LAN path to b up %v after b learned of a, want within %v (a's next probe comes after %v)", took, limit, l.probe)
			}
			waitPath(t, b, a, KindLAN)
			time.Sleep(newTiming(l.probe).punchFirstLAN) // past the first punch request a LAN path would not prevent
			mu.Lock()
			defer mu.Unlock()
			if punches != 0 {
				t.Errorf("%d punches requested between two nodes on one LAN", punches)
			}
		})
	}
}
