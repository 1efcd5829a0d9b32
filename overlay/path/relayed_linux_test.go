//go:build linux

package path

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"

	"github.com/edgewire/edgewire/relay"
)

// TestRelayedSendGSO sends a batch of full-size WireGuard datagrams to a synthetic endpoint through
// a real StdNetBind, to a relay socket on loopback that reads with UDP GRO (as mesh-relay does):
// every frame arrives intact and in order, and, where the kernel has UDP GSO, the batch left in a
// few coalesced sends rather than one datagram per frame.
func TestRelayedSendGSO(t *testing.T) {
	relaySock, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer relaySock.Close()
	gso, gro := udpOffloads(t, relaySock)
	b := NewBind(Config{Inner: conn.NewStdNetBind()})
	if _, _, err := b.Open(0); err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := b.setRelays(map[int]netip.AddrPort{0: relaySock.LocalAddr().(*net.UDPAddr).AddrPort()}); err != nil {
		t.Fatal(err)
	}
	synth, _ := SyntheticEndpoint(0, 9)
	ep, err := b.ParseEndpoint(synth.String())
	if err != nil {
		t.Fatal(err)
	}
	const n = conn.IdealBatchSize
	msgs := make([][]byte, n)
	for i := range msgs {
		msgs[i] = wgMsg(wgTypeTransport, 1440)
		binary.BigEndian.PutUint32(msgs[i][8:], uint32(i)) // the counter field: the order
	}
	if err := b.Send(msgs, ep); err != nil {
		t.Fatal(err)
	}

	pc := ipv4.NewPacketConn(relaySock)
	rms := make([]ipv4.Message, n)
	for i := range rms {
		rms[i].Buffers = [][]byte{make([]byte, 1<<16)}
		rms[i].OOB = make([]byte, 64)
	}
	var frames, reads, coalesced int
	for frames < n {
		relaySock.SetReadDeadline(time.Now().Add(waitTimeout))
		k, err := pc.ReadBatch(rms, 0)
		if err != nil {
			t.Fatalf("after %d of %d frames: %v", frames, n, err)
		}
		for _, m := range rms[:k] {
			reads++
			seg := groSegment(m.OOB[:m.NN])
			if seg == 0 || seg > m.N {
				seg = m.N
			} else if seg < m.N {
				coalesced++
			}
			for off := 0; off < m.N; off += seg {
				id, payload, err := relay.ParseData(m.Buffers[0][off:min(off+seg, m.N)])
				if err != nil || id != 9 || len(payload) != 1440 || payload[0] != wgTypeTransport {
					t.Fatalf("frame %d: id %d, %d-byte payload (%v); want DATA for 9 with 1440 bytes", frames, id, len(payload), err)
				}
				if got := binary.BigEndian.Uint32(payload[8:]); got != uint32(frames) {
					t.Fatalf("frame %d carries datagram %d: reordered", frames, got)
				}
				frames++
			}
		}
	}
	t.Logf("%d frames in %d reads (%d coalesced); kernel UDP GSO %v, GRO %v", frames, reads, coalesced, gso, gro)
	if gso && gro && coalesced == 0 {
		t.Errorf("%d frames arrived as %d datagrams: the relay frames were not sent with UDP GSO", frames, reads)
	}
	if st := b.Stats(); st.RelayedOut != n {
		t.Errorf("RelayedOut %d, want %d", st.RelayedOut, n)
	}
}

// udpOffloads turns on UDP GRO on c, gives it room for a batch sent one datagram at a time, and
// reports whether the kernel has UDP GSO and GRO.
func udpOffloads(t *testing.T, c *net.UDPConn) (gso, gro bool) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadBuffer(4 << 20)
	rc.Control(func(fd uintptr) {
		_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20) // beyond rmem_max, as root
		_, err := unix.GetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT)
		gso = err == nil
		gro = unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_GRO, 1) == nil
	})
	return gso, gro
}

// groSegment is the segment size of a UDP_GRO control message in oob, 0 without one.
func groSegment(oob []byte) int {
	for len(oob) >= unix.SizeofCmsghdr {
		hdr, data, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			return 0
		}
		if hdr.Level == unix.SOL_UDP && hdr.Type == unix.UDP_GRO && len(data) >= 4 {
			return int(binary.NativeEndian.Uint32(data))
		}
		oob = rest
	}
	return 0
}
