package path

import (
	"bytes"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	"golang.zx2c4.com/wireguard/conn"

	"github.com/edgewire/edgewire/overlay/path/pathtest"
	"github.com/edgewire/edgewire/relay"
)

func relayPing(sender [32]byte, tx uint64, key []byte) []byte {
	return relay.AppendPing(nil, relay.Ping{Sender: sender, TxID: tx}, key)
}

func relayBindAck(nonce uint64, observed netip.AddrPort) []byte {
	return relay.AppendBindAck(nil, nonce, observed)
}

func relayDataHeader(id uint32) []byte { return relay.AppendDataHeader(nil, id) }

func TestSyntheticEndpoint(t *testing.T) {
	tests := []struct {
		name  string
		relay int
		id    uint32
		want  string // "" → out of range
	}{
		{"first relay small ID", 0, 5, "127.3.1.0:5"},
		{"second relay", 1, 5, "127.3.2.0:5"},
		{"ID above 16 bits", 0, 0x12345, "127.3.1.1:9029"},
		{"ID zero", 3, 0, "127.3.4.0:0"},
		{"largest", MaxRelays - 1, MaxRelayNodeID, "127.3.255.255:65535"},
		{"ID too large", 0, MaxRelayNodeID + 1, ""},
		{"relay too large", MaxRelays, 1, ""},
		{"negative relay", -1, 1, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ep, ok := SyntheticEndpoint(tc.relay, tc.id)
			if tc.want == "" {
				if ok {
					t.Fatalf("SyntheticEndpoint(%d, %d) = %v, want out of range", tc.relay, tc.id, ep)
				}
				return
			}
			if !ok || ep.String() != tc.want {
				t.Fatalf("SyntheticEndpoint(%d, %d) = %v, %v; want %s", tc.relay, tc.id, ep, ok, tc.want)
			}
			r, id, ok := ParseSynthetic(netip.MustParseAddrPort(tc.want))
			if !ok || r != tc.relay || id != tc.id {
				t.Errorf("ParseSynthetic(%s) = %d, %d, %v", tc.want, r, id, ok)
			}
		})
	}
	for _, s := range []string{"127.3.0.1:5", "127.0.0.1:5", "10.3.1.0:5", "[::1]:5"} {
		if _, _, ok := ParseSynthetic(netip.MustParseAddrPort(s)); ok {
			t.Errorf("ParseSynthetic(%s) accepted a non-synthetic address", s)
		}
	}
}

// TestRelayedDemux runs the receive wrapper over batches from a relay: WireGuard inside DATA is
// unwrapped in place and attributed to the synthetic endpoint, probes go to the handler from it,
// malformed frames are counted.
func TestRelayedDemux(t *testing.T) {
	relayAddr := netip.MustParseAddrPort("192.0.2.1:3478")
	other := netip.MustParseAddrPort("192.0.2.9:1000")
	wg := wgMsg(wgTypeTransport, 64)
	ping := relayPing([32]byte{1}, 7, make([]byte, 32))
	synth5, _ := SyntheticEndpoint(0, 5)
	direct5 := netip.MustParseAddrPort("198.51.100.5:51820")
	tests := []struct {
		name      string
		preferred map[netip.AddrPort]netip.AddrPort // the peers' direct paths
		pkt       []byte
		from      netip.AddrPort
		wantSize  int
		wantPkt   []byte
		wantEP    netip.AddrPort // of a WireGuard datagram left in the batch
		wantFrom  netip.AddrPort // handler source; zero: not handed over
		wantStats Stats
	}{
		{"wireguard via relay", nil, append(relayDataHeader(5), wg...), relayAddr, len(wg), wg, synth5, netip.AddrPort{}, Stats{WireGuardIn: 1, RelayedIn: 1}},
		{"wireguard via relay from a peer with a direct path: no roaming to the relay", map[netip.AddrPort]netip.AddrPort{synth5: direct5},
			append(relayDataHeader(5), wg...), relayAddr, len(wg), wg, direct5, netip.AddrPort{}, Stats{WireGuardIn: 1, RelayedIn: 1}},
		{"ping via relay", nil, append(relayDataHeader(5), ping...), relayAddr, 0, nil, netip.AddrPort{}, synth5, Stats{RelayedIn: 1}},
		{"empty data", nil, relayDataHeader(5), relayAddr, 0, nil, netip.AddrPort{}, netip.AddrPort{}, Stats{RelayedInDropped: 1}},
		{"ID beyond 24 bits", nil, append(relayDataHeader(1<<24), wg...), relayAddr, 0, nil, netip.AddrPort{}, netip.AddrPort{}, Stats{RelayedInDropped: 1}},
		{"data from a stranger", nil, append(relayDataHeader(5), wg...), other, 0, nil, netip.AddrPort{}, other, Stats{OtherIn: 1}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var gotFrom netip.AddrPort
			b := NewBind(Config{Inner: conn.NewStdNetBind(), OnPacket: func(pkt []byte, from netip.AddrPort) { gotFrom = from }})
			if err := b.setRelays(map[int]netip.AddrPort{0: relayAddr}); err != nil {
				t.Fatal(err)
			}
			if tc.preferred != nil {
				b.preferred.Store(&tc.preferred)
			}
			bufs, sizes, eps := batch(1)
			fn := b.wrapReceive(func(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
				sizes[0] = copy(bufs[0], tc.pkt)
				eps[0] = &conn.StdNetEndpoint{AddrPort: tc.from}
				return 1, nil
			})
			if _, err := fn(bufs, sizes, eps); err != nil {
				t.Fatal(err)
			}
			if sizes[0] != tc.wantSize {
				t.Fatalf("size %d, want %d", sizes[0], tc.wantSize)
			}
			if tc.wantPkt != nil {
				if !bytes.Equal(bufs[0][:sizes[0]], tc.wantPkt) {
					t.Errorf("payload not moved to the start of the buffer")
				}
				if got := eps[0].(*conn.StdNetEndpoint).AddrPort; got != tc.wantEP {
					t.Errorf("endpoint %v, want %v", got, tc.wantEP)
				}
			}
			if gotFrom != tc.wantFrom {
				t.Errorf("handler source %v, want %v", gotFrom, tc.wantFrom)
			}
			if st := b.Stats(); st != tc.wantStats {
				t.Errorf("stats %+v, want %+v", st, tc.wantStats)
			}
		})
	}
}

