package path

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn/bindtest"
	"golang.zx2c4.com/wireguard/device"
)

// transports are the two inner Binds every tunnel test runs over.
var transports = []struct {
	name       string
	realSocket bool
}{
	{"loopback-udp", true},
	{"in-memory", false},
}

func TestTunnelPing(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			nodes := genTestPair(t, tr.realSocket)
			pingBothWays(t, nodes)
			for i, n := range nodes {
				if n.spy.handshakes() == 0 {
					t.Errorf("node %d: wireguard-go received no handshake message", i)
				}
				if st := n.bind.Stats(); st.WireGuardIn == 0 || st.OtherIn != 0 {
					t.Errorf("node %d: stats %+v, want WireGuard datagrams and no others", i, st)
				}
			}
		})
	}
}

// TestProbesBesideWireGuard sends datagrams that are not WireGuard through the Binds while pings
// cross the tunnel: each probe reaches the other side's OnPacket from the sender's address, a reply
// to that address comes back, and wireguard-go never sees any of them.
func TestProbesBesideWireGuard(t *testing.T) {
	const probes = 100
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			nodes := genTestPair(t, tr.realSocket)
			pingBothWays(t, nodes) // handshake done: traffic is flowing when the probes start

			var wg sync.WaitGroup
			wg.Add(1)
			sendErr := make(chan error, 1)
			go func() {
				defer wg.Done()
				for i := range probes {
					if err := nodes[0].bind.SendTo(probe(i), nodes[1].seenAt()); err != nil {
						sendErr <- err
						return
					}
				}
			}()
			for range 10 {
				pingBothWays(t, nodes)
			}
			wg.Wait()
			close(sendErr)
			if err := <-sendErr; err != nil {
				t.Fatalf("SendTo: %v", err)
			}

			got := nodes[1].other.waitFor(t, fmt.Sprintf("%d probes at node 1", probes), func(d []datagram) bool {
				return len(d) >= probes
			})
			for i, d := range got[:probes] {
				if !bytes.Equal(d.pkt, probe(i)) {
					t.Errorf("probe %d arrived as %q, want %q", i, d.pkt, probe(i))
				}
				if want := nodes[0].seenAt(); d.from != want {
					t.Errorf("probe %d arrived from %v, want %v", i, d.from, want)
				}
			}

			reply := append(bytes.Clone(probeMagic), "reply"...)
			if err := nodes[1].bind.SendTo(reply, got[0].from); err != nil {
				t.Fatalf("reply with SendTo to the observed source %v: %v", got[0].from, err)
			}
			nodes[0].other.waitFor(t, "the reply at node 0", func(d []datagram) bool {
				return len(d) == 1 && bytes.Equal(d[0].pkt, reply)
			})
			pingBothWays(t, nodes)

			for i, n := range nodes {
				if leaked := n.spy.leaked.Load(); leaked != 0 {
					t.Errorf("node %d: wireguard-go was handed %d datagrams that are not WireGuard", i, leaked)
				}
			}
			if st := nodes[1].bind.Stats(); st.OtherIn != probes || st.OtherDropped != 0 || st.WireGuardIn == 0 {
				t.Errorf("node 1 stats %+v, want OtherIn %d, OtherDropped 0, WireGuardIn > 0", st, probes)
			}
		})
	}
}

