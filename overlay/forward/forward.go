// Package forward owns agent-to-agent forwarding over the WireGuard overlay: the small request
// protocol by which one node's agent asks another node's agent to connect a flow to one of that
// node's endpoints, the client side (Dialer) and the server side (Listener).
//
// The client-side agent terminates a flow to a service IP in its service netstack and picks an
// endpoint; when the endpoint runs on node B it dials B's overlay address on the forward port
// (DefaultPort, 51821) with Dialer, names the target endpoint in a header and splices. On B, the
// Listener is bound to the overlay address and, through SO_BINDTODEVICE, to the TUN device mesh0, so
// only WireGuard-authenticated peers reach it. It asks ListenerConfig.Allow whether the target is a
// local endpoint of a known service, dials it and copies both ways. Anything else is refused and
// counted: the mesh is never an open proxy into a node's network. UDP keeps datagram boundaries.
//
// The Listener caps what its peers can make it hold, per peer (a peer is a node, known by its
// overlay address) and in total: TCP connections (each costs two file descriptors, the peer's and
// the target's; a connection takes its slot from accept, before its header, so silent connections
// count too) and UDP flows (one descriptor each). The default caps are shares of the process's
// RLIMIT_NOFILE (see overlay/internal/flows). What is over a cap is refused at once and counted
// (Stats), never left to run the process out of descriptors. A flow holds no buffer while idle:
// a 64 KiB buffer is taken from a pool only while data is waiting, and no splice pipe is used.
//
// # Wire format, version 1
//
// A request header is 12 bytes (IPv4 target) or 24 bytes (IPv6 target), all integers big-endian:
//
//	offset  size  field
//	0       2     magic "EW" (0x45 0x57)
//	2       1     version, 1
//	3       1     protocol: 6 TCP, 17 UDP
//	4       1     address family of the target: 4 or 6
//	5       1     flags, reserved: must be 0
//	6       2     target port, not 0
//	8       4|16  target address (family 4: 4 bytes; family 6: 16 bytes), not unspecified
//
// Parsers check the fields in this order and reject the header at the first bad one. A later
// version keeps bytes 0-2 as they are, so a version-1 server can tell it apart from garbage. An
// IPv4-mapped IPv6 target is read as the IPv4 address it maps, so Allow sees one spelling only.
//
// # TCP flow
//
// The client connects to [node overlay address]:51821, writes the header and waits for one status
// byte, which the server sends after reading exactly the header and before any payload:
//
//	0  ok: the target is connected; from the next byte on, both directions are the flow's payload
//	1  not allowed: the target is not a local endpoint of a known service
//	2  dial failed: the target refused or did not answer within the server's dial timeout
//	3  bad request: malformed header, wrong protocol, or no whole header within the header
//	   timeout (5 s by default)
//	4  unsupported version
//	5  busy: the server holds its cap of TCP connections from this peer (its overlay address) or
//	   in all (ListenerConfig.MaxTCPFlowsPerPeer, MaxTCPFlows); sent as soon as the connection
//	   is accepted, before the header is read, and the connection is closed behind it. A client
//	   may try another endpoint or later. (Should the header already have arrived, the close may
//	   reach the client as a reset right after the status byte.)
//
// A client may connect ahead of need (Dialer.Spares: a flow then waits for one round trip, the
// status, instead of two) and close such a spare connection unused, before its first byte: the
// server counts it (Stats.Unused) and answers nothing. A spare not used within the server's header
// timeout gets status 3 like any silent client.
//
// The client may send payload right behind the header, before the status ("early data", at most
// MaxEarly bytes from this package's Dialer): the server reads exactly the header, leaves what
// follows unread until the target is connected, and relays it from there. After a non-zero status
// the server closes the connection and everything sent behind the header is dropped, so a client
// that sent early data keeps it until the status and may fail over to another endpoint with it.
// After status 0, each side's half-close (FIN) is passed on to the other, and the connection ends
// when both directions have ended.
//
// # UDP flow
//
// The client uses one socket per flow, connected to [node overlay address]:51821. Every datagram
// it sends is the header followed by the payload, so the header cuts the largest payload by its
// length. The server keys flows by (client address, target): the first accepted datagram of a flow
// opens a socket connected to the target; its payload and the next ones are sent there. Each
// datagram from the target goes back to the client address as it is, without a header, from the
// listener's address. There is no status: a datagram with a bad header, or for a target Allow
// refuses, or beyond the flow limit is dropped and counted. A flow idle in both directions for
// ListenerConfig.UDPIdleTimeout is closed.
package forward

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/edgewire/edgewire/discovery"
)

