package dns

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/edgewire/edgewire/discovery"
)

// handlerBytes is the reply the handler's path sends to the query pkt over UDP, packed as miekg's
// writer packs it, or nil when that path sends nothing.
func handlerBytes(t *testing.T, s *Server, pkt []byte) []byte {
	t.Helper()
	r := new(mdns.Msg)
	if err := r.Unpack(pkt); err != nil {
		return nil
	}
	m := s.reply(context.Background(), r, false)
	if m == nil {
		return nil
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatalf("pack the handler's reply: %v", err)
	}
	return b
}

// packQuery packs a query; edns < 0 means no OPT record.
func packQuery(t testing.TB, name string, qtype uint16, edns int, mod func(*mdns.Msg)) []byte {
	t.Helper()
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	m.Id = 0xBEEF
	if edns >= 0 {
		m.SetEdns0(uint16(edns), false)
	}
	if mod != nil {
		mod(m)
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatalf("pack query %s: %v", name, err)
	}
	return b
}

// TestFastReplyMatchesHandler sends every query both ways: the fast path must answer those it is
// meant to, and answer them with exactly the bytes of the handler's path; it must leave the others.
func TestFastReplyMatchesHandler(t *testing.T) {
	s := newTestServer(t, Config{Addr: netip.MustParseAddr("169.254.96.16"), Upstreams: []string{"127.0.0.1:1"}})
	type variant struct {
		name string
		edns int
		mod  func(*mdns.Msg)
	}
	variants := []variant{
		{name: "plain", edns: -1},
		{name: "no RD", edns: -1, mod: func(m *mdns.Msg) { m.RecursionDesired = false }},
		{name: "CD and AD", edns: -1, mod: func(m *mdns.Msg) { m.CheckingDisabled, m.AuthenticatedData = true, true }},
		{name: "EDNS0 512", edns: 512},
		{name: "EDNS0 1232", edns: 1232},
		{name: "EDNS0 below 512", edns: 100},
		{name: "EDNS0 DO", edns: 4096, mod: func(m *mdns.Msg) { m.IsEdns0().SetDo() }},
	}
	fast := []struct {
		name  string
		qtype uint16
	}{
		{"web.default.svc.cluster.local.", mdns.TypeA},
		{"web.default.svc.cluster.local.", mdns.TypeAAAA}, // NODATA
		{"v6.default.svc.cluster.local.", mdns.TypeAAAA},
		{"db.default.svc.cluster.local.", mdns.TypeA},
		{"db-0.db.default.svc.cluster.local.", mdns.TypeA},
		{"10-244-1-6.db.default.svc.cluster.local.", mdns.TypeA},
		{"ns.dns.cluster.local.", mdns.TypeA},
		{"cluster.local.", mdns.TypeA},
		{"default.svc.cluster.local.", mdns.TypeAAAA},
		{"_http._tcp.web.default.svc.cluster.local.", mdns.TypeA},
		{"noip.default.svc.cluster.local.", mdns.TypeA},
		{"nope.default.svc.cluster.local.", mdns.TypeA}, // NXDOMAIN
		{"web.default.svc.cluster.local.default.svc.cluster.local.", mdns.TypeAAAA},
		{"x.cluster.local.", mdns.TypeMX}, // NXDOMAIN whatever the type
	}
	for _, q := range fast {
		for _, spelling := range []string{q.name, strings.ToUpper(q.name), mixedCase(q.name)} {
			for _, v := range variants {
				t.Run(spelling+"/"+mdns.TypeToString[q.qtype]+"/"+v.name, func(t *testing.T) {
					pkt := packQuery(t, spelling, q.qtype, v.edns, v.mod)
					want := handlerBytes(t, s, pkt)
					got := s.fastReply(pkt, nil)
					if got == nil {
						t.Fatalf("not answered by the fast path")
					}
					if !bytes.Equal(got, want) {
						t.Fatalf("fast reply differs from the handler's:\nfast    %x\nhandler %x", got, want)
					}
				})
			}
		}
	}

	slow := []struct {
		name string
		pkt  []byte
	}{
		{"SRV", packQuery(t, "_http._tcp.web.default.svc.cluster.local.", mdns.TypeSRV, -1, nil)},
		{"PTR", packQuery(t, "10.0.251.9.in-addr.arpa.", mdns.TypePTR, -1, nil)},
		{"A of a reverse name (forwarded)", packQuery(t, "10.0.251.9.in-addr.arpa.", mdns.TypeA, -1, nil)},
		{"outside the zone", packQuery(t, "example.com.", mdns.TypeA, -1, nil)},
		{"MX of an existing name", packQuery(t, "web.default.svc.cluster.local.", mdns.TypeMX, -1, nil)},
		{"CNAME to chase", packQuery(t, "ext.default.svc.cluster.local.", mdns.TypeA, -1, nil)},
		{"too large without EDNS0", packQuery(t, "big.kube-system.svc.cluster.local.", mdns.TypeA, -1, nil)},
		{"too large uncompressed for 4096", packQuery(t, "big.kube-system.svc.cluster.local.", mdns.TypeA, 4096, nil)},
		{"class CHAOS", packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, -1, func(m *mdns.Msg) { m.Question[0].Qclass = mdns.ClassCHAOS })},
		{"EDNS version 1", packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, 1232, func(m *mdns.Msg) { m.IsEdns0().SetVersion(1) })},
		{"EDNS0 option", packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, 1232, func(m *mdns.Msg) {
			m.IsEdns0().Option = []mdns.EDNS0{&mdns.EDNS0_COOKIE{Code: mdns.EDNS0COOKIE, Cookie: "0102030405060708"}}
		})},
		{"a response", packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, -1, func(m *mdns.Msg) { m.Response = true })},
		{"opcode UPDATE", packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, -1, func(m *mdns.Msg) { m.Opcode = mdns.OpcodeUpdate })},
		{"two questions", packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, -1, func(m *mdns.Msg) { m.Question = append(m.Question, m.Question[0]) })},
		{"an answer record", packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, -1, func(m *mdns.Msg) {
			m.Answer = []mdns.RR{&mdns.A{Hdr: mdns.RR_Header{Name: ".", Rrtype: mdns.TypeA, Class: mdns.ClassINET}, A: net.IPv4(1, 2, 3, 4)}}
		})},
		{"escaped name", packQuery(t, `we\.b.default.svc.cluster.local.`, mdns.TypeA, -1, nil)},
		{"trailing bytes", append(packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, -1, nil), 0)},
		{"OPT cut short", packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, 1232, nil)[:50]},
		{"compressed name", append(rawHeader(1, 0, 1, 0, 0, 0), 0xC0, 0x0C, 0, 1, 0, 1)},
		{"root name", append(rawHeader(1, 0, 1, 0, 0, 0), 0, 0, 1, 0, 1)},
		{"short", rawHeader(1, 0, 1, 0, 0, 0)},
	}
	for _, tc := range slow {
		t.Run("slow/"+tc.name, func(t *testing.T) {
			if got := s.fastReply(tc.pkt, nil); got != nil {
				t.Fatalf("answered by the fast path: %x", got)
			}
		})
	}
}