// TestDownUp takes both devices down and up again (wireguard-go closes and reopens the Bind):
// the Bind reports the port closed and reopened, handshakes resume, probes still flow.
func TestDownUp(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			nodes := genTestPair(t, tr.realSocket)
			pingBothWays(t, nodes)
			for round := range 3 {
				// wireguard-go ignores an initiation that comes within HandshakeInitationRate of the
				// peer's previous one (anti-flood), and would then retry only after RekeyTimeout (5s).
				waitUntil(t, "the last handshakes to age past the initiation rate limit", func() bool {
					for _, n := range nodes {
						if time.Since(lastHandshake(t, n)) <= device.HandshakeInitationRate {
							return false
						}
					}
					return true
				})
				var handshakes uint64
				var ports [2]uint16
				for i, n := range nodes {
					handshakes += n.spy.handshakes()
					ports[i] = n.bind.Port()
					if err := n.dev.Down(); err != nil {
						t.Fatalf("round %d: down node %d: %v", round, i, err)
					}
					if p := n.bind.Port(); p != 0 {
						t.Errorf("round %d: node %d is down but Port() = %d", round, i, p)
					}
					if err := n.bind.SendTo(probe(0), nodes[i^1].seenAt()); err == nil {
						t.Errorf("round %d: SendTo on node %d's closed Bind succeeded", round, i)
					}
				}
				for i, n := range nodes {
					if err := n.dev.Up(); err != nil {
						t.Fatalf("round %d: up node %d: %v", round, i, err)
					}
					if p := n.bind.Port(); tr.realSocket && p != ports[i] {
						t.Errorf("round %d: node %d reopened on port %d, was %d", round, i, p, ports[i])
					}
				}
				pingBothWays(t, nodes)
				var after uint64
				for _, n := range nodes {
					after += n.spy.handshakes()
				}
				if after <= handshakes {
					t.Errorf("round %d: no new handshake after down/up (%d handshake messages before, %d after)",
						round, handshakes, after)
				}

				before := len(nodes[0].other.snapshot())
				if err := nodes[1].bind.SendTo(probe(round), nodes[0].seenAt()); err != nil {
					t.Fatalf("round %d: SendTo after up: %v", round, err)
				}
				nodes[0].other.waitFor(t, "a probe after down/up", func(d []datagram) bool {
					return len(d) == before+1 && bytes.Equal(d[before].pkt, probe(round))
				})
			}
		})
	}
}

// TestMalformedFromNetwork sends junk from a plain UDP socket to the real Binds' port: the datagrams
// that are not WireGuard are counted (and delivered to OnPacket, or dropped without one), the
// WireGuard-shaped ones are left to wireguard-go, which discards them, and the tunnel carries on.
func TestMalformedFromNetwork(t *testing.T) {
	// Node 0 hands other datagrams to OnPacket; node 1 has no OnPacket and drops them.
	nodes := genTestPairOpts(t, true, pairOptions{dropOther: [2]bool{false, true}})
	pingBothWays(t, nodes)

	junk := []struct {
		name string
		pkt  []byte
		wg   bool // well-formed WireGuard: passed on (wireguard-go drops it: unknown sender/index)
	}{
		{"initiation one byte short", wgMsg(wgTypeInitiation, wgSizeInitiation-1), false},
		{"response one byte long", wgMsg(wgTypeResponse, wgSizeResponse+1), false},
		{"cookie reply reserved byte set", withByte(wgMsg(wgTypeCookieReply, wgSizeCookieReply), 2, 0x80), false},
		{"transport at full MTU, not a multiple of 16 (1420-byte packet)", wgMsg(wgTypeTransport, 1452), true},
		{"type 5", wgMsg(5, 148), false},
		{"one byte", []byte{1}, false},
		{"text", []byte("GET / HTTP/1.1\r\n\r\n"), false},
		{"garbage initiation", wgMsg(wgTypeInitiation, wgSizeInitiation), true},
		{"transport to unknown index", wgMsg(wgTypeTransport, 64), true},
	}
	var others, wgs uint64
	for _, j := range junk {
		if j.wg {
			wgs++
		} else {
			others++
		}
	}

	sock, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer sock.Close()
	from := sock.LocalAddr().(*net.UDPAddr).AddrPort()

	before := [2]Stats{nodes[0].bind.Stats(), nodes[1].bind.Stats()}
	for i, n := range nodes {
		to := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), n.bind.Port())
		for _, j := range junk {
			if _, err := sock.WriteToUDPAddrPort(j.pkt, to); err != nil {
				t.Fatalf("send %s to node %d: %v", j.name, i, err)
			}
		}
	}
	for i, n := range nodes {
		waitUntil(t, fmt.Sprintf("node %d to count the junk", i), func() bool {
			st := n.bind.Stats()
			return st.OtherIn-before[i].OtherIn >= others && st.WireGuardIn-before[i].WireGuardIn >= wgs
		})
	}
	if d := nodes[1].bind.Stats().OtherDropped - before[1].OtherDropped; d != others {
		t.Errorf("node 1 (no OnPacket) dropped %d datagrams, want %d", d, others)
	}
	if d := nodes[0].bind.Stats().OtherDropped - before[0].OtherDropped; d != 0 {
		t.Errorf("node 0 (with OnPacket) dropped %d datagrams, want 0", d)
	}
	got := nodes[0].other.snapshot()
	if uint64(len(got)) != others {
		t.Fatalf("node 0's OnPacket got %d datagrams, want %d", len(got), others)
	}
	k := 0
	for _, j := range junk {
		if j.wg {
			continue
		}
		if !bytes.Equal(got[k].pkt, j.pkt) || got[k].from != from {
			t.Errorf("%s: OnPacket got %d bytes from %v, want %d bytes from %v", j.name, len(got[k].pkt), got[k].from, len(j.pkt), from)
		}
		k++
	}

	pingBothWays(t, nodes)
	for i, n := range nodes {
		if leaked := n.spy.leaked.Load(); leaked != 0 {
			t.Errorf("node %d: wireguard-go was handed %d datagrams that are not WireGuard", i, leaked)
		}
	}
}

