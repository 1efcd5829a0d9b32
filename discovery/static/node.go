package static

import "github.com/edgewire/edgewire/discovery"

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
		raw, ok := discovery.ParseWireGuardKey(key)
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
		if n.Endpoints, err = discovery.ParseEndpoints(eps); err != nil {
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
