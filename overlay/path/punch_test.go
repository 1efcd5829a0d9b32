package path

import (
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/edgewire/edgewire/overlay/path/pathtest"
)

// TestPunchPrimesBeforePinging checks the order of a punch: the own mapping is primed towards the
// peer's reflexive address (from the WireGuard socket's port, with PunchTTL), and the first
// full-TTL datagram to that address leaves no sooner than primeLead later. Both sides prime at the
// signalled moment; a PING sent right after the own prime reaches the peer's NAT before the
// peer's prime when the two sides are a fraction of a millisecond apart, and the peer's masquerade
// then moves its mapping (measured in the e2e NAT lab).
func TestPunchPrimesBeforePinging(t *testing.T) {
	l := newLab(t)
	natA := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Easy)
	natB := l.net.AddNAT(netip.MustParseAddr("203.0.113.2"), pathtest.Easy)
	a, b := l.addNode("a", "10.0.1.1", natA), l.addNode("b", "10.0.2.1", natB)
	// Each NAT's first mapping gets port 40000: the punches below make them.
	aRefl, bRefl := netip.AddrPortFrom(natA.Public(), 40000), netip.AddrPortFrom(natB.Public(), 40000)

	var mu sync.Mutex
	type primed struct {
		at   time.Time
		port uint16
		dst  netip.AddrPort
		ttl  int
	}
	var primes []primed
	var firstSent time.Time
	l.net.SetDrop(func(from, to netip.AddrPort) bool {
		mu.Lock()
		defer mu.Unlock()
		if from.Addr() == natA.Public() && to == bRefl && firstSent.IsZero() {
			firstSent = time.Now()
		}
		return false
	})
	// No relays: a asks for no punch on its own, so a's prime is only used by the OnPunch below
	// (which the write under a.mgr.mu happens before).
	a.mgr.mu.Lock()
	a.mgr.prime = func(port uint16, dst netip.AddrPort, ttl int, _ []byte) error {
		mu.Lock()
		primes = append(primes, primed{time.Now(), port, dst, ttl})
		mu.Unlock()
		return nil
	}
	a.mgr.mu.Unlock()
	a.mgr.SetPeers([]PeerInfo{{Name: "b", Key: b.pub, LAN: []netip.AddrPort{b.lan()}}})
	b.mgr.SetPeers([]PeerInfo{{Name: "a", Key: a.pub, LAN: []netip.AddrPort{a.lan()}}})

	// b does not prime (no raw sockets in memory): its PINGs open natB for a's, which the filter
	// sees only when natB lets them in.
	b.mgr.OnPunch(0, Punch{Peer: "a", PeerReflexive: aRefl})
	a.mgr.OnPunch(0, Punch{Peer: "b", PeerReflexive: bRefl})
	waitUntil(t, "a's first datagram to b's reflexive address", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return !firstSent.IsZero()
	})
	mu.Lock()
	ps, first := append([]primed(nil), primes...), firstSent
	mu.Unlock()
	if len(ps) != 1 {
		t.Fatalf("%d primes, want 1 before the first datagram", len(ps))
	}
	p := ps[0]
	if p.port != a.bind.Port() || p.dst != bRefl || p.ttl != DefaultPunchTTL {
		t.Errorf("primed from port %d to %s with TTL %d, want port %d to %s with TTL %d",
			p.port, p.dst, p.ttl, a.bind.Port(), bRefl, DefaultPunchTTL)
	}
	lead := a.mgr.t.primeLead
	if got := first.Sub(p.at); got < lead {
		t.Errorf("first full-TTL datagram to %s %v after the prime, want at least %v", bRefl, got, lead)
	}
	waitPath(t, a, b, KindDirect)
	waitPath(t, b, a, KindDirect)
}
