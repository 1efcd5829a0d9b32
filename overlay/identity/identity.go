// Package identity owns a node's cryptographic identity and the overlay addresses derived from it:
// the node's WireGuard key pair and libp2p key, generated with crypto/rand on first start and kept
// in the state directory, and the rule that turns any node's WireGuard public key into its overlay
// address. Nothing is derived from the node name.
//
// # Key files
//
// The state directory (created 0700 when missing; refused when group or other may write it) holds
// two files, each created 0600 and refused when group or other may read or write it:
//
//   - wireguard.key: the WireGuard private key exactly as `wg genkey` prints it: the standard
//     base64 encoding (with padding) of the 32-byte Curve25519 private key, clamped, and a newline.
//     `wg pubkey < wireguard.key` prints the public key. Leading and trailing white space is
//     ignored on reading; anything else that does not decode to 32 bytes, or decodes to 32 zero
//     bytes, is an error.
//
//   - libp2p.key: the libp2p PrivateKey protobuf (go-libp2p core/crypto/pb, what
//     crypto.MarshalPrivateKey writes and crypto.UnmarshalPrivateKey reads) of an Ed25519 key, raw
//     bytes, no trailing newline:
//
//     message PrivateKey { required KeyType Type = 1; required bytes Data = 2; }  // Ed25519 = 1
//
//     On the wire that is 0x08 0x01 (field 1, varint, Ed25519), 0x12 0x40 (field 2, 64 bytes),
//     then the 32-byte seed followed by the 32-byte public key (Go's ed25519.PrivateKey layout). A
//     reader accepts the two fields in either order and requires the public half to match the seed.
//
// LoadOrCreate creates a missing file (written to a temporary file, synced, then linked into
// place, so a crash never leaves a half-written key) and reuses an existing one. A file that
// exists but is unreadable, too permissive or malformed is an error: a key is never silently
// regenerated over it, since that would change the node's identity and overlay address.
//
// # Overlay addresses
//
// The overlay range is an IPv6 prefix between /48 and /96, by default the ULA
// DefaultOverlayPrefix, fd65:7765:7769::/48. A node's overlay address is the prefix followed by
// the leading bits of
//
//	SHA-256("edgewire overlay v1" || WireGuard public key (32 bytes))
//
// as many as the prefix leaves (80 for a /48): with the default prefix, fd65:7765:7769 and then
// the first 10 bytes of the hash. Any node computes any peer's address from its public key alone;
// two keys share an address only if their hashes share those bits (2^-80 per pair for a /48).
package identity

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"golang.org/x/crypto/curve25519"
)

// KeySize is the size of a WireGuard (Curve25519) key.
const KeySize = 32

// Key is a WireGuard key, private or public.
type Key [KeySize]byte

// DefaultOverlayPrefix is the default overlay range: a ULA /48 ("ewi" in its global ID).
var DefaultOverlayPrefix = netip.MustParsePrefix("fd65:7765:7769::/48")

// overlayDomain separates the overlay address hash from any other use of SHA-256 over a key.
const overlayDomain = "edgewire overlay v1"

// NewPrivateKey returns a new WireGuard private key from crypto/rand, clamped as `wg genkey` does.
func NewPrivateKey() (Key, error) {
	var k Key
	if _, err := rand.Read(k[:]); err != nil {
		return Key{}, fmt.Errorf("generate WireGuard key: %w", err)
	}
	k.clamp()
	return k, nil
}

// clamp makes k a canonical Curve25519 private key (RFC 7748 section 5).
func (k *Key) clamp() {
	k[0] &= 248
	k[31] = k[31]&127 | 64
}

// ParseKey parses a key in the standard base64 encoding that `wg` uses (44 characters, with
// padding). Surrounding white space is ignored.
func ParseKey(s string) (Key, error) {
	s = strings.TrimSpace(s)
	b, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil {
		return Key{}, fmt.Errorf("key %q: not base64: %w", abbrev(s), err)
	}
	if len(b) != KeySize {
		return Key{}, fmt.Errorf("key %q: %d bytes, want %d", abbrev(s), len(b), KeySize)
	}
	return Key(b), nil
}

// abbrev shortens s for an error message, so that a private key is never printed whole.
func abbrev(s string) string {
	if len(s) > 8 {
		return s[:4] + "…"
	}
	return s
}

// String returns the key in base64, as `wg` prints it.
func (k Key) String() string { return base64.StdEncoding.EncodeToString(k[:]) }

// IsZero reports whether k is all zeros (wg's "no key").
func (k Key) IsZero() bool { return k == Key{} }

// PublicKey returns the public key of private key k.
func (k Key) PublicKey() Key {
	pub, err := curve25519.X25519(k[:], curve25519.Basepoint)
	if err != nil {
		// X25519 fails only on a low-order point result, which the base point cannot produce.
		panic("identity: X25519 with the base point: " + err.Error())
	}
	return Key(pub)
}

// Identity is a node's keys.
type Identity struct {
	// WireGuard is the WireGuard private key; WireGuardPublic its public key.
	WireGuard       Key
	WireGuardPublic Key
	// Libp2p is the node's libp2p (Ed25519) private key.
	Libp2p ed25519.PrivateKey
}

// Libp2pPublic returns the Ed25519 public key of the libp2p key.
func (id *Identity) Libp2pPublic() ed25519.PublicKey {
	return id.Libp2p.Public().(ed25519.PublicKey)
}

// OverlayAddr returns the overlay address of the node whose WireGuard public key is pub, inside
// prefix (see the package doc). prefix must be IPv6 (not IPv4-mapped), /48 to /96; its host bits are
// ignored.
func OverlayAddr(prefix netip.Prefix, pub Key) (netip.Addr, error) {
	if err := CheckOverlayPrefix(prefix); err != nil {
		return netip.Addr{}, err
	}
	h := sha256.New()
	h.Write([]byte(overlayDomain))
	h.Write(pub[:])
	sum := h.Sum(nil)

	a := prefix.Masked().Addr().As16()
	bits := prefix.Bits()
	for i := bits; i < 128; i++ {
		j := i - bits
		if sum[j/8]&(0x80>>(j%8)) != 0 {
			a[i/8] |= 0x80 >> (i % 8)
		}
	}
	return netip.AddrFrom16(a), nil
}

// CheckOverlayPrefix returns an error unless prefix can be an overlay range: a valid IPv6
// (not IPv4-mapped) prefix of /48 to /96.
func CheckOverlayPrefix(prefix netip.Prefix) error {
	switch {
	case !prefix.IsValid():
		return errors.New("overlay prefix: invalid prefix")
	case !prefix.Addr().Is6() || prefix.Addr().Is4In6():
		return fmt.Errorf("overlay prefix %s: must be IPv6", prefix)
	case prefix.Addr().Zone() != "":
		return fmt.Errorf("overlay prefix %s: must not have a zone", prefix)
	case prefix.Bits() < 48 || prefix.Bits() > 96:
		return fmt.Errorf("overlay prefix %s: must be /48 to /96, got /%d", prefix, prefix.Bits())
	}
	return nil
}