func TestRelayedReceiveAllocs(t *testing.T) {
	relayAddr := netip.MustParseAddrPort("192.0.2.1:3478")
	b := NewBind(Config{Inner: conn.NewStdNetBind()})
	if err := b.setRelays(map[int]netip.AddrPort{0: relayAddr}); err != nil {
		t.Fatal(err)
	}
	frame := append(relayDataHeader(5), wgMsg(wgTypeTransport, 1440)...)
	const n = conn.IdealBatchSize
	bufs, sizes, eps := batch(n)
	std := make([]conn.StdNetEndpoint, n) // the inner Bind's fresh endpoints, made up front
	fn := b.wrapReceive(func(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		for i := range n {
			sizes[i] = copy(bufs[i], frame)
			std[i].AddrPort = relayAddr
			eps[i] = &std[i]
		}
		return n, nil
	})
	allocs := testing.AllocsPerRun(50, func() {
		if _, err := fn(bufs, sizes, eps); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("relayed receive allocates %v times per batch, want 0", allocs)
	}
	if st := b.Stats(); st.RelayedIn == 0 || st.WireGuardIn != st.RelayedIn {
		t.Errorf("stats %+v: relayed WireGuard not counted", st)
	}
}

// recordBind is an inner Bind that records what is sent.
type recordBind struct {
	conn.Bind
	mu   sync.Mutex
	sent []datagram
}

func (r *recordBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	to := ep.(*conn.StdNetEndpoint).AddrPort
	for _, b := range bufs {
		r.sent = append(r.sent, datagram{pkt: bytes.Clone(b), from: to})
	}
	return nil
}

func TestRelayedSend(t *testing.T) {
	relayAddr := netip.MustParseAddrPort("192.0.2.1:3478")
	inner := &recordBind{Bind: conn.NewStdNetBind()}
	b := NewBind(Config{Inner: inner})
	synth, _ := SyntheticEndpoint(0, 0x10203)
	ep, err := b.ParseEndpoint(synth.String())
	if err != nil {
		t.Fatal(err)
	}
	msgs := [][]byte{wgMsg(wgTypeTransport, 32), wgMsg(wgTypeTransport, 48)}
	if err := b.Send(msgs, ep); err == nil {
		t.Fatal("Send to a relay without session succeeded")
	}
	if err := b.setRelays(map[int]netip.AddrPort{0: relayAddr}); err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second round reuses pooled buffers
		inner.sent = nil
		if err := b.Send(msgs, ep); err != nil {
			t.Fatalf("Send: %v", err)
		}
		if len(inner.sent) != 2 {
			t.Fatalf("inner sent %d datagrams, want 2", len(inner.sent))
		}
		for i, d := range inner.sent {
			id, payload, err := relay.ParseData(d.pkt)
			if err != nil || id != 0x10203 || !bytes.Equal(payload, msgs[i]) || d.from != relayAddr {
				t.Errorf("datagram %d: id %#x, %d-byte payload to %v (%v); want DATA for 0x10203 to %v", i, id, len(payload), d.from, err, relayAddr)
			}
		}
	}
	if st := b.Stats(); st.RelayedOut != 4 || st.RelayedOutDropped != 2 {
		t.Errorf("stats %+v, want RelayedOut 4, RelayedOutDropped 2", st)
	}
}

