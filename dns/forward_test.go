package dns

import (
	"context"
	"net"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// upstream is a fake resolver on 127.0.0.1, UDP and TCP on the same port.
type upstream struct {
	addr     string
	udp, tcp atomic.Int64 // queries received per transport
	servfail bool         // answer everything with SERVFAIL
}

// ServeDNS answers:
//   - example.com. A: 93.184.216.34, TTL 60
//   - big.example. A: 100 records, truncated to 512 bytes over UDP whatever the client's EDNS0
//     size (an upstream that forces TCP)
//   - nx.example.: NXDOMAIN with a SOA of minimum 30 (TTL 300)
//   - anything else: NODATA without a SOA (uncacheable)
func (u *upstream) ServeDNS(w mdns.ResponseWriter, r *mdns.Msg) {
	tcp := isTCP(w)
	if tcp {
		u.tcp.Add(1)
	} else {
		u.udp.Add(1)
	}
	m := new(mdns.Msg)
	m.SetReply(r)
	m.RecursionAvailable = true
	q := r.Question[0]
	switch {
	case u.servfail:
		m.Rcode = mdns.RcodeServerFailure
	case q.Name == "example.com." && q.Qtype == mdns.TypeA:
		m.Answer = []mdns.RR{mustRR("example.com. 60 IN A 93.184.216.34")}
	case q.Name == "big.example." && q.Qtype == mdns.TypeA:
		for i := range 100 {
			m.Answer = append(m.Answer, &mdns.A{
				Hdr: mdns.RR_Header{Name: q.Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 60},
				A:   net.IPv4(192, 0, 2, byte(i)),
			})
		}
		if !tcp {
			m.Truncate(mdns.MinMsgSize)
		}
	case q.Name == "nx.example.":
		m.Rcode = mdns.RcodeNameError
		m.Ns = []mdns.RR{mustRR("example. 300 IN SOA ns.example. host.example. 1 7200 1800 86400 30")}
	}
	if opt := r.IsEdns0(); opt != nil {
		m.SetEdns0(opt.UDPSize(), false)
	}
	w.WriteMsg(m)
}

func mustRR(s string) mdns.RR {
	rr, err := mdns.NewRR(s)
	if err != nil {
		panic(err)
	}
	return rr
}

// startUpstream serves a fake upstream until the end of the test.
func startUpstream(t *testing.T, servfail bool) *upstream {
	t.Helper()
	u := &upstream{servfail: servfail}
	var pc net.PacketConn
	var ln net.Listener
	for attempt := 0; ; attempt++ {
		var err error
		if pc, err = net.ListenPacket("udp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		if ln, err = net.Listen("tcp", pc.LocalAddr().String()); err == nil {
			break
		}
		pc.Close()
		if attempt == 10 {
			t.Fatalf("no port free for both UDP and TCP: %v", err)
		}
	}
	u.addr = pc.LocalAddr().String()
	for _, srv := range []*mdns.Server{{PacketConn: pc, Handler: u}, {Listener: ln, Handler: u}} {
		started := make(chan struct{})
		done := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go func() {
			defer close(done)
			srv.ActivateAndServe()
		}()
		<-started
		t.Cleanup(func() {
			srv.Shutdown()
			<-done
		})
	}
	return u
}

// deadUpstream returns an address where nothing answers: silent (bound, never read) or refused
// (closed port).
func deadUpstream(t *testing.T, silent bool) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := pc.LocalAddr().String()
	if silent {
		t.Cleanup(func() { pc.Close() })
	} else {
		pc.Close()
	}
	return addr
}

func ask(t *testing.T, s *Server, name string, qtype uint16) *mdns.Msg {
	t.Helper()
	q := query(name, qtype, 0)
	w := newRecorder(false)
	s.ServeDNS(w, q)
	if w.msg == nil {
		t.Fatalf("no reply to %s (write error %v)", name, w.err)
	}
	if w.msg.Id != q.Id {
		t.Fatalf("reply id %d, want %d", w.msg.Id, q.Id)
	}
	return w.msg
}

