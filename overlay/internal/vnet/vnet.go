// Package vnet owns the virtio_net_hdr that precedes every packet read from or written to a Linux TUN
// opened with IFF_VNET_HDR, and the segmentation-offload work that header implies: checking what the
// kernel hands over, splitting a TCP or UDP segmentation-offload super-packet into MTU-sized packets
// with their checksums, completing a partial checksum, and the Internet checksum itself.
//
// The header (struct virtio_net_hdr, 10 bytes, fields in host byte order as the kernel's TUN uses for a
// legacy header):
//
//	offset size field
//	0      1    flags        NeedsChecksum: the transport checksum is partial (CHECKSUM_PARTIAL)
//	1      1    gso_type     GSONone, GSOTCPv4, GSOTCPv6, GSOUDPL4
//	2      2    hdr_len      length of the IP and transport headers
//	4      2    gso_size     payload bytes per segment (the MSS for TCP)
//	6      2    csum_start   where the checksummed part starts (the IP header's length)
//	8      2    csum_offset  where the checksum sits, counted from csum_start
//
// A partial checksum field holds the folded sum of the pseudo-header, with the transport length of the
// whole packet, not complemented: the form the kernel's TSO and wireguard-go's GRO use.
package vnet

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
)

// HeaderLen is the length of the virtio_net_hdr.
const HeaderLen = 10

// Flags and GSO types of the header (linux/virtio_net.h).
const (
	NeedsChecksum = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM

	GSONone  = 0 // VIRTIO_NET_HDR_GSO_NONE
	GSOTCPv4 = 1 // VIRTIO_NET_HDR_GSO_TCPV4
	GSOUDPL4 = 5 // VIRTIO_NET_HDR_GSO_UDP_L4
	GSOTCPv6 = 4 // VIRTIO_NET_HDR_GSO_TCPV6
)

const (
	protoTCP = 6
	protoUDP = 17

	tcpFlagFIN = 0x01
	tcpFlagPSH = 0x08
)

// Header is a decoded virtio_net_hdr.
type Header struct {
	Flags      uint8
	GSOType    uint8
	HdrLen     uint16
	GSOSize    uint16
	CsumStart  uint16
	CsumOffset uint16
}

// Decode reads the header from the first HeaderLen bytes of b.
func (h *Header) Decode(b []byte) error {
	if len(b) < HeaderLen {
		return fmt.Errorf("vnet: %d bytes, shorter than the %d-byte virtio header", len(b), HeaderLen)
	}
	h.Flags = b[0]
	h.GSOType = b[1]
	h.HdrLen = binary.NativeEndian.Uint16(b[2:])
	h.GSOSize = binary.NativeEndian.Uint16(b[4:])
	h.CsumStart = binary.NativeEndian.Uint16(b[6:])
	h.CsumOffset = binary.NativeEndian.Uint16(b[8:])
	return nil
}

// Encode writes the header to the first HeaderLen bytes of b, which must be long enough.
func (h Header) Encode(b []byte) {
	b[0] = h.Flags
	b[1] = h.GSOType
	binary.NativeEndian.PutUint16(b[2:], h.HdrLen)
	binary.NativeEndian.PutUint16(b[4:], h.GSOSize)
	binary.NativeEndian.PutUint16(b[6:], h.CsumStart)
	binary.NativeEndian.PutUint16(b[8:], h.CsumOffset)
}

// IsTCPSegmentation reports whether the packet is a TCP segmentation-offload super-packet.
func (h Header) IsTCPSegmentation() bool { return h.GSOType == GSOTCPv4 || h.GSOType == GSOTCPv6 }

