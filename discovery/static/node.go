package static

import (
	"encoding/base64"
	"fmt"
	"net/netip"
	"strings"

	"github.com/edgewire/edgewire/discovery"
)

// wireGuardKeySize is the size of a WireGuard public key; its base64 is 44 characters.
const wireGuardKeySize = 32

// nodeObject converts a v1 Node: its name and the mesh annotations, the WireGuard public key
// (discovery.AnnotationWireGuardKey) and the WireGuard endpoints (discovery.AnnotationEndpoints).
func (p *parser) nodeObject(o *object) error {
	var obj nodeObject
	if err := o.decode(&obj); err != nil {
		return err
	}
	if prev, dup := p.nodes[o.name]; dup {
		return o.errf(path("metadata", "name"), "duplicate Node %s (first defined in %s)", o.name, prev.at)
	}
	ann := obj.Metadata.Annotations
	n := &discovery.Node{Name: o.name, Annotations: copyMap(ann)}
	pn := &parsedNode{node: n, at: o.shortWhere()}

	keyField := path("metadata", "annotations", mapKey(discovery.AnnotationWireGuardKey))
	key, hasKey := ann[discovery.AnnotationWireGuardKey]
	if hasKey {
		raw, ok := parseWireGuardKey(key)
		if !ok {
			return o.errf(keyField, "%q is not a WireGuard public key (32 bytes in base64, as `wg pubkey` prints)", key)
		}
		if prev, dup := p.wgKeys[raw]; dup {
			return o.errf(keyField, "key %s is also the key of Node %s (%s): every node needs its own", key, prev.node.Name, prev.at)
		}
		n.WireGuardKey = key
		p.wgKeys[raw] = pn
	}

	if eps, ok := ann[discovery.AnnotationEndpoints]; ok {
		field := path("metadata", "annotations", mapKey(discovery.AnnotationEndpoints))
		if !hasKey {
			return o.errf(field, "set without %s: a node without a WireGuard key is not a mesh peer", discovery.AnnotationWireGuardKey)
		}
		var err error
		if n.Endpoints, err = parseEndpoints(eps); err != nil {
			return o.errf(field, "%w", err)
		}
	}

	p.nodes[o.name] = pn
	if p.rec != nil {
		pristine := *n
		p.rec.entries = append(p.rec.entries, recEntry{item: o.item, node: &pristine})
	}
	return nil
}

// parseWireGuardKey decodes a WireGuard public key from its canonical base64 (44 characters,
// padded, as wg prints it) and returns the raw key as a string.
func parseWireGuardKey(s string) (raw string, ok bool) {
	if len(s) != base64.StdEncoding.EncodedLen(wireGuardKeySize) {
		return "", false
	}
	b, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil || len(b) != wireGuardKeySize {
		return "", false
	}
	return string(b), true
}

// parseEndpoints parses a comma-separated list of ip:port (IPv6 as [addr]:port), keeping its order.
// Spaces around items are ignored; an empty list gives no endpoints.
func parseEndpoints(s string) ([]netip.AddrPort, error) {
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
		for _, prev := range eps {
			if prev == ap {
				return nil, fmt.Errorf("%s is listed twice", ap)
			}
		}
		eps = append(eps, ap)
	}
	return eps, nil
}
