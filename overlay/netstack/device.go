package netstack

import (
	"encoding/binary"
	"log/slog"
	"net/netip"
	"os"

	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/edgewire/edgewire/overlay/internal/vnet"
)

// This file is the Stack's tun.Device side: packets in (Write) and out (Read). The gVisor link endpoint
// between them is in link.go.

const (
	// outQueueLen is how many emitted packets the link endpoint queues before the stack sees
	// ErrNoBufferSpace (TCP then retransmits).
	outQueueLen = 4096
	// batchSize is the device's preferred batch, as wireguard-go's Linux TUN (conn.IdealBatchSize).
	batchSize = 128
)

// Write delivers IP packets (bufs[i][offset:]) into the stack. Packets that are not well-formed IPv4 or
// IPv6 are dropped and counted (Stats.DroppedMalformed), and so are packets to addresses the stack does not
// serve (Stats.DroppedNotServed); a drop is not an error. Write returns len(bufs) and nil, or os.ErrClosed
// after Close.
//
// The packets' checksums are not verified: they come from the local kernel, over the TUN, either
// computed or left partial for the device to complete (a segmentation-offload super-packet the
// Splitter hands over whole, up to 64 KiB: the stack's TCP takes segments of any size).
func (s *Stack) Write(bufs [][]byte, offset int) (int, error) {
	if s.down.Load() {
		return 0, os.ErrClosed
	}
	var arr [batchSize]*stack.PacketBuffer
	pkts := arr[:0]
	for _, b := range bufs {
		if offset < 0 || len(b) <= offset {
			s.droppedMalformed.Add(1)
			continue
		}
		pkt := b[offset:]
		proto, dst, ok := parseDst(pkt)
		if !ok {
			s.droppedMalformed.Add(1)
			s.logf(slog.LevelDebug, "dropped malformed packet", "len", len(pkt))
			continue
		}
		local, served := s.serves(dst)
		if !served {
			s.droppedNotServed.Add(1)
			s.logf(slog.LevelDebug, "dropped packet to an address not served", "dst", dst)
			continue
		}
		if local && s.cfg.AdmitLocalUDP != nil {
			if src, port, ok := udpSource(pkt); ok && !s.cfg.AdmitLocalUDP(src, netip.AddrPortFrom(dst, port)) {
				s.droppedPoliced.Add(1)
				continue
			}
		}
		pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: packetPayload(pkt)})
		pb.NetworkProtocolNumber = proto
		pb.RXChecksumValidated = true
		pkts = append(pkts, pb)
		if len(pkts) == cap(pkts) {
			s.link.deliver(pkts)
			s.packetsIn.Add(uint64(len(pkts)))
			pkts = pkts[:0]
		}
	}
	if len(pkts) > 0 {
		s.link.deliver(pkts)
		s.packetsIn.Add(uint64(len(pkts)))
	}
	return len(bufs), nil
}

// Read blocks until the stack emits a packet, then returns it and whatever else is queued, up to len(bufs),
// each written at bufs[i][offset:] with its length in sizes[i]. It returns os.ErrClosed after Close.
// A packet larger than its buffer is dropped and counted (Stats.DroppedOutbound).
func (s *Stack) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	if len(bufs) == 0 {
		return 0, nil
	}
	var arr [batchSize]*stack.PacketBuffer
	for {
		if s.down.Load() {
			return 0, os.ErrClosed
		}
		m := s.link.read(s.ctx, arr[:min(len(bufs), len(arr))])
		if m == 0 {
			return 0, os.ErrClosed
		}
		n := 0
		for _, pb := range arr[:m] {
			if size, ok := copyPacket(bufs[n][offset:], pb); ok {
				sizes[n] = size
				n++
			} else {
				s.droppedOutbound.Add(1)
				s.logf(slog.LevelDebug, "dropped outbound packet larger than the read buffer", "len", pb.Size(), "buffer", len(bufs[n])-offset)
			}
			pb.DecRef()
		}
		clear(arr[:m])
		if n > 0 {
			s.packetsOut.Add(uint64(n))
			return n, nil
		}
	}
}