// Check validates the header against pkt, the IP packet it precedes, as read from the kernel, and
// recomputes HdrLen from the packet itself: the kernel's hdr_len may cover the whole first segment of a
// forwarded packet. It does not look at the payload. A packet that passes can be given to Split and
// Complete without bounds errors.
func Check(pkt []byte, h *Header) error {
	if len(pkt) == 0 {
		return errors.New("vnet: empty packet")
	}
	version := pkt[0] >> 4
	if version != 4 && version != 6 {
		return fmt.Errorf("vnet: IP version %d", version)
	}
	if h.Flags&NeedsChecksum != 0 {
		at := int(h.CsumStart) + int(h.CsumOffset)
		if h.CsumStart == 0 || at+2 > len(pkt) {
			return fmt.Errorf("vnet: checksum at %d+%d outside a %d-byte packet", h.CsumStart, h.CsumOffset, len(pkt))
		}
	}
	switch h.GSOType {
	case GSONone:
		return nil
	case GSOTCPv4, GSOTCPv6, GSOUDPL4:
	default:
		return fmt.Errorf("vnet: unsupported GSO type %d", h.GSOType)
	}
	if (h.GSOType == GSOTCPv4 && version != 4) || (h.GSOType == GSOTCPv6 && version != 6) {
		return fmt.Errorf("vnet: GSO type %d on an IPv%d packet", h.GSOType, version)
	}
	if h.Flags&NeedsChecksum == 0 {
		return fmt.Errorf("vnet: GSO type %d without a partial checksum", h.GSOType)
	}
	if h.GSOSize == 0 {
		return errors.New("vnet: GSO size 0")
	}
	minIP := 20
	if version == 6 {
		minIP = 40
	}
	if int(h.CsumStart) < minIP {
		return fmt.Errorf("vnet: checksum start %d inside the IPv%d header", h.CsumStart, version)
	}
	if h.GSOType == GSOUDPL4 {
		h.HdrLen = h.CsumStart + 8
	} else {
		if int(h.CsumStart)+20 > len(pkt) {
			return fmt.Errorf("vnet: %d-byte packet too short for a TCP header at %d", len(pkt), h.CsumStart)
		}
		tcpLen := uint16(pkt[h.CsumStart+12]>>4) * 4
		if tcpLen < 20 {
			return fmt.Errorf("vnet: TCP header length %d", tcpLen)
		}
		h.HdrLen = h.CsumStart + tcpLen
	}
	if int(h.HdrLen) > len(pkt) {
		return fmt.Errorf("vnet: headers of %d bytes in a %d-byte packet", h.HdrLen, len(pkt))
	}
	return nil
}

// ErrTooManySegments is returned by Split when a super-packet has more segments than buffers.
var ErrTooManySegments = errors.New("vnet: more segments than buffers")

// Split splits a segmentation-offload super-packet (pkt, with h checked by Check) into packets of at
// most h.GSOSize payload bytes each, written to bufs[i][offset:] with their lengths in sizes[i], each
// with its own IP header (IPv4 ID, lengths and header checksum updated), transport header (TCP
// sequence number, FIN and PSH on the last segment only; UDP length) and full transport checksum. It
// returns the number of packets. pkt's checksum fields are overwritten. A packet without segmentation
// is copied to bufs[0] with its partial checksum completed.
func Split(pkt []byte, h Header, bufs [][]byte, sizes []int, offset int) (int, error) {
	if h.GSOType == GSONone {
		if len(bufs) == 0 || len(bufs[0]) < offset+len(pkt) {
			return 0, fmt.Errorf("vnet: %d-byte packet does not fit the buffer", len(pkt))
		}
		if h.Flags&NeedsChecksum != 0 {
			Complete(pkt, h)
		}
		sizes[0] = copy(bufs[0][offset:], pkt)
		return 1, nil
	}
	v6 := pkt[0]>>4 == 6
	ipLen := int(h.CsumStart)
	hdrLen := int(h.HdrLen)
	csumAt := ipLen + int(h.CsumOffset)
	if !v6 {
		pkt[10], pkt[11] = 0, 0
	}
	pkt[csumAt], pkt[csumAt+1] = 0, 0
	proto := uint8(protoUDP)
	var seq uint32
	if h.IsTCPSegmentation() {
		proto = protoTCP
		seq = binary.BigEndian.Uint32(pkt[ipLen+4:])
	}
	var src, dst []byte
	if v6 {
		src, dst = pkt[8:24], pkt[24:40]
	} else {
		src, dst = pkt[12:16], pkt[16:20]
	}
	n := 0
	for at := hdrLen; at < len(pkt); n++ {
		if n == len(bufs) {
			return n, ErrTooManySegments
		}
		end := min(at+int(h.GSOSize), len(pkt))
		total := hdrLen + end - at
		out := bufs[n][offset:]
		if len(out) < total {
			return n, fmt.Errorf("vnet: %d-byte segment does not fit the buffer", total)
		}
		copy(out, pkt[:hdrLen])
		if v6 {
			binary.BigEndian.PutUint16(out[4:], uint16(total-ipLen))
		} else {
			binary.BigEndian.PutUint16(out[4:], binary.BigEndian.Uint16(pkt[4:])+uint16(n))
			binary.BigEndian.PutUint16(out[2:], uint16(total))
			binary.BigEndian.PutUint16(out[10:], ^Fold(Checksum(out[:ipLen], 0)))
		}
		if proto == protoTCP {
			binary.BigEndian.PutUint32(out[ipLen+4:], seq+uint32(n)*uint32(h.GSOSize))
			if end != len(pkt) {
				out[ipLen+13] &^= tcpFlagFIN | tcpFlagPSH
			}
		} else {
			binary.BigEndian.PutUint16(out[ipLen+4:], uint16(total-ipLen))
		}
		copy(out[hdrLen:], pkt[at:end])
		sum := PseudoHeaderSum(proto, src, dst, uint16(total-ipLen))
		binary.BigEndian.PutUint16(out[csumAt:], ^Fold(Checksum(out[ipLen:total], sum)))
		sizes[n] = total
		at = end
	}
	return n, nil
}

