package relay

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

// UDP frames. Every datagram of the path protocol that is not WireGuard starts with a 4-byte header:
//
//	offset  size  field
//	0       2     magic 0xE7 0x77
//	2       1     version, 1
//	3       1     type
//
// The first byte can never be a WireGuard message type (1-4), so these datagrams share the node's
// WireGuard socket with WireGuard. Integers are big-endian. Addresses are encoded as family (1 byte:
// 4 or 6), port (2), then 4 or 16 address bytes.
//
//	type  name      direction            body after the header
//	0x10  BIND      node → relay UDP     node ID (4) | nonce (8) | MAC (16)
//	0x11  BINDACK   relay → node         nonce (8) | observed address of the node's socket
//	0x12  DATA      node ↔ relay         peer node ID (4) | payload (a WireGuard datagram, or a PING/PONG)
//	0x20  PING      node → node          sender WireGuard public key (32) | tx ID (8) | MAC (16)
//	0x21  PONG      node → node          sender WireGuard public key (32) | tx ID (8) | address the
//	                                     PING came from | MAC (16)
//
// BIND proves the node ID with an HMAC-SHA256 (first 16 bytes) of header, ID and nonce under the
// session key the relay gave the node when it registered; the relay then takes the datagram's
// source as the node's reflexive address, answers BINDACK with it, and relays DATA only between
// nodes whose datagrams come from their bound address. In DATA from node to relay the ID names the
// destination; from relay to node it names the source. PING and PONG are MACed with a key both
// peers derive from their WireGuard static keys (X25519), so only the peer itself can make a path
// look alive; the PONG carries the address the PING came from, so a node learns how the peer sees it.

// Frame types.
const (
	FrameBind    byte = 0x10
	FrameBindAck byte = 0x11
	FrameData    byte = 0x12
	FramePing    byte = 0x20
	FramePong    byte = 0x21
)

// FrameVersion is the version of the UDP frames.
const FrameVersion = 1

// HeaderLen is the length of the frame header; DataHeaderLen of a DATA frame's header and ID.
const (
	HeaderLen     = 4
	DataHeaderLen = HeaderLen + 4
	macLen        = 16
	keyLen        = 32
)

var frameMagic = [2]byte{0xE7, 0x77}

// ErrFrame is wrapped by every frame parsing error.
var ErrFrame = errors.New("malformed path frame")

// IsFrame reports whether b starts with a frame header of a known version, and returns its type.
func IsFrame(b []byte) (typ byte, ok bool) {
	if len(b) < HeaderLen || b[0] != frameMagic[0] || b[1] != frameMagic[1] || b[2] != FrameVersion {
		return 0, false
	}
	return b[3], true
}

func appendHeader(dst []byte, typ byte) []byte {
	return append(dst, frameMagic[0], frameMagic[1], FrameVersion, typ)
}

func mac(key, msg []byte) []byte {
	h := hmac.New(sha256.New, key)
	h.Write(msg)
	return h.Sum(nil)[:macLen]
}

// AppendBind appends a BIND frame for node id.
func AppendBind(dst []byte, id uint32, nonce uint64, sessionKey []byte) []byte {
	start := len(dst)
	dst = appendHeader(dst, FrameBind)
	dst = binary.BigEndian.AppendUint32(dst, id)
	dst = binary.BigEndian.AppendUint64(dst, nonce)
	return append(dst, mac(sessionKey, dst[start:])...)
}

// ParseBind returns the node ID and nonce of a BIND frame. The caller checks the MAC with
// VerifyBind once it knows the node's session key.
func ParseBind(b []byte) (id uint32, nonce uint64, err error) {
	if typ, ok := IsFrame(b); !ok || typ != FrameBind || len(b) != HeaderLen+4+8+macLen {
		return 0, 0, fmt.Errorf("%w: BIND of %d bytes", ErrFrame, len(b))
	}
	return binary.BigEndian.Uint32(b[4:8]), binary.BigEndian.Uint64(b[8:16]), nil
}

// VerifyBind checks the MAC of a BIND frame parsed by ParseBind.
func VerifyBind(b []byte, sessionKey []byte) bool {
	n := len(b) - macLen
	return hmac.Equal(b[n:], mac(sessionKey, b[:n]))
}

// AppendBindAck appends a BINDACK frame.
func AppendBindAck(dst []byte, nonce uint64, observed netip.AddrPort) []byte {
	dst = appendHeader(dst, FrameBindAck)
	dst = binary.BigEndian.AppendUint64(dst, nonce)
	return appendAddrPort(dst, observed)
}

