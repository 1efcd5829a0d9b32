package path

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"
)

// primeRaw opens the own NAT mapping towards dst: it sends primeCount IPv4 UDP datagrams carrying
// payload from the route's source address and srcPort (the WireGuard socket's port) with the given
// TTL, through a raw socket (IP_HDRINCL), so the WireGuard socket keeps its own TTL. It needs
// CAP_NET_RAW.
func primeRaw(srcPort uint16, dst netip.AddrPort, ttl int, payload []byte) error {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if !dst.Addr().Is4() {
		return fmt.Errorf("prime %s: IPv4 only", dst)
	}
	if srcPort == 0 {
		return fmt.Errorf("prime %s: WireGuard socket not open", dst)
	}
	src, err := routeSource(dst)
	if err != nil {
		return fmt.Errorf("prime %s: %w", dst, err)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return fmt.Errorf("prime %s: raw socket: %w", dst, err)
	}
	defer unix.Close(fd)
	pkt := buildUDP4(netip.AddrPortFrom(src, srcPort), dst, ttl, payload)
	sa := &unix.SockaddrInet4{Addr: dst.Addr().As4()}
	for range primeCount {
		if err := unix.Sendto(fd, pkt, 0, sa); err != nil {
			return fmt.Errorf("prime %s: send: %w", dst, err)
		}
	}
	return nil
}

// routeSource is the source address the kernel picks for dst (a connected UDP socket sends nothing).
func routeSource(dst netip.AddrPort) (netip.Addr, error) {
	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(dst))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("route lookup: %w", err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap(), nil
}

// buildUDP4 builds an IPv4 header (no options) and a UDP header with checksum around payload.
func buildUDP4(src, dst netip.AddrPort, ttl int, payload []byte) []byte {
	const ihl, udpLen = 20, 8
	total := ihl + udpLen + len(payload)
	b := make([]byte, total)
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(total))
	b[6] = 0x40 // don't fragment
	b[8] = byte(ttl)
	b[9] = unix.IPPROTO_UDP
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(b[12:16], s[:])
	copy(b[16:20], d[:])
	binary.BigEndian.PutUint16(b[10:], checksum(b[:ihl], 0))
	u := b[ihl:]
	binary.BigEndian.PutUint16(u[0:], src.Port())
	binary.BigEndian.PutUint16(u[2:], dst.Port())
	binary.BigEndian.PutUint16(u[4:], uint16(udpLen+len(payload)))
	copy(u[udpLen:], payload)
	// Pseudo-header: addresses, protocol, UDP length.
	var sum uint32
	for i := 0; i < 4; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(s[i:])) + uint32(binary.BigEndian.Uint16(d[i:]))
	}
	sum += unix.IPPROTO_UDP + uint32(len(u))
	cs := checksum(u, sum)
	if cs == 0 {
		cs = 0xffff
	}
	binary.BigEndian.PutUint16(u[6:], cs)
	return b
}

// checksum is the Internet checksum of b, starting from sum.
func checksum(b []byte, sum uint32) uint16 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
