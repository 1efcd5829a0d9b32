//go:build linux

package relay

import (
	"encoding/binary"
	"errors"
	"net"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// UDP offloads, as wireguard-go's conn.StdNetBind uses them: with UDP_GRO set, the kernel hands
// the socket several datagrams of one flow as one buffer of equal-sized segments (the last may be
// shorter) and says the segment size in a control message; a UDP_SEGMENT control message on send
// asks the kernel to cut one buffer into datagrams of that size, which cross the stack (and every
// veth, bridge and NAT on the way) as one packet.

// udpSocketBuffer is the size asked for the relay's socket buffers, as wireguard-go asks for its
// own: bursts from many nodes must not overflow the default 208 KiB.
const udpSocketBuffer = 7 << 20

// maxGSOSegments is the kernel's limit of segments in one UDP_SEGMENT send.
const maxGSOSegments = 64

// offloadOOBSize is the control buffer a message needs for UDP_GRO (an int) or UDP_SEGMENT (a
// u16). A smaller one would truncate the GRO size, and a GRO buffer would pass for one datagram.
var offloadOOBSize = unix.CmsgSpace(4)

// setupSocket enlarges conn's buffers (beyond the sysctl limits when allowed) and turns on UDP
// GRO; it reports whether the kernel segments on send (tx) and coalesces on receive (rx).
func setupSocket(conn *net.UDPConn) (tx, rx bool) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return false, false
	}
	err = rc.Control(func(fd uintptr) {
		s := int(fd)
		_ = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_RCVBUF, udpSocketBuffer)
		_ = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_SNDBUF, udpSocketBuffer)
		_ = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, udpSocketBuffer)
		_ = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, udpSocketBuffer)
		_, errSeg := unix.GetsockoptInt(s, unix.IPPROTO_UDP, unix.UDP_SEGMENT)
		tx = errSeg == nil
		rx = unix.SetsockoptInt(s, unix.IPPROTO_UDP, unix.UDP_GRO, 1) == nil
	})
	if err != nil {
		return false, false
	}
	return tx, rx
}

// groSize returns the segment size of a UDP_GRO control message in oob, 0 when there is none
// (the buffer holds one datagram).
func groSize(oob []byte) int {
	for len(oob) >= unix.SizeofCmsghdr {
		hdr, data, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			return 0
		}
		if hdr.Level == unix.SOL_UDP && hdr.Type == unix.UDP_GRO && len(data) >= 4 {
			return int(binary.NativeEndian.Uint32(data)) // the kernel writes an int
		}
		oob = rest
	}
	return 0
}

// appendGSO appends a UDP_SEGMENT control message for segments of size bytes to oob.
func appendGSO(oob []byte, size int) []byte {
	start := len(oob)
	space := unix.CmsgSpace(2)
	oob = append(oob, make([]byte, space)...)
	b := oob[start:]
	hdr := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	hdr.Level = unix.SOL_UDP
	hdr.Type = unix.UDP_SEGMENT
	hdr.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(b[unix.CmsgLen(0):], uint16(size)) // a u16, host byte order
	return oob
}

// shouldDisableGSO reports whether a send failed because the route's device cannot checksum
// segments (EIO from udp_send_skb): sends must then go without UDP_SEGMENT.
func shouldDisableGSO(err error) bool {
	var serr *os.SyscallError
	return errors.As(err, &serr) && serr.Err == unix.EIO
}
