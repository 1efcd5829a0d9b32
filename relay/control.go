package relay

import (
	"cmp"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// ProtocolID is the libp2p protocol of the control stream.
const ProtocolID = "/edgewire/relay/1.0.0"

// MaxControlFrame is the largest control frame body either side accepts once the other side has
// proved the join token.
const MaxControlFrame = 1 << 20

// maxPreAuthFrame is the largest control frame body either side accepts before the other side has
// proved the join token: the relay for the register, the node for the challenge and the welcome
// (or an error). The largest valid register (a 253-character name, 16 IPv6 LAN addresses with
// zones) is under 2 KiB; TestPreAuthFrameFitsRegister checks it.
const maxPreAuthFrame = 8 << 10

// frameReadChunk is how much of a frame body readFrame allocates before the bytes arrive; the
// buffer grows (doubling) only as the body does, so a length prefix alone reserves nothing.
const frameReadChunk = 4 << 10

// Control message types.
const (
	msgChallenge = "challenge"
	msgRegister  = "register"
	msgWelcome   = "welcome"
	msgDirectory = "directory"
	msgPunch     = "punch"
	msgPing      = "ping"
	msgPong      = "pong"
	msgError     = "error"
)

// Limits on what a node may register.
const (
	maxNameLen = 253
	maxLAN     = 16
	nonceLen   = 32
)

// Proof labels (see the package doc).
const (
	labelRegister = "edgewire-register"
	labelRelay    = "edgewire-relay"
)

// ErrControl is wrapped by every error about a malformed control frame.
var ErrControl = errors.New("malformed control frame")

// message is every control message; Type says which fields are meaningful.
type message struct {
	Type string `json:"type"`

	// challenge, register
	Nonce string `json:"nonce,omitempty"`

	// register
	Name         string           `json:"name,omitempty"`
	WireGuardKey string           `json:"wireguardKey,omitempty"`
	Overlay      netip.Addr       `json:"overlay,omitzero"`
	LAN          []netip.AddrPort `json:"lan,omitempty"`
	Proof        string           `json:"proof,omitempty"`

	// welcome
	ID          uint32 `json:"id,omitempty"`
	SessionKey  string `json:"sessionKey,omitempty"`
	UDPPort     uint16 `json:"udpPort,omitempty"`
	RelayProof  string `json:"relayProof,omitempty"`
	KeepaliveMs int64  `json:"keepaliveMs,omitempty"`

	// directory
	Nodes []DirEntry `json:"nodes,omitempty"`

	// punch
	Peer          string           `json:"peer,omitempty"`
	PeerReflexive netip.AddrPort   `json:"peerReflexive,omitzero"`
	PeerLAN       []netip.AddrPort `json:"peerLAN,omitempty"`
	DelayMs       int64            `json:"delayMs,omitempty"`

	// ping, pong
	T int64 `json:"t,omitempty"`

	// error
	Reason string `json:"reason,omitempty"`
}

// DirEntry is one registered node in the relay's directory.
type DirEntry struct {
	Name         string           `json:"name"`
	WireGuardKey string           `json:"wireguardKey"`
	Overlay      netip.Addr       `json:"overlay,omitzero"`
	LAN          []netip.AddrPort `json:"lan,omitempty"`
	// Reflexive is the address the relay saw the node's WireGuard socket BIND from; zero until the
	// node has sent a BIND.
	Reflexive netip.AddrPort `json:"reflexive,omitzero"`
	ID        uint32         `json:"id"`
}

// Punch tells a node to punch towards Peer after Delay, so both ends start at the same moment.
type Punch struct {
	Peer          string
	PeerReflexive netip.AddrPort
	PeerLAN       []netip.AddrPort
	Delay         time.Duration
}

// encodeFrame returns m as one control frame: length, then JSON.
func encodeFrame(m *message) ([]byte, error) {
	body, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", m.Type, err)
	}
	if len(body) > MaxControlFrame {
		return nil, fmt.Errorf("encode %s: %d bytes exceeds %d", m.Type, len(body), MaxControlFrame)
	}
	buf := make([]byte, 4, 4+len(body))
	binary.BigEndian.PutUint32(buf, uint32(len(body)))
	return append(buf, body...), nil
}

// writeFrame writes m as one control frame.
func writeFrame(w io.Writer, m *message) error {
	buf, err := encodeFrame(m)
	if err != nil {
		return err
	}
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("write %s: %w", m.Type, err)
	}
	return nil
}

// sortEntries orders a directory by node ID.
func sortEntries(nodes []DirEntry) {
	slices.SortFunc(nodes, func(a, b DirEntry) int { return cmp.Compare(a.ID, b.ID) })
}