// ParseBindAck parses a BINDACK frame.
func ParseBindAck(b []byte) (nonce uint64, observed netip.AddrPort, err error) {
	if typ, ok := IsFrame(b); !ok || typ != FrameBindAck || len(b) < HeaderLen+8 {
		return 0, netip.AddrPort{}, fmt.Errorf("%w: BINDACK of %d bytes", ErrFrame, len(b))
	}
	nonce = binary.BigEndian.Uint64(b[4:12])
	observed, rest, err := parseAddrPort(b[12:])
	if err != nil || len(rest) != 0 {
		return 0, netip.AddrPort{}, fmt.Errorf("%w: BINDACK address", ErrFrame)
	}
	return nonce, observed, nil
}

// AppendDataHeader appends the header of a DATA frame for node id; the payload follows.
func AppendDataHeader(dst []byte, id uint32) []byte {
	dst = appendHeader(dst, FrameData)
	return binary.BigEndian.AppendUint32(dst, id)
}

// ParseData returns the node ID and payload of a DATA frame; payload aliases b.
func ParseData(b []byte) (id uint32, payload []byte, err error) {
	if typ, ok := IsFrame(b); !ok || typ != FrameData || len(b) < DataHeaderLen {
		return 0, nil, fmt.Errorf("%w: DATA of %d bytes", ErrFrame, len(b))
	}
	return binary.BigEndian.Uint32(b[4:8]), b[DataHeaderLen:], nil
}

// Ping is a PING or PONG frame.
type Ping struct {
	Pong bool
	// Sender is the sender's WireGuard public key.
	Sender [keyLen]byte
	TxID   uint64
	// Observed is where the PING came from (PONG only).
	Observed netip.AddrPort
}

// AppendPing appends p as a frame MACed with key (the peers' shared key).
func AppendPing(dst []byte, p Ping, key []byte) []byte {
	start := len(dst)
	typ := FramePing
	if p.Pong {
		typ = FramePong
	}
	dst = appendHeader(dst, typ)
	dst = append(dst, p.Sender[:]...)
	dst = binary.BigEndian.AppendUint64(dst, p.TxID)
	if p.Pong {
		dst = appendAddrPort(dst, p.Observed)
	}
	return append(dst, mac(key, dst[start:])...)
}

// ParsePing parses a PING or PONG frame without checking its MAC: the caller looks up the shared
// key of p.Sender and calls VerifyPing.
func ParsePing(b []byte) (Ping, error) {
	typ, ok := IsFrame(b)
	if !ok || (typ != FramePing && typ != FramePong) || len(b) < HeaderLen+keyLen+8+macLen {
		return Ping{}, fmt.Errorf("%w: PING of %d bytes", ErrFrame, len(b))
	}
	var p Ping
	p.Pong = typ == FramePong
	copy(p.Sender[:], b[4:4+keyLen])
	p.TxID = binary.BigEndian.Uint64(b[4+keyLen:])
	rest := b[4+keyLen+8 : len(b)-macLen]
	if p.Pong {
		var err error
		p.Observed, rest, err = parseAddrPort(rest)
		if err != nil {
			return Ping{}, fmt.Errorf("%w: PONG address", ErrFrame)
		}
	}
	if len(rest) != 0 {
		return Ping{}, fmt.Errorf("%w: %d trailing bytes in PING", ErrFrame, len(rest))
	}
	return p, nil
}

// VerifyPing checks the MAC of a frame parsed by ParsePing.
func VerifyPing(b []byte, key []byte) bool {
	n := len(b) - macLen
	return n > 0 && hmac.Equal(b[n:], mac(key, b[:n]))
}

func appendAddrPort(dst []byte, ap netip.AddrPort) []byte {
	a := ap.Addr().Unmap()
	if a.Is4() {
		dst = append(dst, 4)
	} else {
		dst = append(dst, 6)
	}
	dst = binary.BigEndian.AppendUint16(dst, ap.Port())
	return append(dst, a.AsSlice()...)
}

func parseAddrPort(b []byte) (netip.AddrPort, []byte, error) {
	if len(b) < 3 {
		return netip.AddrPort{}, nil, ErrFrame
	}
	n := 4
	switch b[0] {
	case 4:
	case 6:
		n = 16
	default:
		return netip.AddrPort{}, nil, ErrFrame
	}
	if len(b) < 3+n {
		return netip.AddrPort{}, nil, ErrFrame
	}
	port := binary.BigEndian.Uint16(b[1:3])
	addr, _ := netip.AddrFromSlice(b[3 : 3+n])
	return netip.AddrPortFrom(addr, port), b[3+n:], nil
}
