package discovery

import (
	"encoding/base64"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// wireGuardKeySize is the size of a WireGuard public key; its base64 is 44 characters.
const wireGuardKeySize = 32

// ParseWireGuardKey decodes the value of AnnotationWireGuardKey: a WireGuard public key in its
// canonical base64 (44 characters, padded, as `wg pubkey` prints it). It returns the raw key as a
// string (usable as a map key to find two nodes with one key).
func ParseWireGuardKey(s string) (raw string, ok bool) {
	if len(s) != base64.StdEncoding.EncodedLen(wireGuardKeySize) {
		return "", false
	}
	b, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil || len(b) != wireGuardKeySize {
		return "", false
	}
	return string(b), true
}

// ParseEndpoints parses the value of AnnotationEndpoints: a comma-separated list of ip:port (IPv6 as
// [addr]:port), keeping its order. Spaces around items are ignored; an empty list gives no
// endpoints. Addresses with a zone, unspecified or multicast addresses, port 0 and duplicates are
// refused; IPv4-mapped IPv6 addresses are unmapped.
func ParseEndpoints(s string) ([]netip.AddrPort, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var eps []netip.AddrPort
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		ap, err := netip.ParseAddrPort(item)
		switch {
		case item == "":
			return nil, fmt.Errorf("empty entry in %q", s)
		case err != nil:
			return nil, fmt.Errorf("%q is not ip:port (IPv6 as [addr]:port)", item)
		case ap.Port() == 0:
			return nil, fmt.Errorf("%q: port must be 1-65535", item)
		case ap.Addr().Zone() != "":
			return nil, fmt.Errorf("%q: an address with a zone means nothing to other nodes", item)
		case ap.Addr().IsUnspecified() || ap.Addr().IsMulticast():
			return nil, fmt.Errorf("%q: not a unicast address", item)
		}
		ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		if slices.Contains(eps, ap) {
			return nil, fmt.Errorf("%s is listed twice", ap)
		}
		eps = append(eps, ap)
	}
	return eps, nil
}