// DefaultPort is the forward port, TCP and UDP, on every node's overlay address.
const DefaultPort = 51821

// Version is the protocol version this package speaks.
const Version = 1

// Header lengths on the wire.
const (
	headerFixedLen = 8
	HeaderLen4     = headerFixedLen + 4  // IPv4 target
	HeaderLen6     = headerFixedLen + 16 // IPv6 target
)

const (
	magic0, magic1 = 'E', 'W'
	protoTCP       = 6
	protoUDP       = 17
)

// Header is a forward request: the protocol and the target endpoint on the server's node.
type Header struct {
	Proto  discovery.Protocol // discovery.TCP or discovery.UDP
	Target netip.AddrPort
}

// Status is the server's one-byte answer to a TCP request.
type Status byte

// Status codes; see the package doc.
const (
	StatusOK                 Status = 0
	StatusNotAllowed         Status = 1
	StatusDialFailed         Status = 2
	StatusBadRequest         Status = 3
	StatusUnsupportedVersion Status = 4
	StatusBusy               Status = 5
)

// Errors; test them with errors.Is.
var (
	// ErrMalformed: a header is not a valid version-1 header (ParseHeader), or a Header cannot be
	// sent (Dialer).
	ErrMalformed = errors.New("malformed forward header")
	// ErrUnsupportedVersion: a header of another version (ParseHeader), or status 4 (Dialer).
	ErrUnsupportedVersion = errors.New("unsupported forward protocol version")
	// ErrRefused: status 1, the server does not allow the target.
	ErrRefused = errors.New("forward target not allowed")
	// ErrDialFailed: status 2, the server could not connect to the target.
	ErrDialFailed = errors.New("forward target dial failed")
	// ErrBadRequest: status 3, the server rejected the header.
	ErrBadRequest = errors.New("forward request rejected as malformed")
	// ErrBusy: status 5, the server is at its cap of connections from this node or in all.
	ErrBusy = errors.New("forward server busy: connection cap reached")
	// ErrProtocol: the server answered with something other than a known status.
	ErrProtocol = errors.New("forward protocol error")
)

// err returns the error a client reports for status s, nil for StatusOK.
func (s Status) err() error {
	switch s {
	case StatusOK:
		return nil
	case StatusNotAllowed:
		return ErrRefused
	case StatusDialFailed:
		return ErrDialFailed
	case StatusBadRequest:
		return ErrBadRequest
	case StatusUnsupportedVersion:
		return ErrUnsupportedVersion
	case StatusBusy:
		return ErrBusy
	default:
		return fmt.Errorf("%w: unknown status %d", ErrProtocol, byte(s))
	}
}

// Validate reports whether h can be sent: Proto TCP or UDP, a specified target address and a
// non-zero port.
func (h Header) Validate() error {
	if h.Proto != discovery.TCP && h.Proto != discovery.UDP {
		return fmt.Errorf("%w: protocol %q", ErrMalformed, h.Proto)
	}
	a := h.Target.Addr()
	if !a.IsValid() || a.IsUnspecified() {
		return fmt.Errorf("%w: target address %v", ErrMalformed, a)
	}
	if h.Target.Port() == 0 {
		return fmt.Errorf("%w: target port 0", ErrMalformed)
	}
	return nil
}