func TestForward(t *testing.T) {
	up := startUpstream(t, false)
	clock := &fakeClock{t: time.Unix(1_000_000, 0)}
	s := newTestServer(t, Config{Upstreams: []string{up.addr}})
	s.now = clock.Now

	m := ask(t, s, "Example.COM.", mdns.TypeA)
	if got := rrStrings(m.Answer); !slices.Equal(got, []string{"example.com. 60 IN A 93.184.216.34"}) {
		t.Fatalf("forwarded answer %q", got)
	}
	if m.Question[0].Name != "Example.COM." || m.Authoritative || !m.RecursionAvailable {
		t.Errorf("reply header/question %v AA=%v RA=%v: want the client's question, AA off, RA on", m.Question, m.Authoritative, m.RecursionAvailable)
	}
	if up.udp.Load() != 1 {
		t.Fatalf("upstream saw %d UDP queries, want 1", up.udp.Load())
	}

	tests := []struct {
		name         string
		advance      time.Duration
		wantTTL      uint32
		wantUpstream int64
	}{
		{name: "cache hit leaves the upstream alone", advance: 0, wantTTL: 60, wantUpstream: 1},
		{name: "cached TTL decreases with age", advance: 25 * time.Second, wantTTL: 35, wantUpstream: 1},
		{name: "expired entry is fetched again", advance: 40 * time.Second, wantTTL: 60, wantUpstream: 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clock.Advance(tc.advance)
			m := ask(t, s, "example.com.", mdns.TypeA)
			if len(m.Answer) != 1 || m.Answer[0].Header().Ttl != tc.wantTTL {
				t.Errorf("answer %s, want TTL %d", describe(m), tc.wantTTL)
			}
			if got := up.udp.Load(); got != tc.wantUpstream {
				t.Errorf("upstream saw %d queries, want %d", got, tc.wantUpstream)
			}
		})
	}
	st := s.Stats()
	if st.Forwarded != 2 || st.CacheHits != 2 {
		t.Errorf("stats %+v: want 2 forwarded, 2 cache hits", st)
	}
}

func TestForwardNegativeCache(t *testing.T) {
	up := startUpstream(t, false)
	clock := &fakeClock{t: time.Unix(1_000_000, 0)}
	s := newTestServer(t, Config{Upstreams: []string{up.addr}})
	s.now = clock.Now
	tests := []struct {
		name         string
		qname        string
		advance      time.Duration
		wantRcode    int
		wantUpstream int64
	}{
		{name: "NXDOMAIN forwarded", qname: "nx.example.", wantRcode: mdns.RcodeNameError, wantUpstream: 1},
		{name: "NXDOMAIN cached for the SOA minimum", qname: "nx.example.", advance: 29 * time.Second, wantRcode: mdns.RcodeNameError, wantUpstream: 1},
		{name: "NXDOMAIN expires after the SOA minimum", qname: "nx.example.", advance: 2 * time.Second, wantRcode: mdns.RcodeNameError, wantUpstream: 2},
		{name: "NODATA without SOA is not cached", qname: "nodata.example.", wantUpstream: 3},
		{name: "NODATA without SOA asked again", qname: "nodata.example.", wantUpstream: 4},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clock.Advance(tc.advance)
			m := ask(t, s, tc.qname, mdns.TypeA)
			if m.Rcode != tc.wantRcode {
				t.Errorf("rcode %s, want %s", mdns.RcodeToString[m.Rcode], mdns.RcodeToString[tc.wantRcode])
			}
			if got := up.udp.Load(); got != tc.wantUpstream {
				t.Errorf("upstream saw %d queries, want %d", got, tc.wantUpstream)
			}
		})
	}
}

func TestForwardTruncatedRetriesTCP(t *testing.T) {
	up := startUpstream(t, false)
	s := newTestServer(t, Config{Upstreams: []string{up.addr}})
	m, err := s.Lookup(context.Background(), "big.example", mdns.TypeA)
	if err != nil {
		t.Fatal(err)
	}
	if m.Truncated || len(m.Answer) != 100 {
		t.Errorf("answer TC %v with %d records, want the whole 100 fetched over TCP", m.Truncated, len(m.Answer))
	}
	if up.udp.Load() != 1 || up.tcp.Load() != 1 {
		t.Errorf("upstream saw %d UDP and %d TCP queries, want 1 and 1", up.udp.Load(), up.tcp.Load())
	}
	// Over UDP-512 the client gets a truncated copy of the cached answer.
	m = ask(t, s, "big.example.", mdns.TypeA)
	if !m.Truncated || up.tcp.Load() != 1 {
		t.Errorf("UDP client: TC %v, upstream TCP queries %d: want TC from the cache", m.Truncated, up.tcp.Load())
	}
}

