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