// TestAnswerNow checks the second tier of the read loop: queries whose reply needs no upstream are
// answered through the handler on the loop, with the handler's bytes; malformed ones get a header
// alone, responses and runts nothing; the queries that need an upstream are handed back, unpacked
// and uncounted, for the workers.
func TestAnswerNow(t *testing.T) {
	up := startUpstream(t, false)
	s := newTestServer(t, Config{Upstreams: []string{up.addr}})
	clock := &fakeClock{t: time.Unix(1_700_000_000, 0)}
	s.now = clock.Now
	const (
		handler = iota // the handler's reply
		slow           // left to the workers
		formErr        // a header-only FORMERR
		notImp         // a header-only NOTIMP
		dropped        // nothing sent
	)
	tests := []struct {
		name  string
		pkt   []byte
		prime bool // forward the query through the handler first (fills the cache)
		want  int
	}{
		{name: "SRV", pkt: packQuery(t, "_http._tcp.web.default.svc.cluster.local.", mdns.TypeSRV, -1, nil), want: handler},
		{name: "PTR", pkt: packQuery(t, "10.0.251.9.in-addr.arpa.", mdns.TypePTR, 1232, nil), want: handler},
		{name: "class CHAOS", pkt: packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, -1, func(m *mdns.Msg) { m.Question[0].Qclass = mdns.ClassCHAOS }), want: handler},
		{name: "EDNS version 1", pkt: packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, 1232, func(m *mdns.Msg) { m.IsEdns0().SetVersion(1) }), want: handler},
		{name: "truncated over UDP", pkt: packQuery(t, "big.kube-system.svc.cluster.local.", mdns.TypeA, -1, nil), want: handler},
		{name: "forwarded, not cached", pkt: packQuery(t, "example.com.", mdns.TypeA, -1, nil), want: slow},
		{name: "forwarded, cached", pkt: packQuery(t, "Example.COM.", mdns.TypeA, 1232, nil), prime: true, want: handler},
		{name: "CNAME to chase", pkt: packQuery(t, "ext.default.svc.cluster.local.", mdns.TypeA, -1, nil), want: slow},
		{name: "two questions", pkt: packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, -1, func(m *mdns.Msg) { m.Question = append(m.Question, m.Question[0]) }), want: formErr},
		{name: "does not unpack", pkt: append(rawHeader(1, 0, 1, 0, 0, 0), 0xC0, 0xFF, 0, 1, 0, 1), want: formErr},
		{name: "opcode STATUS", pkt: packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, -1, func(m *mdns.Msg) { m.Opcode = mdns.OpcodeStatus }), want: notImp},
		{name: "a response", pkt: packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, -1, func(m *mdns.Msg) { m.Response = true }), want: dropped},
		{name: "short", pkt: []byte{1, 2, 3}, want: dropped},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.prime {
				handlerBytes(t, s, tc.pkt)
				clock.Advance(7 * time.Second) // the cached TTLs age
			}
			before := s.Stats()
			got, q := s.answerNow(tc.pkt, nil)
			st := s.Stats()
			switch tc.want {
			case slow:
				if got != nil || q == nil || q.Question[0].Name != mustUnpack(t, tc.pkt).Question[0].Name {
					t.Fatalf("reply %x, query %v: want the query handed back", got, q)
				}
				if st != before {
					t.Errorf("stats changed from %+v to %+v by a query left to the workers", before, st)
				}
			case dropped:
				if got != nil || q != nil {
					t.Fatalf("reply %x, query %v: want nothing", got, q)
				}
				if st.Dropped != before.Dropped+1 || st.Queries != before.Queries {
					t.Errorf("stats %+v: want one more dropped, no query", st)
				}
			case formErr, notImp:
				rcode, count := mdns.RcodeFormatError, st.FormErr-before.FormErr
				if tc.want == notImp {
					rcode, count = mdns.RcodeNotImplemented, st.NotImp-before.NotImp
				}
				m := mustUnpack(t, got)
				if q != nil || len(got) != headerLen || m.Rcode != rcode || !m.Response || m.Id != binary.BigEndian.Uint16(tc.pkt) {
					t.Fatalf("reply %x (%s): want a header with the query's ID and %s", got, describe(m), mdns.RcodeToString[rcode])
				}
				if count != 1 || st.Queries != before.Queries+1 {
					t.Errorf("stats %+v: want one more query, counted as %s", st, mdns.RcodeToString[rcode])
				}
			default:
				if q != nil || got == nil {
					t.Fatalf("reply %x, query %v: want a reply", got, q)
				}
				if st.Queries != before.Queries+1 {
					t.Errorf("queries %d, want %d", st.Queries, before.Queries+1)
				}
				if want := handlerBytes(t, s, tc.pkt); !bytes.Equal(got, want) {
					t.Errorf("reply differs from the handler's:\nnow     %x\nhandler %x", got, want)
				}
			}
		})
	}
	if n := up.udp.Load(); n != 1 {
		t.Errorf("upstream asked %d times, want 1 (the priming query)", n)
	}
}

