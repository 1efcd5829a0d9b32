//go:build linux

package relay

import (
	"encoding/binary"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"golang.org/x/net/ipv4"
)

// TestDataRelayGSO sends the relay one UDP GSO burst of DATA frames, as an agent's wireguard-go
// sends them, most to b, one to c and one to an unknown node in the middle, over an IPv4 socket
// and a dual-stack one: each frame reaches its node once, in order, with the sender's ID, the
// stray one is counted, and — where the kernel has UDP GSO and GRO — the runs to b leave the relay
// coalesced.
func TestDataRelayGSO(t *testing.T) {
	tests := []struct {
		name   string
		listen netip.Addr
	}{
		{"ipv4 socket", loopback},
		{"dual-stack socket", netip.Addr{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, "", 0, func(c *ServerConfig) {
				c.ListenAddr = tc.listen
				c.Limits.DataRate = 1e12
				c.Limits.DataBurst = 1 << 30
			})
			a, b, c := newNode(t, "a"), newNode(t, "b"), newNode(t, "c")
			for _, n := range []*node{a, b, c} {
				n.start(t, testToken, p2pAddr(s))
			}
			sa, sb, sc := waitSession(t, a, 0), waitSession(t, b, 0), waitSession(t, c, 0)
			ua, ub, uc := bindUDP(t, sa), bindUDP(t, sb), bindUDP(t, sc)
			gso, gro := setupSocket(ua)
			setupSocket(ub)
			setupSocket(uc)
			// The burst is sent with UDP GSO: a kernel without it (before Linux 4.18) cannot run
			// this test, and must not pass it silently. The relay's fallback without GSO is
			// covered by TestUDPWriter.
			if !gso {
				t.Fatal("the sending socket has no UDP GSO (UDP_SEGMENT): this test needs Linux ≥ 4.18")
			}

			const n, payload = 40, 1400
			dests := make([]uint32, n)
			for i := range dests {
				dests[i] = sb.ID
			}
			dests[10], dests[20] = sc.ID, 999
			var burst []byte
			for i, d := range dests {
				f := AppendDataHeader(nil, d)
				f = append(f, make([]byte, payload)...)
				f[DataHeaderLen] = 4
				binary.BigEndian.PutUint32(f[DataHeaderLen+8:], uint32(i))
				burst = append(burst, f...)
			}
			noDest, relayed := counter(s, dropNoDest), s.metrics.bytesRelayed.Load()
			msg := []ipv4.Message{{Buffers: [][]byte{burst}, Addr: net.UDPAddrFromAddrPort(sa.UDPAddr),
				OOB: appendGSO(nil, DataHeaderLen+payload)}}
			if _, err := ipv4.NewPacketConn(ua).WriteBatch(msg, 0); err != nil {
				t.Fatal(err)
			}

			var want []uint32
			for i, d := range dests {
				if d == sb.ID {
					want = append(want, uint32(i))
				}
			}
			got, coalesced := recvBurst(t, ub, sa.ID, len(want))
			if !slices.Equal(got, want) {
				t.Errorf("b got frames %v, want %v", got, want)
			}
			if got, _ := recvBurst(t, uc, sa.ID, 1); !slices.Equal(got, []uint32{10}) {
				t.Errorf("c got frames %v, want [10]", got)
			}
			eventually(t, 5*time.Second, "unknown destination counted", func() bool { return counter(s, dropNoDest) == noDest+1 })
			eventually(t, 5*time.Second, "bytes relayed counted", func() bool {
				return s.metrics.bytesRelayed.Load()-relayed == (n-1)*payload
			})
			t.Logf("b's %d frames arrived in %d coalesced reads; kernel UDP GRO %v", len(want), coalesced, gro)
			if gro && coalesced == 0 {
				t.Error("the relay did not send the runs to b with UDP GSO")
			}
		})
	}
}

// recvBurst reads want DATA frames from conn (with UDP GRO) and returns their sequence numbers and
// how many reads held more than one frame; every frame must come from node from.
func recvBurst(t *testing.T, conn *net.UDPConn, from uint32, want int) (seqs []uint32, coalesced int) {
	t.Helper()
	pc := ipv4.NewPacketConn(conn)
	ms := make([]ipv4.Message, 8)
	for i := range ms {
		ms[i].Buffers = [][]byte{make([]byte, 1<<16)}
		ms[i].OOB = make([]byte, 64)
	}
	for len(seqs) < want {
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := pc.ReadBatch(ms, 0)
		if err != nil {
			t.Fatalf("after %d of %d frames: %v", len(seqs), want, err)
		}
		for _, m := range ms[:n] {
			seg := groSize(m.OOB[:m.NN])
			if seg == 0 || seg >= m.N {
				seg = m.N
			} else {
				coalesced++
			}
			for off := 0; off < m.N; off += seg {
				id, p, err := ParseData(m.Buffers[0][off:min(off+seg, m.N)])
				if err != nil || id != from || len(p) < 12 {
					t.Fatalf("frame from %d of %d bytes (%v), want DATA from %d", id, len(p), err, from)
				}
				seqs = append(seqs, binary.BigEndian.Uint32(p[8:]))
			}
		}
	}
	conn.SetReadDeadline(time.Time{})
	return seqs, coalesced
}
