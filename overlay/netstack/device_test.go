package netstack

import (
	"bytes"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/edgewire/edgewire/overlay/internal/vnet"
)

// outboundPacket builds a packet as the stack emits it: payload, then transport and network headers
// pushed in front.
func outboundPacket(payload []byte, gso stack.GSO) *stack.PacketBuffer {
	pb := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: 60, Payload: buffer.MakeWithData(payload)})
	copy(pb.TransportHeader().Push(20), bytes.Repeat([]byte{0x54}, 20))
	copy(pb.NetworkHeader().Push(20), bytes.Repeat([]byte{0x4e}, 20))
	pb.GSOOptions = gso
	return pb
}

func TestPacketSlices(t *testing.T) {
	payload := bytes.Repeat([]byte("payload-"), 1000)
	pb := outboundPacket(payload, stack.GSO{})
	defer pb.DecRef()
	got := bytes.Join(packetSlices(nil, pb), nil)
	want := bytes.Join(pb.AsSlices(), nil)
	if !bytes.Equal(got, want) || len(got) != 40+len(payload) {
		t.Fatalf("packetSlices: %d bytes, want the %d of AsSlices (40 + %d)", len(got), len(want), len(payload))
	}
}

func TestOffloadHeader(t *testing.T) {
	tcp4 := stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, CsumOffset: 16, MSS: 1380, L3HdrLen: 20}
	tcp6 := tcp4
	tcp6.Type = stack.GSOTCPv6
	for _, tc := range []struct {
		name    string
		payload int
		gso     stack.GSO
		want    vnet.Header
	}{
		{"full checksum", 3000, stack.GSO{}, vnet.Header{}},
		{"partial checksum, one segment", 1380, tcp4,
			vnet.Header{Flags: vnet.NeedsChecksum, HdrLen: 40, CsumStart: 20, CsumOffset: 16}},
		{"tcp4 segmentation", 1381, tcp4,
			vnet.Header{Flags: vnet.NeedsChecksum, GSOType: vnet.GSOTCPv4, HdrLen: 40, GSOSize: 1380, CsumStart: 20, CsumOffset: 16}},
		{"tcp6 segmentation", 60000, tcp6,
			vnet.Header{Flags: vnet.NeedsChecksum, GSOType: vnet.GSOTCPv6, HdrLen: 40, GSOSize: 1380, CsumStart: 20, CsumOffset: 16}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pb := outboundPacket(make([]byte, tc.payload), tc.gso)
			defer pb.DecRef()
			if got := offloadHeader(pb); got != tc.want {
				t.Fatalf("offloadHeader = %+v, want %+v", got, tc.want)
			}
		})
	}
}

// testPacket returns an IP packet of the given version and protocol, with a TCP header of tcpHdr
// bytes when proto is TCP, and size bytes in all.
func testPacket(version int, proto uint8, tcpHdr, size int) []byte {
	pkt := make([]byte, size)
	ip := 20
	if version == 4 {
		pkt[0], pkt[9] = 0x45, proto
	} else {
		pkt[0], pkt[6], ip = 0x60, proto, 40
	}
	if proto == 6 && size >= ip+20 {
		pkt[ip+12] = byte(tcpHdr/4) << 4
	}
	for i := ip; i < size; i++ {
		pkt[i] |= byte(i)
	}
	return pkt
}

func TestPacketPayload(t *testing.T) {
	for _, tc := range []struct {
		name    string
		pkt     []byte
		headers int // 0: one view; else the first view holds the headers and little more
	}{
		{"tcp4 super-packet", testPacket(4, 6, 32, 65000), 52},
		{"tcp6 super-packet", testPacket(6, 6, 20, 9000), 60},
		{"udp4, large", testPacket(4, 17, 0, 1400), 20},
		{"tcp4, 60-byte header", testPacket(4, 6, 60, 1500), 80},
		{"tcp4, small", testPacket(4, 6, 20, 200), 0},
		{"tcp4 header cut short", testPacket(4, 6, 20, 30), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := packetPayload(tc.pkt)
			defer b.Release()
			var sizes []int
			vl := b.AsViewList()
			for v := vl.Front(); v != nil; v = v.Next() {
				sizes = append(sizes, v.Size())
			}
			if tc.headers == 0 {
				if len(sizes) != 1 {
					t.Errorf("views %v, want one", sizes)
				}
			} else if len(sizes) != 2 || sizes[0] < tc.headers || sizes[0] > 128 {
				t.Errorf("views %v, want two, the first of %d to 128 bytes", sizes, tc.headers)
			}
			if got := b.Flatten(); !bytes.Equal(got, tc.pkt) {
				t.Errorf("payload differs from the packet (%d bytes, want %d)", len(got), len(tc.pkt))
			}
		})
	}
}