// splitPayloadAt is the packet size from which packetPayload keeps the headers in a view of their own.
const splitPayloadAt = 1024

// packetPayload copies pkt into a gVisor buffer. A large packet's IP and TCP headers get a view of
// their own (a small chunk, whose spare room takes the first bytes of payload): gVisor's IP layer
// holds a clone of the network header's view while it handles a packet, then reads the header again,
// and that copies the whole chunk under the header when it is shared. With the headers apart, the
// copy is a hundred bytes, not up to 64 KiB of payload.
func packetPayload(pkt []byte) buffer.Buffer {
	if len(pkt) < splitPayloadAt {
		return buffer.MakeWithData(pkt)
	}
	n := headersLen(pkt)
	if n <= 0 || n >= len(pkt) {
		return buffer.MakeWithData(pkt)
	}
	b := buffer.MakeWithData(pkt[:n])
	b.Append(buffer.NewViewWithData(pkt[n:]))
	return b
}

// headersLen returns the length of pkt's IP header and, for TCP, its TCP header; 0 when they do not
// fit in pkt (parseDst has checked the IP header).
func headersLen(pkt []byte) int {
	var n int
	var proto uint8
	switch pkt[0] >> 4 {
	case 4:
		n, proto = int(pkt[0]&0x0f)*4, pkt[9]
	case 6:
		n, proto = header.IPv6MinimumSize, pkt[6]
	default:
		return 0
	}
	if proto != uint8(header.TCPProtocolNumber) {
		return n
	}
	if len(pkt) < n+header.TCPMinimumSize {
		return 0
	}
	return n + int(pkt[n+12]>>4)*4
}

func copyPacket(dst []byte, pb *stack.PacketBuffer) (int, bool) {
	size := pb.Size()
	if size > len(dst) {
		return 0, false
	}
	n := 0
	for _, sl := range pb.AsSlices() {
		n += copy(dst[n:], sl)
	}
	return n, true
}

// parseDst checks the IP header of pkt and returns its network protocol and destination.
func parseDst(pkt []byte) (tcpip.NetworkProtocolNumber, netip.Addr, bool) {
	if len(pkt) == 0 {
		return 0, netip.Addr{}, false
	}
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < header.IPv4MinimumSize {
			return 0, netip.Addr{}, false
		}
		ihl := int(pkt[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(pkt[2:4]))
		if ihl < header.IPv4MinimumSize || total < ihl || total > len(pkt) {
			return 0, netip.Addr{}, false
		}
		return header.IPv4ProtocolNumber, netip.AddrFrom4([4]byte(pkt[16:20])), true
	case 6:
		if len(pkt) < header.IPv6MinimumSize {
			return 0, netip.Addr{}, false
		}
		if header.IPv6MinimumSize+int(binary.BigEndian.Uint16(pkt[4:6])) > len(pkt) {
			return 0, netip.Addr{}, false
		}
		return header.IPv6ProtocolNumber, netip.AddrFrom16([16]byte(pkt[24:40])), true
	}
	return 0, netip.Addr{}, false
}

// serves reports whether dst is a local address or in a service prefix.
func (s *Stack) serves(dst netip.Addr) (local, served bool) {
	for _, a := range s.cfg.LocalAddrs {
		if a == dst {
			return true, true
		}
	}
	for _, p := range s.cfg.Prefixes {
		if p.Contains(dst) {
			return false, true
		}
	}
	return false, false
}