// MarshalHeader appends the wire form of h to dst and returns the extended slice. An IPv4-mapped
// target is sent as IPv4 and a zone is dropped. h should pass Validate: the protocol or family byte
// of an invalid header is written as 0, which every parser rejects.
func MarshalHeader(dst []byte, h Header) []byte {
	var proto byte
	switch h.Proto {
	case discovery.TCP:
		proto = protoTCP
	case discovery.UDP:
		proto = protoUDP
	}
	a := h.Target.Addr().Unmap()
	var family byte
	switch {
	case a.Is4():
		family = 4
	case a.Is6():
		family = 6
	}
	dst = append(dst, magic0, magic1, Version, proto, family, 0)
	dst = binary.BigEndian.AppendUint16(dst, h.Target.Port())
	switch family {
	case 4:
		b := a.As4()
		dst = append(dst, b[:]...)
	case 6:
		b := a.As16()
		dst = append(dst, b[:]...)
	}
	return dst
}

// ParseHeader reads one header from the front of b and returns it with its length in bytes. Every
// error wraps ErrMalformed, except a header of another version, which wraps
// ErrUnsupportedVersion. b may be longer than the header (a UDP datagram's payload follows it).
func ParseHeader(b []byte) (Header, int, error) {
	if len(b) < 3 {
		return Header{}, 0, fmt.Errorf("%w: short header: %d bytes", ErrMalformed, len(b))
	}
	if err := checkVersion(b); err != nil {
		return Header{}, 0, err
	}
	if len(b) < headerFixedLen {
		return Header{}, 0, fmt.Errorf("%w: short header: %d bytes", ErrMalformed, len(b))
	}
	n, err := checkFixed(b)
	if err != nil {
		return Header{}, 0, err
	}
	if len(b) < n {
		return Header{}, 0, fmt.Errorf("%w: truncated target address: %d of %d bytes", ErrMalformed, len(b), n)
	}
	var h Header
	switch b[3] {
	case protoTCP:
		h.Proto = discovery.TCP
	case protoUDP:
		h.Proto = discovery.UDP
	}
	port := binary.BigEndian.Uint16(b[6:8])
	addr, _ := netip.AddrFromSlice(b[headerFixedLen:n])
	addr = addr.Unmap()
	if addr.IsUnspecified() {
		return Header{}, 0, fmt.Errorf("%w: unspecified target address %v", ErrMalformed, addr)
	}
	if port == 0 {
		return Header{}, 0, fmt.Errorf("%w: target port 0", ErrMalformed)
	}
	h.Target = netip.AddrPortFrom(addr, port)
	return h, n, nil
}

// checkVersion checks the magic and version in the first 3 bytes of b; len(b) must be at least 3.
func checkVersion(b []byte) error {
	if b[0] != magic0 || b[1] != magic1 {
		return fmt.Errorf("%w: bad magic %#x", ErrMalformed, b[:2])
	}
	if b[2] != Version {
		return fmt.Errorf("%w: version %d, want %d", ErrUnsupportedVersion, b[2], Version)
	}
	return nil
}

// checkFixed checks the rest of the fixed part of a header whose version checkVersion accepted and
// returns the length of the whole header; len(b) must be at least headerFixedLen.
func checkFixed(b []byte) (int, error) {
	if b[3] != protoTCP && b[3] != protoUDP {
		return 0, fmt.Errorf("%w: protocol %d", ErrMalformed, b[3])
	}
	var n int
	switch b[4] {
	case 4:
		n = HeaderLen4
	case 6:
		n = HeaderLen6
	default:
		return 0, fmt.Errorf("%w: address family %d", ErrMalformed, b[4])
	}
	if b[5] != 0 {
		return 0, fmt.Errorf("%w: reserved flags %#x", ErrMalformed, b[5])
	}
	return n, nil
}
