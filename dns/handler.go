package dns

import (
	"context"
	"net"
	"strings"

	mdns "github.com/miekg/dns"
)

// maxChase bounds how many CNAMEs inside the cluster zone a reply follows.
const maxChase = 8

// ServeDNS answers one query (it implements mdns.Handler). Names in the cluster domain are
// answered from the records of the last Update; all others are forwarded. Malformed queries get
// FORMERR, other opcodes NOTIMP. Over UDP the reply is truncated (TC set) to the client's EDNS0
// size, or 512 bytes without EDNS0.
func (s *Server) ServeDNS(w mdns.ResponseWriter, r *mdns.Msg) {
	m := s.reply(s.ctx, r, isTCP(w))
	if m == nil {
		return
	}
	if err := w.WriteMsg(m); err != nil {
		s.logWriteError(w.RemoteAddr(), err)
	}
}

// isTCP reports whether w answers over a stream (no truncation needed).
func isTCP(w mdns.ResponseWriter) bool {
	a := w.RemoteAddr()
	if a == nil {
		return false
	}
	if _, ok := a.(*net.TCPAddr); ok {
		return true
	}
	return strings.HasPrefix(a.Network(), "tcp")
}

// reply builds the whole reply to r, ready to write, or nil when r cannot be answered at all.
func (s *Server) reply(ctx context.Context, r *mdns.Msg, tcp bool) *mdns.Msg {
	m, _ := s.respond(ctx, r, tcp, true)
	return m
}

// respond is reply. With wait false it does not ask the upstreams: when the reply needs them (a
// forwarding cache miss, a CNAME to chase) it returns ok false and counts nothing.
func (s *Server) respond(ctx context.Context, r *mdns.Msg, tcp, wait bool) (m *mdns.Msg, ok bool) {
	if r == nil {
		s.dropped.Add(1)
		return nil, true
	}
	defer func() {
		if ok {
			s.queries.Add(1)
		}
	}()
	if r.Response || len(r.Question) != 1 {
		s.formErr.Add(1)
		return rcodeReply(r, mdns.RcodeFormatError), true
	}
	if r.Opcode != mdns.OpcodeQuery {
		s.notImp.Add(1)
		return rcodeReply(r, mdns.RcodeNotImplemented), true
	}
	opt := r.IsEdns0()
	if opt != nil && opt.Version() != 0 {
		// RFC 6891 §6.1.3: BADVERS, with an OPT carrying the extended rcode.
		s.formErr.Add(1)
		m := rcodeReply(r, mdns.RcodeBadVers)
		m.Extra = []mdns.RR{newOPT(false)}
		return m, true
	}
	q := r.Question[0]
	name := strings.ToLower(q.Name)
	idx := s.idx.Load()
	n := idx.names[name]
	switch inZone := idx.inZone(name); {
	case inZone || (n != nil && q.Qtype == mdns.TypePTR):
		if q.Qclass != mdns.ClassINET && q.Qclass != mdns.ClassANY {
			s.refused.Add(1)
			m = rcodeReply(r, mdns.RcodeRefused)
			break
		}
		if !wait && n != nil && n.chases(q.Qtype) {
			return nil, false
		}
		s.cluster.Add(1)
		if n == nil {
			s.nxdomain.Add(1)
		}
		m = s.clusterAnswer(ctx, idx, r, q, n)
	default:
		if m, ok = s.forward(ctx, r, q, name, opt, wait); !ok {
			return nil, false
		}
	}
	finish(m, opt, tcp)
	return m, true
}

// finish adds the OPT record when the query had one and truncates the reply to what the
// transport carries.
func finish(m *mdns.Msg, opt *mdns.OPT, tcp bool) {
	size := mdns.MinMsgSize
	if opt != nil {
		// The reply's slices may be shared with the index; they are full, so this append
		// copies (see index).
		m.Extra = append(m.Extra, newOPT(opt.Do()))
		if int(opt.UDPSize()) > size {
			size = int(opt.UDPSize())
		}
	}
	if tcp {
		size = mdns.MaxMsgSize
	}
	m.Compress = true
	m.Truncate(size)
}

// newOPT returns a fresh OPT record (miekg's Pack writes the extended rcode into it, so it cannot
// be shared between replies).
func newOPT(do bool) *mdns.OPT {
	o := &mdns.OPT{Hdr: mdns.RR_Header{Name: ".", Rrtype: mdns.TypeOPT}}
	o.SetUDPSize(ednsSize)
	if do {
		o.SetDo()
	}
	return o
}

