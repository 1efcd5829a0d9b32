// Package tuntest owns test fakes for wireguard-go tun.Devices: a channel-backed device (ChannelTUN) and
// builders of well-formed IPv4/IPv6 UDP packets, for tests of code that reads and writes packet batches.
package tuntest

import (
	"encoding/binary"
	"net/netip"
	"os"
	"sync"

	"golang.zx2c4.com/wireguard/tun"
)

// ChannelTUN is a fake tun.Device backed by channels. Packets sent on Inbound are what Read returns
// (as if they arrived at the device); packets given to Write are copied and sent on Outbound. Read
// blocks for the first packet and then takes what else is queued, up to len(bufs) and the batch size.
// After Close, Read and Write return os.ErrClosed; Inbound and Outbound are never closed.
type ChannelTUN struct {
	Inbound  chan []byte
	Outbound chan []byte

	name      string
	batch     int
	events    chan tun.Event
	closed    chan struct{}
	closeOnce sync.Once
}

var _ tun.Device = (*ChannelTUN)(nil)

// NewChannelTUN returns a ChannelTUN called name with the given batch size (at least 1) and channels of
// the given capacity.
func NewChannelTUN(name string, batch, capacity int) *ChannelTUN {
	c := &ChannelTUN{
		Inbound:  make(chan []byte, capacity),
		Outbound: make(chan []byte, capacity),
		name:     name,
		batch:    max(batch, 1),
		events:   make(chan tun.Event, 1),
		closed:   make(chan struct{}),
	}
	c.events <- tun.EventUp
	return c
}

// Read implements tun.Device.
func (c *ChannelTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	var pkt []byte
	select {
	case <-c.closed:
		return 0, os.ErrClosed
	case pkt = <-c.Inbound:
	}
	n := 0
	limit := min(len(bufs), c.batch)
	for {
		sizes[n] = copy(bufs[n][offset:], pkt)
		n++
		if n == limit {
			return n, nil
		}
		select {
		case pkt = <-c.Inbound:
		default:
			return n, nil
		}
	}
}

// Write implements tun.Device: it sends a copy of each packet on Outbound.
func (c *ChannelTUN) Write(bufs [][]byte, offset int) (int, error) {
	for i, b := range bufs {
		pkt := append([]byte(nil), b[offset:]...)
		select {
		case <-c.closed:
			return i, os.ErrClosed
		case c.Outbound <- pkt:
		}
	}
	return len(bufs), nil
}

// MTU implements tun.Device.
func (c *ChannelTUN) MTU() (int, error) { return 1420, nil }

// Name implements tun.Device.
func (c *ChannelTUN) Name() (string, error) { return c.name, nil }

// File implements tun.Device; it returns nil.
func (c *ChannelTUN) File() *os.File { return nil }

// Events implements tun.Device.
func (c *ChannelTUN) Events() <-chan tun.Event { return c.events }

// BatchSize implements tun.Device.
func (c *ChannelTUN) BatchSize() int { return c.batch }

// Close implements tun.Device; it is idempotent.
func (c *ChannelTUN) Close() error {
	c.closeOnce.Do(func() {
		close(c.closed)
		close(c.events)
	})
	return nil
}

// UDPPacket returns an IPv4 or IPv6 (by src's family; dst must match) UDP packet from src to dst
// carrying payload, with valid lengths and checksums.
func UDPPacket(src, dst netip.AddrPort, payload []byte) []byte {
	const udpLen = 8
	ulen := udpLen + len(payload)
	var pkt []byte
	var ipHdr int
	if src.Addr().Is4() {
		ipHdr = 20
		pkt = make([]byte, ipHdr+ulen)
		pkt[0] = 4<<4 | 5
		binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
		pkt[8] = 64 // TTL
		pkt[9] = 17 // UDP
		s4, d4 := src.Addr().As4(), dst.Addr().As4()
		copy(pkt[12:16], s4[:])
		copy(pkt[16:20], d4[:])
		binary.BigEndian.PutUint16(pkt[10:], ^checksum(pkt[:ipHdr], 0))
	} else {
		ipHdr = 40
		pkt = make([]byte, ipHdr+ulen)
		pkt[0] = 6 << 4
		binary.BigEndian.PutUint16(pkt[4:], uint16(ulen))
		pkt[6] = 17 // next header: UDP
		pkt[7] = 64 // hop limit
		s16, d16 := src.Addr().As16(), dst.Addr().As16()
		copy(pkt[8:24], s16[:])
		copy(pkt[24:40], d16[:])
	}
	u := pkt[ipHdr:]
	binary.BigEndian.PutUint16(u[0:], src.Port())
	binary.BigEndian.PutUint16(u[2:], dst.Port())
	binary.BigEndian.PutUint16(u[4:], uint16(ulen))
	copy(u[8:], payload)

	// Pseudo-header checksum.
	var sum uint32
	addrs := pkt[12:20]
	if ipHdr == 40 {
		addrs = pkt[8:40]
	}
	sum = sumWords(addrs, sum)
	sum += 17 + uint32(ulen)
	csum := ^checksum(u, fold(sum))
	if csum == 0 {
		csum = 0xffff
	}
	binary.BigEndian.PutUint16(u[6:], csum)
	return pkt
}

func sumWords(b []byte, sum uint32) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	return sum
}

func fold(sum uint32) uint16 {
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}

// checksum is the internet checksum (RFC 1071) of b, continuing from initial; the caller complements it.
func checksum(b []byte, initial uint16) uint16 {
	return fold(sumWords(b, uint32(initial)))
}