// Complete turns the partial checksum of pkt (h.Flags has NeedsChecksum, h checked by Check) into
// the full one, in place.
func Complete(pkt []byte, h Header) {
	at := int(h.CsumStart) + int(h.CsumOffset)
	partial := uint64(binary.BigEndian.Uint16(pkt[at:]))
	pkt[at], pkt[at+1] = 0, 0
	binary.BigEndian.PutUint16(pkt[at:], ^Fold(Checksum(pkt[h.CsumStart:], partial)))
}

// PseudoHeaderSum returns the unfolded sum of the TCP/UDP pseudo-header for addresses src and dst (4
// or 16 bytes each) and transport length length.
func PseudoHeaderSum(proto uint8, src, dst []byte, length uint16) uint64 {
	sum := Checksum(src, 0)
	sum = Checksum(dst, sum)
	return sum + uint64(proto) + uint64(length)
}

// Fold folds an unfolded sum to 16 bits (not complemented).
func Fold(sum uint64) uint16 {
	sum = (sum >> 32) + (sum & 0xffffffff)
	sum = (sum >> 32) + (sum & 0xffffffff)
	sum = (sum >> 16) + (sum & 0xffff)
	sum = (sum >> 16) + (sum & 0xffff)
	return uint16(sum)
}

// Checksum adds b, as big-endian 16-bit words (an odd last byte padded with zero), to the unfolded
// one's-complement sum initial and returns the result, unfolded. It reads eight bytes at a time.
func Checksum(b []byte, initial uint64) uint64 {
	// Sum in host order, 64 bits at a time, with end-around carry; byte-swap the folded 16-bit result
	// at the end when the host is little-endian (one's-complement sums commute with byte swapping).
	var ac, carry uint64
	for len(b) >= 32 {
		ac, carry = bits.Add64(ac, binary.NativeEndian.Uint64(b), 0)
		ac, carry = bits.Add64(ac, binary.NativeEndian.Uint64(b[8:]), carry)
		ac, carry = bits.Add64(ac, binary.NativeEndian.Uint64(b[16:]), carry)
		ac, carry = bits.Add64(ac, binary.NativeEndian.Uint64(b[24:]), carry)
		ac += carry
		b = b[32:]
	}
	for len(b) >= 8 {
		ac, carry = bits.Add64(ac, binary.NativeEndian.Uint64(b), 0)
		ac += carry
		b = b[8:]
	}
	if len(b) >= 4 {
		ac, carry = bits.Add64(ac, uint64(binary.NativeEndian.Uint32(b)), 0)
		ac += carry
		b = b[4:]
	}
	if len(b) >= 2 {
		ac, carry = bits.Add64(ac, uint64(binary.NativeEndian.Uint16(b)), 0)
		ac += carry
		b = b[2:]
	}
	if len(b) == 1 {
		ac, carry = bits.Add64(ac, uint64(binary.NativeEndian.Uint16([]byte{b[0], 0})), 0)
		ac += carry
	}
	folded := Fold(ac)
	if littleEndian {
		folded = bits.ReverseBytes16(folded)
	}
	sum, carry := bits.Add64(initial, uint64(folded), 0)
	return sum + carry
}

var littleEndian = binary.NativeEndian.Uint16([]byte{1, 0}) == 1