// errFrameTooLarge is wrapped (with ErrControl) by readFrame's error for a length over its limit.
var errFrameTooLarge = errors.New("frame too large")

// readFrame reads one control frame of at most limit bytes. A larger frame (refused from its
// length prefix, before anything is allocated for it), a body that is not a JSON object, or one
// without a type is an error wrapping ErrControl; I/O errors are returned as is. The body buffer
// grows with the bytes that arrive, not with the length the peer announced.
func readFrame(r io.Reader, limit uint32) (*message, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint32(hdr[:]))
	if n > int(limit) {
		return nil, fmt.Errorf("%w: %w: %d bytes exceeds %d", ErrControl, errFrameTooLarge, n, limit)
	}
	body := make([]byte, 0, min(n, frameReadChunk))
	for len(body) < n {
		if len(body) == cap(body) {
			body = slices.Grow(body, min(n-len(body), len(body)))
		}
		k, err := io.ReadFull(r, body[len(body):min(cap(body), n)])
		body = body[:len(body)+k]
		if err != nil {
			return nil, fmt.Errorf("frame body: %w", err)
		}
	}
	m := new(message)
	if err := json.Unmarshal(body, m); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrControl, err)
	}
	if m.Type == "" {
		return nil, fmt.Errorf("%w: no type", ErrControl)
	}
	return m, nil
}

// proof is HMAC-SHA256(token, label | relayPeer | nodePeer | nonce), each field prefixed with its
// 2-byte big-endian length.
func proof(token, label, relayPeer, nodePeer string, nonce []byte) []byte {
	h := hmac.New(sha256.New, []byte(token))
	for _, f := range [][]byte{[]byte(label), []byte(relayPeer), []byte(nodePeer), nonce} {
		var l [2]byte
		binary.BigEndian.PutUint16(l[:], uint16(len(f)))
		h.Write(l[:])
		h.Write(f)
	}
	return h.Sum(nil)
}

// checkProof reports whether the base64 proof b64 equals proof(...).
func checkProof(b64, token, label, relayPeer, nodePeer string, nonce []byte) bool {
	got, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return false
	}
	return hmac.Equal(got, proof(token, label, relayPeer, nodePeer, nonce))
}

func newNonce() ([]byte, error) {
	b := make([]byte, nonceLen)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("nonce: %w", err)
	}
	return b, nil
}

func decodeNonce(s string) ([]byte, error) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(b) != nonceLen {
		return nil, fmt.Errorf("%w: nonce is not %d bytes of base64", ErrControl, nonceLen)
	}
	return b, nil
}

// Registration is what a node tells the relay about itself.
type Registration struct {
	// Name is the node name (as EndpointSlice nodeName spells it).
	Name string
	// WireGuardKey is the node's WireGuard public key in base64, as wg prints it.
	WireGuardKey string
	// Overlay is the node's overlay address.
	Overlay netip.Addr
	// LAN are the local ip:port addresses of the node's WireGuard socket, at most 16.
	LAN []netip.AddrPort
}

// validate checks a registration, from config or from the wire.
func (r *Registration) validate() error {
	if err := validName(r.Name); err != nil {
		return err
	}
	k, err := base64.StdEncoding.Strict().DecodeString(r.WireGuardKey)
	if err != nil || len(k) != 32 {
		return fmt.Errorf("node %q: WireGuard key is not 32 bytes of base64", r.Name)
	}
	if r.Overlay.IsValid() && r.Overlay.Zone() != "" {
		return fmt.Errorf("node %q: overlay address %s has a zone", r.Name, r.Overlay)
	}
	if len(r.LAN) > maxLAN {
		return fmt.Errorf("node %q: %d LAN addresses, at most %d", r.Name, len(r.LAN), maxLAN)
	}
	for _, a := range r.LAN {
		if !a.IsValid() || a.Port() == 0 {
			return fmt.Errorf("node %q: bad LAN address %s", r.Name, a)
		}
	}
	return nil
}

// validName accepts a Kubernetes node name: lower-case letters, digits, '-' and '.', 1 to 253
// characters.
func validName(name string) error {
	if name == "" || len(name) > maxNameLen {
		return fmt.Errorf("node name of %d characters, want 1 to %d", len(name), maxNameLen)
	}
	if strings.Trim(name, "abcdefghijklmnopqrstuvwxyz0123456789-.") != "" ||
		strings.ContainsAny(name[:1], "-.") {
		return fmt.Errorf("node name %q: want lower-case letters, digits, '-' and '.'", name)
	}
	return nil
}