func TestBindLifecycle(t *testing.T) {
	inner := bindtest.NewChannelBinds()
	b := NewBind(Config{Inner: inner[0]})
	if p := b.Port(); p != 0 {
		t.Fatalf("Port() before Open = %d, want 0", p)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("Close before Open: %v", err)
	}
	for round := range 2 {
		fns, port, err := b.Open(0)
		if err != nil {
			t.Fatalf("round %d: Open: %v", round, err)
		}
		if port == 0 || b.Port() != port {
			t.Fatalf("round %d: Open reported port %d, Port() = %d", round, port, b.Port())
		}
		for range 2 {
			if err := b.Close(); err != nil {
				t.Fatalf("round %d: Close: %v", round, err)
			}
		}
		if p := b.Port(); p != 0 {
			t.Errorf("round %d: Port() after Close = %d, want 0", round, p)
		}
		for _, fn := range fns {
			bufs, sizes, eps := batch(1)
			if _, err := fn(bufs, sizes, eps); err == nil {
				t.Errorf("round %d: receive %s after Close returned no error", round, fn.PrettyName())
			}
		}
	}
}

func TestSendToRefuses(t *testing.T) {
	inner := bindtest.NewChannelBinds()
	open := NewBind(Config{Inner: inner[0]})
	if _, _, err := open.Open(0); err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer open.Close()
	closed := NewBind(Config{Inner: inner[1]})
	peer := netip.MustParseAddrPort("127.0.0.1:1")

	tests := []struct {
		name string
		bind *Bind
		pkt  []byte
		to   netip.AddrPort
	}{
		{"closed bind", closed, probe(0), peer},
		{"invalid address", open, probe(0), netip.AddrPort{}},
		{"empty datagram", open, nil, peer},
		{"well-formed WireGuard", open, wgMsg(wgTypeTransport, 32), peer},
		{"WireGuard prefix, odd size", open, wgMsg(wgTypeInitiation, 20), peer},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.bind.SendTo(tc.pkt, tc.to); err == nil {
				t.Errorf("SendTo(%d bytes, %v) succeeded, want an error", len(tc.pkt), tc.to)
			}
		})
	}
	if err := open.SendTo(probe(0), peer); err != nil {
		t.Errorf("SendTo of a probe on an open Bind: %v", err)
	}
}

// lastHandshake is when n's device last completed a handshake with its peer (zero: never).
func lastHandshake(tb testing.TB, n *testNode) time.Time {
	tb.Helper()
	uapi, err := n.dev.IpcGet()
	if err != nil {
		tb.Fatalf("IpcGet: %v", err)
	}
	var sec, nsec int64
	for line := range strings.Lines(uapi) {
		k, v, _ := strings.Cut(strings.TrimSpace(line), "=")
		switch k {
		case "last_handshake_time_sec":
			sec, err = strconv.ParseInt(v, 10, 64)
		case "last_handshake_time_nsec":
			nsec, err = strconv.ParseInt(v, 10, 64)
		}
		if err != nil {
			tb.Fatalf("IpcGet line %q: %v", line, err)
		}
	}
	if sec == 0 && nsec == 0 {
		return time.Time{}
	}
	return time.Unix(sec, nsec)
}

// probe is the i-th test datagram that is not WireGuard.
func probe(i int) []byte {
	return fmt.Appendf(bytes.Clone(probeMagic), "-%03d", i)
}

// TestReceiveFuncNames checks that wrapping keeps the names wireguard-go logs its receive
// goroutines by ("v4", "v6").
func TestReceiveFuncNames(t *testing.T) {
	b := NewBind(Config{})
	fns, _, err := b.Open(0)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer b.Close()
	if len(fns) == 0 {
		t.Fatal("Open returned no receive functions")
	}
	for _, fn := range fns {
		if name := fn.PrettyName(); name != "v4" && name != "v6" {
			t.Errorf("receive function named %q, want v4 or v6", name)
		}
	}
}
