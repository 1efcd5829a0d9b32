package path

import (
	"bytes"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/tun/tuntest"

	"github.com/edgewire/edgewire/overlay/path/pathtest"
)

func TestHoldEndpoint(t *testing.T) {
	tests := []struct {
		name string
		id   uint32
		want string
	}{
		{"small", 5, "127.3.0.0:5"},
		{"high byte", 0x10203, "127.3.0.1:515"},
		{"largest", maxHoldID, "127.3.0.255:65535"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := HoldEndpoint(tc.id)
			if got.String() != tc.want {
				t.Errorf("HoldEndpoint(%#x) = %s, want %s", tc.id, got, tc.want)
			}
			if !holdPrefix.Contains(got.Addr()) {
				t.Errorf("%s outside %s", got, holdPrefix)
			}
			if _, _, ok := ParseSynthetic(got); ok {
				t.Errorf("%s parses as a relay endpoint", got)
			}
		})
	}
}

// TestHoldAndRelease drives the Bind's hold by hand: what is kept, what a release sends.
func TestHoldAndRelease(t *testing.T) {
	hold := HoldEndpoint(9)
	target := netip.MustParseAddrPort("192.0.2.9:51820")
	init1, init2 := wgMsg(wgTypeInitiation, wgSizeInitiation), wgMsg(wgTypeInitiation, wgSizeInitiation)
	init2[100] = 0x42
	tests := []struct {
		name        string
		send        [][]byte
		age         time.Duration // how old the held initiation is made before the release
		wantSent    []byte        // nil: nothing released
		wantHeld    uint64
		wantDropped uint64
	}{
		{"an initiation is held and released", [][]byte{init1}, 0, init1, 1, 0},
		{"the last initiation wins", [][]byte{init1, init2}, 0, init2, 2, 0},
		{"data without a session is dropped", [][]byte{wgMsg(wgTypeTransport, 100)}, 0, nil, 0, 1},
		{"an initiation older than RekeyTimeout is not released", [][]byte{init1}, wgRekeyTimeout + time.Second, nil, 1, 1},
		{"nothing sent, nothing released", nil, 0, nil, 0, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			inner := &recordBind{Bind: conn.NewStdNetBind()}
			b := NewBind(Config{Inner: inner})
			ep, err := b.ParseEndpoint(hold.String())
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range tc.send {
				if err := b.Send([][]byte{p}, ep); err != nil {
					t.Fatalf("Send to the hold endpoint: %v", err)
				}
			}
			if len(inner.sent) != 0 {
				t.Fatalf("%d datagrams left for the network before the release", len(inner.sent))
			}
			if tc.age > 0 {
				b.holds.mu.Lock()
				b.holds.held[hold].at = time.Now().Add(-tc.age)
				b.holds.mu.Unlock()
			}
			sent, err := b.releaseHeld(hold, target)
			if err != nil {
				t.Fatal(err)
			}
			if sent != (tc.wantSent != nil) {
				t.Fatalf("released %v, want %v", sent, tc.wantSent != nil)
			}
			if tc.wantSent != nil {
				if len(inner.sent) != 1 || !bytes.Equal(inner.sent[0].pkt, tc.wantSent) || inner.sent[0].from != target {
					t.Fatalf("sent %d datagrams (%v), want the held initiation to %s", len(inner.sent), inner.sent, target)
				}
			}
			if again, _ := b.releaseHeld(hold, target); again {
				t.Error("a second release sent the initiation again")
			}
			st := b.Stats()
			if st.HeldInitiations != tc.wantHeld || st.HeldDropped != tc.wantDropped {
				t.Errorf("stats %+v, want %d held and %d dropped", st, tc.wantHeld, tc.wantDropped)
			}
		})
	}
}

// TestHoldBounded fills the hold table: past maxHeld, an initiation for another hold endpoint is
// dropped and counted.
func TestHoldBounded(t *testing.T) {
	b := NewBind(Config{Inner: &recordBind{Bind: conn.NewStdNetBind()}})
	init := wgMsg(wgTypeInitiation, wgSizeInitiation)
	for i := range maxHeld + 10 {
		if err := b.hold([][]byte{init}, HoldEndpoint(uint32(i+1))); err != nil {
			t.Fatal(err)
		}
	}
	st := b.Stats()
	if st.HeldInitiations != maxHeld || st.HeldDropped != 10 {
		t.Errorf("stats %+v, want %d held and 10 dropped", st, maxHeld)
	}
	b.holds.mu.Lock()
	n := len(b.holds.held)
	b.holds.mu.Unlock()
	if n != maxHeld {
		t.Errorf("%d initiations held, want %d", n, maxHeld)
	}
}

// TestFirstPacketsWaitForPath starts two wireguard-go devices whose peers have no endpoint and
// no path yet (no relay session), sends a ping before any path exists, and only then gives them
// their relay sessions: the ping arrives as soon as the relayed path answers. Without holding,
// wireguard-go's first initiation went to no endpoint and the next one came 5 s later.
func TestFirstPacketsWaitForPath(t *testing.T) {
	const within = 2 * time.Second
	tests := []struct {
		name string
		both bool // both sides send before the path exists (their initiations could cross)
	}{
		{"one side sends first", false},
		{"both sides send first", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			network := pathtest.NewNetwork()
			rl, err := network.NewRelay(netip.MustParseAddrPort("192.0.2.1:3478"))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { rl.Close() })
			rls := []*pathtest.Relay{rl}
			nodes := newWGRelayPair(t, network, rls, DefaultProbeInterval)
			for i, n := range nodes {
				want := ""
				waitUntil(t, fmt.Sprintf("node %d's peer on its hold endpoint", i), func() bool {
					n.mgr.mu.Lock()
					for _, p := range n.mgr.peers {
						want = p.hold.String()
					}
					n.mgr.mu.Unlock()
					return n.wgEndpoint(t) == want
				})
			}
			senders := nodes[:1]
			if tc.both {
				senders = nodes[:]
			}
			for i, n := range senders {
				n.tun.Outbound <- tuntest.Ping(nodes[i^1].ip, n.ip)
			}
			for i, n := range senders {
				waitUntil(t, fmt.Sprintf("node %d's initiation held", i), func() bool { return n.bind.Stats().HeldInitiations > 0 })
			}
			start := time.Now()
			for _, n := range nodes {
				n.setSessions(rls, 0)
			}
			for i, n := range senders {
				peer := &nodes[i^1].testNode
				select {
				case <-peer.tun.Inbound:
				case <-time.After(within - time.Since(start)):
					t.Fatalf("node %d's first ping did not arrive within %v of the relay sessions (stats %+v, peer's %+v)",
						i, within, n.bind.Stats(), nodes[i^1].bind.Stats())
				}
				t.Logf("node %d's first ping arrived %v after the relay sessions", i, time.Since(start).Round(time.Millisecond))
			}
			var released, dropped uint64
			for _, n := range nodes {
				st := n.bind.Stats()
				released, dropped = released+st.HeldReleased, dropped+st.HeldDropped
			}
			if released == 0 {
				t.Errorf("no held initiation was released (%d dropped)", dropped)
			}
		})
	}
}