func TestForwardFailover(t *testing.T) {
	tests := []struct {
		name  string
		first func(t *testing.T) string
	}{
		{name: "first upstream silent (timeout)", first: func(t *testing.T) string { return deadUpstream(t, true) }},
		{name: "first upstream refuses (network error)", first: func(t *testing.T) string { return deadUpstream(t, false) }},
		{name: "first upstream answers SERVFAIL", first: func(t *testing.T) string { return startUpstream(t, true).addr }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			second := startUpstream(t, false)
			s := newTestServer(t, Config{Upstreams: []string{tc.first(t), second.addr}, ForwardTimeout: 200 * time.Millisecond})
			m := ask(t, s, "example.com.", mdns.TypeA)
			if m.Rcode != mdns.RcodeSuccess || len(m.Answer) != 1 {
				t.Fatalf("reply %s, want the second upstream's answer", describe(m))
			}
			if second.udp.Load() != 1 {
				t.Errorf("second upstream saw %d queries, want 1", second.udp.Load())
			}
		})
	}
}

func TestForwardServFail(t *testing.T) {
	tests := []struct {
		name      string
		upstreams func(t *testing.T) []string
	}{
		{name: "no upstreams", upstreams: func(*testing.T) []string { return nil }},
		{name: "all upstreams dead", upstreams: func(t *testing.T) []string {
			return []string{deadUpstream(t, false), startUpstream(t, true).addr}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestServer(t, Config{Upstreams: tc.upstreams(t), ForwardTimeout: 200 * time.Millisecond})
			m := ask(t, s, "example.com.", mdns.TypeA)
			if m.Rcode != mdns.RcodeServerFailure {
				t.Errorf("reply %s, want SERVFAIL", describe(m))
			}
			if st := s.Stats(); st.ServFail != 1 {
				t.Errorf("stats %+v: want 1 SERVFAIL", st)
			}
		})
	}
}

func TestExternalNameChased(t *testing.T) {
	up := startUpstream(t, false)
	s := newTestServer(t, Config{Upstreams: []string{up.addr}})
	m := ask(t, s, "ext.default.svc.cluster.local.", mdns.TypeA)
	want := []string{
		"example.com. 60 IN A 93.184.216.34",
		"ext.default.svc.cluster.local. 5 IN CNAME example.com.",
	}
	if got := rrStrings(m.Answer); !slices.Equal(got, want) || !strings.EqualFold(m.Answer[0].Header().Name, "ext.default.svc.cluster.local.") {
		t.Errorf("answer %q, want %q with the CNAME first", got, want)
	}
}

func TestCacheBounded(t *testing.T) {
	c := newCache(3)
	now := time.Unix(1_000_000, 0)
	m := new(mdns.Msg)
	m.Answer = []mdns.RR{mustRR("a.example. 60 IN A 192.0.2.1")}
	for _, name := range []string{"a.", "b.", "c.", "d.", "e."} {
		c.put(cacheKey{name: name, qtype: mdns.TypeA, qclass: mdns.ClassINET}, m, now)
	}
	if c.len() != 3 {
		t.Errorf("cache holds %d entries, want its bound 3", c.len())
	}
}

func TestCacheTTL(t *testing.T) {
	tests := []struct {
		name string
		msg  string // zone-file records: answer; "ns:" prefix puts one in authority
		rc   int
		tc   bool
		want uint32
	}{
		{name: "least answer TTL", msg: "a. 60 IN A 192.0.2.1|a. 20 IN A 192.0.2.2", want: 20},
		{name: "capped at an hour", msg: "a. 86400 IN A 192.0.2.1", want: 3600},
		{name: "TTL 0 is not cached", msg: "a. 0 IN A 192.0.2.1", want: 0},
		{name: "NXDOMAIN uses SOA minimum", msg: "ns:a. 300 IN SOA ns. h. 1 2 3 4 30", rc: mdns.RcodeNameError, want: 30},
		{name: "NXDOMAIN uses SOA TTL when lower", msg: "ns:a. 10 IN SOA ns. h. 1 2 3 4 30", rc: mdns.RcodeNameError, want: 10},
		{name: "NXDOMAIN without SOA", msg: "", rc: mdns.RcodeNameError, want: 0},
		{name: "SERVFAIL", msg: "", rc: mdns.RcodeServerFailure, want: 0},
		{name: "truncated", msg: "a. 60 IN A 192.0.2.1", tc: true, want: 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := &mdns.Msg{MsgHdr: mdns.MsgHdr{Rcode: tc.rc, Truncated: tc.tc}}
			for rr := range strings.SplitSeq(tc.msg, "|") {
				switch {
				case rr == "":
				case strings.HasPrefix(rr, "ns:"):
					m.Ns = append(m.Ns, mustRR(rr[3:]))
				default:
					m.Answer = append(m.Answer, mustRR(rr))
				}
			}
			if got := cacheTTL(m); got != tc.want {
				t.Errorf("cacheTTL = %d, want %d", got, tc.want)
			}
		})
	}
}