// mustUnpack unpacks a message.
func mustUnpack(t *testing.T, b []byte) *mdns.Msg {
	t.Helper()
	m := new(mdns.Msg)
	if err := m.Unpack(b); err != nil {
		t.Fatalf("unpack %x: %v", b, err)
	}
	return m
}

// mixedCase alternates the case of the letters of name.
func mixedCase(name string) string {
	b := []byte(name)
	for i := range b {
		if i%2 == 0 {
			b[i] = byte(strings.ToUpper(string(b[i]))[0])
		}
	}
	return string(b)
}

func TestFastReplyPatches(t *testing.T) {
	s := newTestServer(t, Config{})
	tests := []struct {
		name    string
		qname   string
		edns    int
		do      bool
		wantOPT bool
	}{
		{name: "lowercase", qname: "web.default.svc.cluster.local.", edns: -1},
		{name: "case of the question kept", qname: "WeB.Default.SVC.cluster.LOCAL.", edns: -1},
		{name: "EDNS0 echoed", qname: "web.default.svc.cluster.local.", edns: 1232, wantOPT: true},
		{name: "EDNS0 DO echoed", qname: "web.default.svc.cluster.local.", edns: 1232, do: true, wantOPT: true},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id := uint16(1000 + i)
			pkt := packQuery(t, tc.qname, mdns.TypeA, tc.edns, func(m *mdns.Msg) {
				m.Id = id
				if tc.do {
					m.IsEdns0().SetDo()
				}
			})
			b := s.fastReply(pkt, nil)
			if b == nil {
				t.Fatal("not answered by the fast path")
			}
			m := new(mdns.Msg)
			if err := m.Unpack(b); err != nil {
				t.Fatalf("reply does not parse: %v", err)
			}
			if m.Id != id || !m.Response || !m.Authoritative || !m.RecursionDesired || m.Rcode != mdns.RcodeSuccess {
				t.Errorf("header %+v: want id %d, a response, authoritative, RD copied, NOERROR", m.MsgHdr, id)
			}
			if len(m.Question) != 1 || m.Question[0].Name != tc.qname {
				t.Errorf("question %v, want %q as asked", m.Question, tc.qname)
			}
			if got := rrStrings(m.Answer); !slices.Equal(got, []string{"web.default.svc.cluster.local. 5 IN A 9.251.0.10"}) {
				t.Errorf("answer %q", got)
			}
			opt := m.IsEdns0()
			if (opt != nil) != tc.wantOPT {
				t.Fatalf("OPT present %v, want %v", opt != nil, tc.wantOPT)
			}
			if opt != nil && (opt.UDPSize() != ednsSize || opt.Do() != tc.do || opt.Version() != 0) {
				t.Errorf("OPT %v: want size %d, DO %v, version 0", opt, ednsSize, tc.do)
			}
		})
	}
	st := s.Stats()
	if st.Queries != uint64(len(tests)) || st.Cluster != uint64(len(tests)) {
		t.Errorf("stats %+v: want %d queries, all cluster", st, len(tests))
	}
}

