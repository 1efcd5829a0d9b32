package dns

import (
	"encoding/binary"
	"slices"

	mdns "github.com/miekg/dns"
)

// The fast path of the UDP read loop (udp.go): replies packed once per name and type.
//
// Most queries a node's resolvers send are A or AAAA queries for names of the cluster zone, and
// names under the zone that do not exist (search-path expansion). For those the reply the handler
// builds depends on the query only through its ID, its RD and CD bits, the spelling of its question
// and whether it carries an EDNS0 OPT record: when the whole reply fits the client's UDP size
// uncompressed, miekg packs it uncompressed (Msg.Truncate), so no name in it points into the
// question, and the same bytes serve every spelling of the name. fastReply therefore packs such a
// reply once per (name, type) of an index, on the first query that needs it, and answers the next
// ones with a copy patched for the query: no unpacking, no handler, no allocation. What it leaves —
// another type, class or opcode, a compressed or unusual name, EDNS0 options or a version other
// than 0, a reply that needs compression or truncation, a name outside the zone — goes
// through the handler (unpack, ServeDNS's reply, pack): answerNow on the loop when no upstream is
// needed, a worker otherwise. The replies are byte for byte the handler's (udp_test.go compares
// them).

// packedReply is a reply packed once, split around its question: head is its header, with ID 0 and
// RD and CD clear, body everything after the question (without an OPT record). A nil body means
// the reply cannot be served this way (too large for any UDP reply: it takes the slow path).
type packedReply struct {
	head [headerLen]byte
	body []byte
}

const (
	headerLen = 12
	// optLen is the length of the OPT record the server adds: root name, type, class (UDP size),
	// TTL (extended rcode, version, flags) and an empty RDATA.
	optLen = 11
	// maxNameLen is the longest name in text form, dots included (RFC 1035's 255 octets in wire
	// form, less the root label's length octet).
	maxNameLen = 254

	flagQR     = 0x80 // byte 2 of the header
	flagRD     = 0x01 // byte 2
	flagCD     = 0x10 // byte 3
	flagOpcode = 0x78 // byte 2
)

// wireSlot returns the slot of node.wire that replies to qtype, or -1 for the types the fast path
// leaves to the handler.
func wireSlot(qtype uint16) int {
	switch qtype {
	case mdns.TypeA:
		return 0
	case mdns.TypeAAAA:
		return 1
	}
	return -1
}

// fastReply writes the reply to the query pkt into out (grown if needed) and returns it, or returns
// nil when the query takes the handler's path. It counts the queries it answers.
func (s *Server) fastReply(pkt, out []byte) []byte {
	if len(pkt) < headerLen+5 || pkt[2]&(flagQR|flagOpcode) != 0 ||
		binary.BigEndian.Uint16(pkt[4:]) != 1 || binary.BigEndian.Uint16(pkt[6:]) != 0 ||
		binary.BigEndian.Uint16(pkt[8:]) != 0 || binary.BigEndian.Uint16(pkt[10:]) > 1 {
		return nil
	}
	// The question name, lowercased into key as text ("web.default.svc.cluster.local."). Only
	// uncompressed names of letters, digits, '-' and '_' are read: every name of the index is such.
	var buf [maxNameLen]byte
	key := buf[:0]
	off := headerLen
	for {
		if off >= len(pkt) {
			return nil
		}
		l := int(pkt[off])
		off++
		if l == 0 {
			break
		}
		if l > 63 || off+l > len(pkt) || len(key)+l+1 > maxNameLen {
			return nil
		}
		for _, c := range pkt[off : off+l] {
			switch {
			case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_':
			case c >= 'A' && c <= 'Z':
				c += 'a' - 'A'
			default:
				return nil
			}
			key = append(key, c)
		}
		key = append(key, '.')
		off += l
	}
	if len(key) == 0 || off+4 > len(pkt) {
		return nil
	}
	qtype := binary.BigEndian.Uint16(pkt[off:])
	if binary.BigEndian.Uint16(pkt[off+2:]) != mdns.ClassINET {
		return nil
	}
	qend := off + 4
	// An OPT record of version 0 without options, or nothing, must follow.
	size, opt, do := mdns.MinMsgSize, false, false
	switch rest := pkt[qend:]; {
	case binary.BigEndian.Uint16(pkt[10:]) == 0:
		if len(rest) != 0 {
			return nil
		}
	case len(rest) != optLen || rest[0] != 0 || binary.BigEndian.Uint16(rest[1:]) != mdns.TypeOPT ||
		rest[6] != 0 || binary.BigEndian.Uint16(rest[9:]) != 0:
		return nil
	default:
		opt, do = true, rest[7]&0x80 != 0
		size = max(size, int(binary.BigEndian.Uint16(rest[3:])))
	}

	idx := s.idx.Load()
	var p *packedReply
	n := idx.names[string(key)]
	switch {
	case n != nil:
		slot := wireSlot(qtype)
		if !n.zone || n.cname != nil || slot < 0 {
			return nil
		}
		if p = n.wire[slot].Load(); p == nil {
			p = s.pack(idx, n, string(key), qtype)
			n.wire[slot].Store(p)
		}
	case idx.inZoneBytes(key):
		if p = idx.nxdomain.Load(); p == nil {
			p = s.pack(idx, nil, string(key), qtype)
			idx.nxdomain.Store(p)
		}
	default:
		return nil
	}
	need := len(p.head) + (qend - headerLen) + len(p.body)
	if opt {
		need += optLen
	}
	if p.body == nil || need > size {
		return nil
	}

	out = slices.Grow(out[:0], need)
	out = append(out, p.head[:]...)
	copy(out, pkt[:2]) // ID
	out[2] |= pkt[2] & flagRD
	out[3] |= pkt[3] & flagCD
	out = append(out, pkt[headerLen:qend]...) // the question as the client spelled it
	out = append(out, p.body...)
	if opt {
		binary.BigEndian.PutUint16(out[10:], binary.BigEndian.Uint16(out[10:])+1)
		var flags byte
		if do {
			flags = 0x80
		}
		out = append(out, 0, byte(mdns.TypeOPT>>8), byte(mdns.TypeOPT), byte(ednsSize>>8), byte(ednsSize&0xff), 0, 0, flags, 0, 0, 0)
	}
	s.queries.Add(1)
	s.cluster.Add(1)
	if n == nil {
		s.nxdomain.Add(1)
	}
	return out
}

// pack builds the packedReply of the cluster answer to (name, qtype) in idx, n being name's node
// (nil: the name does not exist), with the handler's code, packed uncompressed as miekg packs a
// reply that fits.
func (s *Server) pack(idx *index, n *node, name string, qtype uint16) *packedReply {
	r := &mdns.Msg{Question: []mdns.Question{{Name: name, Qtype: qtype, Qclass: mdns.ClassINET}}}
	m := s.clusterAnswer(s.ctx, idx, r, r.Question[0], n)
	m.Compress = false
	b, err := m.Pack()
	p := &packedReply{}
	qend := headerLen + len(name) + 1 + 4 // the uncompressed name is one octet longer than its text
	if err != nil || len(b) < qend || len(b)+optLen > mdns.MaxMsgSize {
		return p
	}
	copy(p.head[:], b)
	p.body = b[qend:]
	return p
}

// inZoneBytes is inZone for a name held in a byte slice, without converting it.
func (idx *index) inZoneBytes(name []byte) bool {
	if len(name) == len(idx.zone) {
		return string(name) == idx.zone
	}
	return len(name) > len(idx.dotZone) && string(name[len(name)-len(idx.dotZone):]) == idx.dotZone
}