// layoutBind is an inner Bind that checks, during Send, that each datagram lies right after the
// previous one within its capacity: the layout StdNetBind's UDP GSO coalescing needs (see
// Bind.sendRelayed).
type layoutBind struct {
	conn.Bind
	sends  int
	frames int
	err    error
}

func (l *layoutBind) Send(bufs [][]byte, _ conn.Endpoint) error {
	l.sends++
	l.frames += len(bufs)
	for i := 1; i < len(bufs) && l.err == nil; i++ {
		prev := bufs[i-1]
		if room := cap(prev) - len(prev); room < len(bufs[i]) {
			l.err = fmt.Errorf("datagram %d has room for %d bytes after it, datagram %d needs %d", i-1, room, i, len(bufs[i]))
		} else if &prev[:len(prev)+1][len(prev)] != &bufs[i][0] {
			l.err = fmt.Errorf("datagram %d does not follow datagram %d in memory", i, i-1)
		}
	}
	return nil
}

func TestRelayedSendLayout(t *testing.T) {
	relayAddr := netip.MustParseAddrPort("192.0.2.1:3478")
	inner := &layoutBind{Bind: conn.NewStdNetBind()}
	b := NewBind(Config{Inner: inner})
	if err := b.setRelays(map[int]netip.AddrPort{0: relayAddr}); err != nil {
		t.Fatal(err)
	}
	synth, _ := SyntheticEndpoint(0, 7)
	ep, err := b.ParseEndpoint(synth.String())
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		sizes []int
	}{
		{"one datagram", []int{1440}},
		{"full batch of full-size datagrams", slices.Repeat([]int{1440}, conn.IdealBatchSize)},
		{"shorter last datagram", []int{1440, 1440, 1440, 96}},
		{"mixed sizes", []int{96, 1440, 32, 1440, 1440}},
		{"larger batch after a smaller one (the pooled buffer grows)", slices.Repeat([]int{2000}, conn.IdealBatchSize)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			*inner = layoutBind{Bind: inner.Bind}
			var msgs [][]byte
			for _, n := range tc.sizes {
				msgs = append(msgs, wgMsg(wgTypeTransport, n))
			}
			if err := b.Send(msgs, ep); err != nil {
				t.Fatal(err)
			}
			if inner.sends != 1 || inner.frames != len(msgs) {
				t.Fatalf("%d Sends of %d datagrams in all, want 1 of %d", inner.sends, inner.frames, len(msgs))
			}
			if inner.err != nil {
				t.Fatal(inner.err)
			}
		})
	}
}

// TestWireGuardThroughRelay runs two wireguard-go devices behind hard NATs: their Managers put
// them on the relay's synthetic endpoints, and pings cross the tunnel through the fake relay.
func TestWireGuardThroughRelay(t *testing.T) {
	network := pathtest.NewNetwork()
	rl, err := network.NewRelay(netip.MustParseAddrPort("192.0.2.1:3478"))
	if err != nil {
		t.Fatal(err)
	}
	defer rl.Close()
	rls := []*pathtest.Relay{rl}
	nodes := newWGRelayPair(t, network, rls, testProbeInterval)
	for _, n := range nodes {
		n.setSessions(rls, 0)
	}
	for i, n := range nodes {
		waitUntil(t, fmt.Sprintf("node %d bound", i), func() bool { _, ok := rl.Bound(n.id); return ok })
	}
	for i, n := range nodes {
		// Now with the reflexive address the relay saw: a punch may be tried, and fails (hard NATs).
		peer := nodes[i^1]
		refl, _ := rl.Bound(peer.id)
		n.mgr.SetPeers([]PeerInfo{{Name: fmt.Sprint("node", i^1), Key: peer.pub, LAN: []netip.AddrPort{peer.lan},
			Reflexive: refl, Relays: []RelayRoute{{Relay: 0, ID: peer.id}}}})
	}
	pair := [2]*testNode{&nodes[0].testNode, &nodes[1].testNode}
	pingBothWays(t, pair)
	for range 5 {
		pingBothWays(t, pair)
	}
	for i, n := range nodes {
		synth, _ := SyntheticEndpoint(0, nodes[i^1].id)
		uapi, err := n.dev.IpcGet()
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(uapi, "endpoint="+synth.String()+"\n") {
			t.Errorf("node %d: UAPI endpoint is not %s:\n%s", i, synth, uapi)
		}
		if st := n.bind.Stats(); st.RelayedIn == 0 || st.RelayedOut == 0 {
			t.Errorf("node %d: stats %+v, want relayed traffic", i, st)
		}
		if leaked := n.spy.leaked.Load(); leaked != 0 {
			t.Errorf("node %d: wireguard-go was handed %d datagrams that are not WireGuard", i, leaked)
		}
	}
	if rl.Forwarded.Load() == 0 {
		t.Error("the relay forwarded nothing")
	}
}