// rcodeReply returns an empty reply to r with rcode.
func rcodeReply(r *mdns.Msg, rcode int) *mdns.Msg {
	m := new(mdns.Msg)
	m.Id = r.Id
	m.Response = true
	m.Opcode = r.Opcode
	m.RecursionDesired = r.RecursionDesired
	m.Rcode = rcode
	if rcode != mdns.RcodeFormatError && len(r.Question) > 0 {
		m.Question = []mdns.Question{r.Question[0]}
	}
	return m
}

// inZone reports whether the lowercase fqdn name is the cluster domain or under it.
func (idx *index) inZone(name string) bool {
	return name == idx.zone || strings.HasSuffix(name, idx.dotZone)
}

// clusterAnswer answers q from idx. n is the node of the name, nil when the name does not exist.
// It counts nothing: the callers do.
func (s *Server) clusterAnswer(ctx context.Context, idx *index, r *mdns.Msg, q mdns.Question, n *node) *mdns.Msg {
	m := new(mdns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	m.RecursionAvailable = len(s.upstreams) > 0
	if n == nil {
		m.Rcode = mdns.RcodeNameError
		m.Ns = idx.soa
		return m
	}
	switch q.Qtype {
	case mdns.TypeA:
		m.Answer = n.a
	case mdns.TypeAAAA:
		m.Answer = n.aaaa
	case mdns.TypeSRV:
		m.Answer, m.Extra = n.srv, n.srvExtra
	case mdns.TypePTR:
		m.Answer = n.ptr
	case mdns.TypeSOA:
		m.Answer = n.soa
	case mdns.TypeNS:
		m.Answer, m.Extra = n.ns, n.nsExtra
	case mdns.TypeCNAME:
		if n.cname != nil {
			m.Answer = []mdns.RR{n.cname}
		}
	case mdns.TypeANY:
		m.Answer = n.all()
	}
	if n.chases(q.Qtype) {
		m.Answer = s.chase(ctx, idx, n.cname, q)
	}
	if len(m.Answer) == 0 {
		m.Ns = idx.soa // NODATA
	}
	return m
}

// chases reports whether the answer of n to qtype follows n's CNAME (which may need an upstream).
func (n *node) chases(qtype uint16) bool {
	return n.cname != nil && qtype != mdns.TypeCNAME && qtype != mdns.TypeANY
}

// all returns every record of n, for ANY queries.
func (n *node) all() []mdns.RR {
	var rrs []mdns.RR
	if n.cname != nil {
		rrs = append(rrs, n.cname)
	}
	rrs = append(rrs, n.a...)
	rrs = append(rrs, n.aaaa...)
	rrs = append(rrs, n.srv...)
	rrs = append(rrs, n.ptr...)
	rrs = append(rrs, n.soa...)
	rrs = append(rrs, n.ns...)
	return rrs
}

// chase returns cname followed by the records of its target for q's type, as a recursive
// resolver would (stub resolvers do not follow CNAMEs themselves): targets in the cluster zone
// come from idx, others through the forwarding cache. When the target cannot be resolved the
// answer is the CNAME alone.
func (s *Server) chase(ctx context.Context, idx *index, cname *mdns.CNAME, q mdns.Question) []mdns.RR {
	ans := []mdns.RR{cname}
	target := cname.Target
	for range maxChase {
		tn := idx.names[target]
		if tn == nil && !idx.inZone(target) {
			fm, _, err := s.resolve(ctx, target, q.Qtype, mdns.ClassINET, false, false, true)
			if err == nil && fm.Rcode == mdns.RcodeSuccess {
				ans = append(ans, fm.Answer...)
			}
			return ans
		}
		if tn == nil {
			return ans
		}
		if tn.cname != nil {
			ans = append(ans, tn.cname)
			target = tn.cname.Target
			continue
		}
		switch q.Qtype {
		case mdns.TypeA:
			ans = append(ans, tn.a...)
		case mdns.TypeAAAA:
			ans = append(ans, tn.aaaa...)
		case mdns.TypeSRV:
			ans = append(ans, tn.srv...)
		case mdns.TypePTR:
			ans = append(ans, tn.ptr...)
		}
		return ans
	}
	return ans
}