func TestFastReplyAfterUpdate(t *testing.T) {
	s := newTestServer(t, Config{})
	a := packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, -1, nil)
	nx := packQuery(t, "new.default.svc.cluster.local.", mdns.TypeA, -1, nil)
	answer := func(pkt []byte) *mdns.Msg {
		t.Helper()
		b := s.fastReply(pkt, nil)
		if b == nil {
			t.Fatal("not answered by the fast path")
		}
		m := new(mdns.Msg)
		if err := m.Unpack(b); err != nil {
			t.Fatal(err)
		}
		return m
	}
	if m := answer(a); len(m.Answer) != 1 || m.Answer[0].(*mdns.A).A.String() != "9.251.0.10" {
		t.Fatalf("before the update: %s", describe(m))
	}
	if m := answer(nx); m.Rcode != mdns.RcodeNameError {
		t.Fatalf("before the update: %s, want NXDOMAIN", describe(m))
	}
	s.Update(&discovery.Snapshot{Services: []*discovery.Service{
		{Namespace: "default", Name: "web", IP: netip.MustParseAddr("9.251.0.20")},
		{Namespace: "default", Name: "new", IP: netip.MustParseAddr("9.251.0.21")},
	}})
	if m := answer(a); len(m.Answer) != 1 || m.Answer[0].(*mdns.A).A.String() != "9.251.0.20" {
		t.Errorf("after the update: %s, want the new address", describe(m))
	}
	if m := answer(nx); m.Rcode != mdns.RcodeSuccess || len(m.Answer) != 1 {
		t.Errorf("after the update: %s, want the new service's address", describe(m))
	}
}