// udpSource returns the source address and destination port of pkt, a well-formed IP packet (see
// parseDst), when it is UDP without IPv6 extension headers; ok is false otherwise.
func udpSource(pkt []byte) (src netip.Addr, dport uint16, ok bool) {
	switch pkt[0] >> 4 {
	case 4:
		ihl := int(pkt[0]&0x0f) * 4
		if pkt[9] != uint8(header.UDPProtocolNumber) || len(pkt) < ihl+header.UDPMinimumSize {
			return netip.Addr{}, 0, false
		}
		return netip.AddrFrom4([4]byte(pkt[12:16])), binary.BigEndian.Uint16(pkt[ihl+2:]), true
	case 6:
		if pkt[6] != uint8(header.UDPProtocolNumber) || len(pkt) < header.IPv6MinimumSize+header.UDPMinimumSize {
			return netip.Addr{}, 0, false
		}
		return netip.AddrFrom16([16]byte(pkt[8:24])), binary.BigEndian.Uint16(pkt[header.IPv6MinimumSize+2:]), true
	}
	return netip.Addr{}, 0, false
}

// MTU returns the MTU of the device.
func (s *Stack) MTU() (int, error) { return s.cfg.MTU, nil }

// Name returns "netstack": the device has no kernel name.
func (s *Stack) Name() (string, error) { return "netstack", nil }

// File returns nil: the device has no file descriptor.
func (s *Stack) File() *os.File { return nil }

// Events returns the device's event channel: EventUp once, closed by Close.
func (s *Stack) Events() <-chan tun.Event { return s.events }

// BatchSize returns the largest batch Read fills.
func (s *Stack) BatchSize() int { return batchSize }

// PumpOffload writes every packet the stack emits through write, with its virtio header, until the
// Stack closes; it implements the overlay/tun OffloadDevice. Once it runs, TCP connections set up
// afterwards emit segmentation-offload packets of up to 64 KiB with partial checksums, which the kernel
// TUN takes whole (and splits itself when it forwards them); other packets carry full checksums and a
// plain header. Read must not be used alongside. PumpOffload returns nil when the Stack closes, or the
// first error of write.
func (s *Stack) PumpOffload(write func(h vnet.Header, parts [][]byte) error) error {
	s.link.gso.Store(true)
	var arr [batchSize]*stack.PacketBuffer
	parts := make([][]byte, 0, 8)
	for {
		if s.down.Load() {
			return nil
		}
		m := s.link.read(s.ctx, arr[:])
		if m == 0 {
			return nil
		}
		var err error
		for i, pb := range arr[:m] {
			if err == nil {
				h := offloadHeader(pb)
				parts = packetSlices(parts[:0], pb)
				err = write(h, parts)
				clear(parts)
				if err == nil {
					s.packetsOut.Add(1)
				}
			}
			pb.DecRef()
			arr[i] = nil
		}
		if err != nil {
			return err
		}
	}
}

// packetSlices appends the slices of pb's bytes to dst, without copying them (pb.AsSlices, minus its
// allocation).
func packetSlices(dst [][]byte, pb *stack.PacketBuffer) [][]byte {
	vl, off := pb.AsViewList()
	for v := vl.Front(); v != nil; v = v.Next() {
		b := v.AsSlice()
		if off >= len(b) {
			off -= len(b)
			continue
		}
		dst = append(dst, b[off:])
		off = 0
	}
	return dst
}

// offloadHeader returns the virtio header of an emitted packet: none for a packet with full
// checksums; a partial checksum, and TCP segmentation when the payload exceeds the MSS, for a packet
// of a connection with GSO.
func offloadHeader(pb *stack.PacketBuffer) vnet.Header {
	g := pb.GSOOptions
	if g.Type == stack.GSONone || !g.NeedsCsum {
		return vnet.Header{}
	}
	l3 := uint16(len(pb.NetworkHeader().Slice()))
	l4 := uint16(len(pb.TransportHeader().Slice()))
	h := vnet.Header{Flags: vnet.NeedsChecksum, HdrLen: l3 + l4, CsumStart: l3, CsumOffset: g.CsumOffset}
	if pb.Data().Size() > int(g.MSS) && g.MSS > 0 {
		h.GSOSize = g.MSS
		h.GSOType = vnet.GSOTCPv4
		if g.Type == stack.GSOTCPv6 {
			h.GSOType = vnet.GSOTCPv6
		}
	}
	return h
}