// TestFastReplyDuringUpdates answers from one goroutine while another swaps the catalog between two
// versions: every reply is one version's whole answer (run with -race: the packed replies are
// published safely).
func TestFastReplyDuringUpdates(t *testing.T) {
	s := newTestServer(t, Config{})
	snaps := []*discovery.Snapshot{{}, {}}
	for i, ip := range []string{"9.251.0.30", "9.251.0.31"} {
		for j := range 20 {
			snaps[i].Services = append(snaps[i].Services, &discovery.Service{
				Namespace: "default", Name: "svc" + string(rune('a'+j)), IP: netip.MustParseAddr(ip),
			})
		}
	}
	s.Update(snaps[0])
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-done:
				return
			default:
			}
			s.Update(snaps[i%2])
		}
	}()
	defer func() { close(done); wg.Wait() }()
	var out []byte
	deadline := time.Now().Add(200 * time.Millisecond)
	for i := 0; time.Now().Before(deadline); i++ {
		pkt := packQuery(t, "svc"+string(rune('a'+i%20))+".default.svc.cluster.local.", mdns.TypeA, -1, nil)
		out = s.fastReply(pkt, out)
		if out == nil {
			t.Fatal("not answered by the fast path")
		}
		m := new(mdns.Msg)
		if err := m.Unpack(out); err != nil {
			t.Fatalf("reply does not parse: %v", err)
		}
		if len(m.Answer) != 1 {
			t.Fatalf("reply %s: want one address", describe(m))
		}
		if ip := m.Answer[0].(*mdns.A).A.String(); ip != "9.251.0.30" && ip != "9.251.0.31" {
			t.Fatalf("address %s", ip)
		}
	}
}

func TestFastReplyAllocs(t *testing.T) {
	s := newTestServer(t, Config{})
	tests := []struct {
		name string
		pkt  []byte
	}{
		{"A", packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, -1, nil)},
		{"A with EDNS0", packQuery(t, "web.default.svc.cluster.local.", mdns.TypeA, 1232, nil)},
		{"AAAA NODATA", packQuery(t, "web.default.svc.cluster.local.", mdns.TypeAAAA, -1, nil)},
		{"NXDOMAIN", packQuery(t, "web.default.svc.cluster.local.default.svc.cluster.local.", mdns.TypeA, -1, nil)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out := s.fastReply(tc.pkt, make([]byte, 0, 512)) // packs on first use
			if out == nil {
				t.Fatal("not answered by the fast path")
			}
			if n := testing.AllocsPerRun(100, func() { out = s.fastReply(tc.pkt, out) }); n != 0 {
				t.Errorf("%v allocations per query, want 0", n)
			}
		})
	}
}

// TestFastPathOverSockets checks that queries the fast path answers and queries the handler answers
// interleave on one socket of each kind.
func TestFastPathOverSockets(t *testing.T) {
	for _, generic := range []bool{false, true} {
		t.Run(map[bool]string{false: "net.UDPConn", true: "generic PacketConn"}[generic], func(t *testing.T) {
			s := newTestServer(t, Config{})
			udp, _ := startServer(t, s, generic)
			c := &mdns.Client{Net: "udp", Timeout: 5 * time.Second}
			for range 3 {
				m, _, err := c.Exchange(query("WEB.default.svc.cluster.local.", mdns.TypeA, 1232), udp)
				if err != nil || len(m.Answer) != 1 || m.IsEdns0() == nil || m.Question[0].Name != "WEB.default.svc.cluster.local." {
					t.Fatalf("A: %v %s", err, describe(m))
				}
				m, _, err = c.Exchange(query("_http._tcp.web.default.svc.cluster.local.", mdns.TypeSRV, 0), udp)
				if err != nil || len(m.Answer) != 1 || len(m.Extra) != 1 {
					t.Fatalf("SRV: %v %s", err, describe(m))
				}
			}
			if st := s.Stats(); st.Queries != 6 || st.Cluster != 6 {
				t.Errorf("stats %+v: want 6 cluster queries", st)
			}
		})
	}
}

// BenchmarkServeA is the fast path: an A query of a service, packed, to a reply, packed.
func BenchmarkServeA(b *testing.B) {
	benchmarkFast(b, packQuery(b, "web.default.svc.cluster.local.", mdns.TypeA, -1, nil))
}

// BenchmarkServeAEDNS0 is BenchmarkServeA with an OPT record in the query.
func BenchmarkServeAEDNS0(b *testing.B) {
	benchmarkFast(b, packQuery(b, "web.default.svc.cluster.local.", mdns.TypeA, 1232, nil))
}

// BenchmarkServeNXDOMAIN is the fast path for a missing name of the zone (search-path expansion).
func BenchmarkServeNXDOMAIN(b *testing.B) {
	benchmarkFast(b, packQuery(b, "web.default.svc.cluster.local.default.svc.cluster.local.", mdns.TypeAAAA, -1, nil))
}

func benchmarkFast(b *testing.B, pkt []byte) {
	s := newTestServer(b, Config{})
	out := make([]byte, 0, 512)
	b.ReportAllocs()
	for b.Loop() {
		out = s.fastReply(pkt, out)
	}
	if out == nil {
		b.Fatal("not answered by the fast path")
	}
}

// BenchmarkServeSRV is the handler on the read loop: an SRV query, unpacked, answered and packed.
func BenchmarkServeSRV(b *testing.B) {
	s := newTestServer(b, Config{})
	pkt := packQuery(b, "_http._tcp.web.default.svc.cluster.local.", mdns.TypeSRV, -1, nil)
	out := make([]byte, 0, 512)
	b.ReportAllocs()
	for b.Loop() {
		if out, _ = s.answerNow(pkt, out); out == nil {
			b.Fatal("not answered on the loop")
		}
	}
}

// BenchmarkServeAHandler is the handler's path for the query of BenchmarkServeA, as miekg runs it:
// unpack, handler, pack.
func BenchmarkServeAHandler(b *testing.B) {
	s := newTestServer(b, Config{})
	pkt := packQuery(b, "web.default.svc.cluster.local.", mdns.TypeA, -1, nil)
	w := &packWriter{recorder: newRecorder(false)}
	b.ReportAllocs()
	for b.Loop() {
		r := new(mdns.Msg)
		if err := r.Unpack(pkt); err != nil {
			b.Fatal(err)
		}
		s.ServeDNS(w, r)
	}
}

// BenchmarkUDPRoundTrip times one query and its reply over loopback, one at a time, through a
// generic PacketConn (as the agent's netstack socket is): a packed reply (A) against the handler on
// the read loop (SRV).
func BenchmarkUDPRoundTrip(b *testing.B) {
	for _, tc := range []struct {
		name  string
		qname string
		qtype uint16
	}{
		{"fast-A", "web.default.svc.cluster.local.", mdns.TypeA},
		{"loop-SRV", "_http._tcp.web.default.svc.cluster.local.", mdns.TypeSRV},
	} {
		b.Run(tc.name, func(b *testing.B) {
			s := newTestServer(b, Config{SourceRate: -1}) // one client, as fast as it can
			pc, err := net.ListenPacket("udp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			if err := s.Start(genericPacketConn{pc}, nil); err != nil {
				pc.Close()
				b.Fatal(err)
			}
			conn, err := net.Dial("udp", pc.LocalAddr().String())
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close()
			pkt := packQuery(b, tc.qname, tc.qtype, -1, nil)
			buf := make([]byte, 4096)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := conn.Write(pkt); err != nil {
					b.Fatal(err)
				}
				conn.SetReadDeadline(time.Now().Add(5 * time.Second))
				n, err := conn.Read(buf)
				if err != nil || n < headerLen || binary.BigEndian.Uint16(buf) != 0xBEEF {
					b.Fatalf("reply: %v (%d bytes)", err, n)
				}
			}
		})
	}
}
