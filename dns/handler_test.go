package dns

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"testing"

	mdns "github.com/miekg/dns"

	"github.com/edgewire/edgewire/discovery"
)

func TestServeDNSCluster(t *testing.T) {
	s := newTestServer(t, Config{Addr: netip.MustParseAddr("169.254.96.16")})
	tests := []struct {
		name       string
		q          *mdns.Msg
		tcp        bool
		wantRcode  int
		wantAnswer []string // nil: no answer records
		wantExtra  []string // OPT excluded
		wantSOA    bool     // a SOA in the authority section
		wantTC     bool
		wantOPT    bool
		wantCount  int // when > 0, only the number of answer records is checked
	}{
		{
			name:       "A of a service",
			q:          query("web.default.svc.cluster.local.", mdns.TypeA, 0),
			wantAnswer: []string{"web.default.svc.cluster.local. 5 IN A 9.251.0.10"},
		},
		{
			name:       "AAAA of an IPv6 service",
			q:          query("v6.default.svc.cluster.local.", mdns.TypeAAAA, 0),
			wantAnswer: []string{"v6.default.svc.cluster.local. 5 IN AAAA fd00::10"},
		},
		{
			name:    "AAAA of an IPv4 service is NODATA",
			q:       query("web.default.svc.cluster.local.", mdns.TypeAAAA, 0),
			wantSOA: true,
		},
		{
			name: "headless A lists the ready endpoints",
			q:    query("db.default.svc.cluster.local.", mdns.TypeA, 0),
			wantAnswer: []string{
				"db.default.svc.cluster.local. 5 IN A 10.244.1.5",
				"db.default.svc.cluster.local. 5 IN A 10.244.1.6",
			},
		},
		{
			name:       "headless endpoint hostname",
			q:          query("db-0.db.default.svc.cluster.local.", mdns.TypeA, 0),
			wantAnswer: []string{"db-0.db.default.svc.cluster.local. 5 IN A 10.244.1.5"},
		},
		{
			name:       "headless endpoint without hostname by dashed address",
			q:          query("10-244-1-6.db.default.svc.cluster.local.", mdns.TypeA, 0),
			wantAnswer: []string{"10-244-1-6.db.default.svc.cluster.local. 5 IN A 10.244.1.6"},
		},
		{
			name:      "hostname of an unready endpoint does not exist",
			q:         query("db-2.db.default.svc.cluster.local.", mdns.TypeA, 0),
			wantRcode: mdns.RcodeNameError,
			wantSOA:   true,
		},
		{
			name:       "SRV of a named port with the A as additional",
			q:          query("_http._tcp.web.default.svc.cluster.local.", mdns.TypeSRV, 0),
			wantAnswer: []string{"_http._tcp.web.default.svc.cluster.local. 5 IN SRV 0 100 80 web.default.svc.cluster.local."},
			wantExtra:  []string{"web.default.svc.cluster.local. 5 IN A 9.251.0.10"},
		},
		{
			name:       "SRV of a UDP port",
			q:          query("_dns._udp.web.default.svc.cluster.local.", mdns.TypeSRV, 0),
			wantAnswer: []string{"_dns._udp.web.default.svc.cluster.local. 5 IN SRV 0 100 53 web.default.svc.cluster.local."},
			wantExtra:  []string{"web.default.svc.cluster.local. 5 IN A 9.251.0.10"},
		},
		{
			name:       "SRV of an IPv6 service has AAAA additional",
			q:          query("_http._tcp.v6.default.svc.cluster.local.", mdns.TypeSRV, 0),
			wantAnswer: []string{"_http._tcp.v6.default.svc.cluster.local. 5 IN SRV 0 100 8080 v6.default.svc.cluster.local."},
			wantExtra:  []string{"v6.default.svc.cluster.local. 5 IN AAAA fd00::10"},
		},
		{
			name:      "SRV with the wrong protocol does not exist",
			q:         query("_http._udp.web.default.svc.cluster.local.", mdns.TypeSRV, 0),
			wantRcode: mdns.RcodeNameError,
			wantSOA:   true,
		},
		{
			name: "headless SRV, one per ready endpoint with the endpoint port",
			q:    query("_pg._tcp.db.default.svc.cluster.local.", mdns.TypeSRV, 0),
			wantAnswer: []string{
				"_pg._tcp.db.default.svc.cluster.local. 5 IN SRV 0 100 15432 10-244-1-6.db.default.svc.cluster.local.",
				"_pg._tcp.db.default.svc.cluster.local. 5 IN SRV 0 100 15432 db-0.db.default.svc.cluster.local.",
			},
			wantExtra: []string{
				"10-244-1-6.db.default.svc.cluster.local. 5 IN A 10.244.1.6",
				"db-0.db.default.svc.cluster.local. 5 IN A 10.244.1.5",
			},
		},
		{
			name:       "PTR of an IPv4 service IP",
			q:          query("10.0.251.9.in-addr.arpa.", mdns.TypePTR, 0),
			wantAnswer: []string{"10.0.251.9.in-addr.arpa. 5 IN PTR web.default.svc.cluster.local."},
		},
		{
			name:       "PTR of an IPv6 service IP",
			q:          query(mustReverse(t, "fd00::10"), mdns.TypePTR, 0),
			wantAnswer: []string{mustReverse(t, "fd00::10") + " 5 IN PTR v6.default.svc.cluster.local."},
		},
		{
			name:       "PTR of a headless endpoint",
			q:          query("5.1.244.10.in-addr.arpa.", mdns.TypePTR, 0),
			wantAnswer: []string{"5.1.244.10.in-addr.arpa. 5 IN PTR db-0.db.default.svc.cluster.local."},
		},
		{
			name:      "unknown service is NXDOMAIN with SOA",
			q:         query("nope.default.svc.cluster.local.", mdns.TypeA, 0),
			wantRcode: mdns.RcodeNameError,
			wantSOA:   true,
		},
		{
			name:      "unknown name under the apex is NXDOMAIN",
			q:         query("foo.cluster.local.", mdns.TypeA, 0),
			wantRcode: mdns.RcodeNameError,
			wantSOA:   true,
		},
		{
			name:    "existing name without the type is NODATA",
			q:       query("web.default.svc.cluster.local.", mdns.TypeMX, 0),
			wantSOA: true,
		},
		{
			name:    "service without an IP is NODATA",
			q:       query("noip.default.svc.cluster.local.", mdns.TypeA, 0),
			wantSOA: true,
		},
		{
			name:    "namespace parent is NODATA",
			q:       query("default.svc.cluster.local.", mdns.TypeA, 0),
			wantSOA: true,
		},
		{
			name:    "svc parent is NODATA",
			q:       query("svc.cluster.local.", mdns.TypeA, 0),
			wantSOA: true,
		},
		{
			name:    "port protocol parent is NODATA",
			q:       query("_tcp.web.default.svc.cluster.local.", mdns.TypeSRV, 0),
			wantSOA: true,
		},
		{
			name:    "apex A is NODATA",
			q:       query("cluster.local.", mdns.TypeA, 0),
			wantSOA: true,
		},
		{
			name:      "apex SOA",
			q:         query("cluster.local.", mdns.TypeSOA, 0),
			wantCount: 1,
		},
		{
			name:       "apex NS with glue",
			q:          query("cluster.local.", mdns.TypeNS, 0),
			wantAnswer: []string{"cluster.local. 5 IN NS ns.dns.cluster.local."},
			wantExtra:  []string{"ns.dns.cluster.local. 5 IN A 169.254.96.16"},
		},
		{
			name:       "the NS target resolves",
			q:          query("ns.dns.cluster.local.", mdns.TypeA, 0),
			wantAnswer: []string{"ns.dns.cluster.local. 5 IN A 169.254.96.16"},
		},
		{
			name:       "names are case-insensitive",
			q:          query("WEB.Default.SVC.Cluster.LOCAL.", mdns.TypeA, 0),
			wantAnswer: []string{"web.default.svc.cluster.local. 5 IN A 9.251.0.10"},
		},
		{
			name:       "ExternalName is a CNAME (no upstream to chase it)",
			q:          query("ext.default.svc.cluster.local.", mdns.TypeA, 0),
			wantAnswer: []string{"ext.default.svc.cluster.local. 5 IN CNAME example.com."},
		},
		{
			name:       "ExternalName CNAME query",
			q:          query("ext.default.svc.cluster.local.", mdns.TypeCNAME, 0),
			wantAnswer: []string{"ext.default.svc.cluster.local. 5 IN CNAME example.com."},
		},
		{
			name:      "service with an invalid namespace is left out",
			q:         query("skipped.bad.namespace.svc.cluster.local.", mdns.TypeA, 0),
			wantRcode: mdns.RcodeNameError,
			wantSOA:   true,
		},
		{
			name:      "EDNS0 size lets 100 endpoints through over UDP",
			q:         query("big.kube-system.svc.cluster.local.", mdns.TypeA, 4096),
			wantOPT:   true,
			wantCount: 100,
		},
		{
			name:      "no EDNS0: 100 endpoints are truncated over UDP",
			q:         query("big.kube-system.svc.cluster.local.", mdns.TypeA, 0),
			wantTC:    true,
			wantCount: -1, // some, fewer than 100
		},
		{
			name:      "small EDNS0 size truncates with OPT kept",
			q:         query("big.kube-system.svc.cluster.local.", mdns.TypeA, 1024),
			wantTC:    true,
			wantOPT:   true,
			wantCount: -1,
		},
		{
			name:      "TCP carries the whole answer",
			q:         query("big.kube-system.svc.cluster.local.", mdns.TypeA, 0),
			tcp:       true,
			wantCount: 100,
		},
		{
			name:       "OPT answered with OPT",
			q:          query("web.default.svc.cluster.local.", mdns.TypeA, 1232),
			wantOPT:    true,
			wantAnswer: []string{"web.default.svc.cluster.local. 5 IN A 9.251.0.10"},
		},
		{
			name: "class CHAOS in the zone is refused",
			q: func() *mdns.Msg {
				m := query("web.default.svc.cluster.local.", mdns.TypeA, 0)
				m.Question[0].Qclass = mdns.ClassCHAOS
				return m
			}(),
			wantRcode: mdns.RcodeRefused,
		},
		{
			name:      "no upstream: outside names get SERVFAIL",
			q:         query("example.com.", mdns.TypeA, 0),
			wantRcode: mdns.RcodeServerFailure,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w := newRecorder(tc.tcp)
			s.ServeDNS(w, tc.q)
			if w.err != nil {
				t.Fatalf("write: %v", w.err)
			}
			m := w.msg
			if m == nil {
				t.Fatal("no reply")
			}
			if m.Id != tc.q.Id || !m.Response {
				t.Errorf("id %d response %v, want id %d response", m.Id, m.Response, tc.q.Id)
			}
			if m.Rcode != tc.wantRcode {
				t.Fatalf("rcode %s, want %s: %s", mdns.RcodeToString[m.Rcode], mdns.RcodeToString[tc.wantRcode], describe(m))
			}
			if m.Truncated != tc.wantTC {
				t.Errorf("TC %v, want %v", m.Truncated, tc.wantTC)
			}
			if hasOPT(m) != tc.wantOPT {
				t.Errorf("OPT present %v, want %v", hasOPT(m), tc.wantOPT)
			}
			if hasSOA(m) != tc.wantSOA {
				t.Errorf("SOA in authority %v, want %v: %s", hasSOA(m), tc.wantSOA, describe(m))
			}
			if !tc.tcp {
				limit := 512
				if opt := tc.q.IsEdns0(); opt != nil {
					limit = int(opt.UDPSize())
				}
				if w.size > limit {
					t.Errorf("UDP reply of %d bytes, limit %d", w.size, limit)
				}
			}
			switch {
			case tc.wantCount > 0:
				if len(m.Answer) != tc.wantCount {
					t.Errorf("%d answer records, want %d", len(m.Answer), tc.wantCount)
				}
			case tc.wantCount < 0:
				if len(m.Answer) == 0 || len(m.Answer) >= 100 {
					t.Errorf("%d answer records, want a truncated part of 100", len(m.Answer))
				}
			default:
				if got := rrStrings(m.Answer); !slices.Equal(got, tc.wantAnswer) {
					t.Errorf("answer %q, want %q", got, tc.wantAnswer)
				}
				if got := rrStrings(m.Extra); !slices.Equal(got, tc.wantExtra) {
					t.Errorf("extra %q, want %q", got, tc.wantExtra)
				}
			}
		})
	}
	st := s.Stats()
	if st.Queries != uint64(len(tests)) || st.NXDomain != 5 || st.ServFail != 1 || st.Refused != 1 {
		t.Errorf("stats %+v: want %d queries, 5 NXDOMAIN, 1 SERVFAIL, 1 refused", st, len(tests))
	}
}

func mustReverse(t *testing.T, ip string) string {
	t.Helper()
	rev, err := mdns.ReverseAddr(ip)
	if err != nil {
		t.Fatal(err)
	}
	return rev
}

func TestServeDNSSOA(t *testing.T) {
	s := newTestServer(t, Config{Domain: "Mesh.Example.", TTL: 30})
	w := newRecorder(false)
	s.ServeDNS(w, query("nope.mesh.example.", mdns.TypeA, 0))
	if w.msg == nil || w.msg.Rcode != mdns.RcodeNameError || len(w.msg.Ns) != 1 {
		t.Fatalf("reply %s, want NXDOMAIN with one SOA", describe(w.msg))
	}
	soa, ok := w.msg.Ns[0].(*mdns.SOA)
	if !ok {
		t.Fatalf("authority %v is not a SOA", w.msg.Ns[0])
	}
	if soa.Hdr.Name != "mesh.example." || soa.Hdr.Ttl != 30 || soa.Minttl != 30 || soa.Ns != "ns.dns.mesh.example." {
		t.Errorf("SOA %v: want owner mesh.example., TTL and minimum 30", soa)
	}
	if !w.msg.Authoritative {
		t.Error("cluster answer not authoritative")
	}
}

func TestServeDNSMalformed(t *testing.T) {
	s := newTestServer(t, Config{})
	tests := []struct {
		name      string
		q         func() *mdns.Msg
		wantRcode int
	}{
		{
			name:      "no question",
			q:         func() *mdns.Msg { m := new(mdns.Msg); m.Id = 7; return m },
			wantRcode: mdns.RcodeFormatError,
		},
		{
			name: "two questions",
			q: func() *mdns.Msg {
				m := query("web.default.svc.cluster.local.", mdns.TypeA, 0)
				m.Question = append(m.Question, m.Question[0])
				return m
			},
			wantRcode: mdns.RcodeFormatError,
		},
		{
			name: "a response",
			q: func() *mdns.Msg {
				m := query("web.default.svc.cluster.local.", mdns.TypeA, 0)
				m.Response = true
				return m
			},
			wantRcode: mdns.RcodeFormatError,
		},
		{
			name: "opcode UPDATE",
			q: func() *mdns.Msg {
				m := query("web.default.svc.cluster.local.", mdns.TypeA, 0)
				m.Opcode = mdns.OpcodeUpdate
				return m
			},
			wantRcode: mdns.RcodeNotImplemented,
		},
		{
			name: "EDNS version 1",
			q: func() *mdns.Msg {
				m := query("web.default.svc.cluster.local.", mdns.TypeA, 1232)
				m.IsEdns0().SetVersion(1)
				return m
			},
			wantRcode: mdns.RcodeBadVers,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			q := tc.q()
			w := newRecorder(false)
			s.ServeDNS(w, q)
			if w.msg == nil {
				t.Fatalf("no reply (write error %v)", w.err)
			}
			if w.msg.Rcode != tc.wantRcode || w.msg.Id != q.Id {
				t.Errorf("reply id %d %s, want id %d %s", w.msg.Id, mdns.RcodeToString[w.msg.Rcode], q.Id, mdns.RcodeToString[tc.wantRcode])
			}
		})
	}
	st := s.Stats()
	if st.FormErr != 4 || st.NotImp != 1 {
		t.Errorf("stats %+v: want 4 FORMERR (incl. BADVERS), 1 NOTIMP", st)
	}
	s.ServeDNS(newRecorder(false), nil) // must not panic
}

func TestUpdateReplaces(t *testing.T) {
	s := newTestServer(t, Config{})
	s.Update(&discovery.Snapshot{Services: []*discovery.Service{
		{Namespace: "default", Name: "web", IP: netip.MustParseAddr("9.251.0.20")},
	}})
	tests := []struct {
		name  string
		qname string
		want  int
	}{
		{name: "changed service has its new IP", qname: "web.default.svc.cluster.local.", want: mdns.RcodeSuccess},
		{name: "removed service is gone", qname: "db.default.svc.cluster.local.", want: mdns.RcodeNameError},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m, err := s.Lookup(context.Background(), tc.qname, mdns.TypeA)
			if err != nil {
				t.Fatal(err)
			}
			if m.Rcode != tc.want {
				t.Fatalf("rcode %s, want %s", mdns.RcodeToString[m.Rcode], mdns.RcodeToString[tc.want])
			}
		})
	}
	m, _ := s.Lookup(context.Background(), "web.default.svc.cluster.local", mdns.TypeA)
	if got := rrStrings(m.Answer); !slices.Equal(got, []string{"web.default.svc.cluster.local. 5 IN A 9.251.0.20"}) {
		t.Errorf("answer %q", got)
	}
	s.Update(nil)
	if m, _ := s.Lookup(context.Background(), "web.default.svc.cluster.local", mdns.TypeA); m.Rcode != mdns.RcodeNameError {
		t.Errorf("after Update(nil): %s, want NXDOMAIN", describe(m))
	}
}

func TestLookupErrors(t *testing.T) {
	s, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		qname string
		close bool
	}{
		{name: "empty name", qname: ""},
		{name: "label too long", qname: fmt.Sprintf("%070d.example.", 0)},
		{name: "closed server", qname: "web.default.svc.cluster.local.", close: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.close {
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if m, err := s.Lookup(context.Background(), tc.qname, mdns.TypeA); err == nil {
				t.Errorf("Lookup(%q) = %s, want an error", tc.qname, describe(m))
			}
		})
	}
}

func TestNewErrors(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
	}{
		{name: "bad domain", cfg: Config{Domain: "bad domain"}},
		{name: "empty label in domain", cfg: Config{Domain: "cluster..local"}},
		{name: "upstream without port", cfg: Config{Upstreams: []string{"10.0.0.1"}}},
		{name: "upstream hostname", cfg: Config{Upstreams: []string{"dns.example:53"}}},
		{name: "upstream port 0", cfg: Config{Upstreams: []string{"10.0.0.1:0"}}},
		{name: "negative timeout", cfg: Config{ForwardTimeout: -1}},
		{name: "negative workers", cfg: Config{Workers: -1}},
		{name: "negative queue", cfg: Config{QueueLen: -1}},
		{name: "negative max forwards", cfg: Config{MaxForwards: -1}},
		{name: "negative burst", cfg: Config{SourceBurst: -1}},
		{name: "negative max sources", cfg: Config{MaxSources: -1}},
		{name: "negative max TCP conns", cfg: Config{MaxTCPConns: -1}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if s, err := New(tc.cfg); err == nil {
				s.Close()
				t.Errorf("New(%+v) succeeded, want an error", tc.cfg)
			}
		})
	}
}

func TestReverseName(t *testing.T) {
	tests := []struct {
		name string
		ip   string
	}{
		{name: "v4", ip: "9.251.0.10"},
		{name: "v6", ip: "fd00:1234::abcd"},
		{name: "v4-mapped v6 is v4", ip: "::ffff:10.0.0.1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			addr := netip.MustParseAddr(tc.ip)
			want, err := mdns.ReverseAddr(addr.Unmap().String())
			if err != nil {
				t.Fatal(err)
			}
			if got := reverseName(addr); got != want {
				t.Errorf("reverseName(%s) = %q, want %q", tc.ip, got, want)
			}
		})
	}
}

func BenchmarkServeDNS(b *testing.B) {
	s := newTestServer(b, Config{})
	q := query("web.default.svc.cluster.local.", mdns.TypeA, 0)
	w := &packWriter{recorder: newRecorder(false)}
	b.ReportAllocs()
	for b.Loop() {
		s.ServeDNS(w, q)
	}
	if w.n == 0 {
		b.Fatal("no reply written")
	}
}

// packWriter packs replies as miekg's writer does, without unpacking them again.
type packWriter struct {
	*recorder
	n int
}

func (w *packWriter) WriteMsg(m *mdns.Msg) error {
	b, err := m.Pack()
	w.n = len(b)
	return err
}

func BenchmarkUpdate(b *testing.B) {
	snap := bigSnapshot(10000, 10)
	s := newTestServer(b, Config{})
	b.ReportAllocs()
	for b.Loop() {
		s.Update(snap)
	}
}

// bigSnapshot has nsvc services, every tenth headless, each with eps endpoints.
func bigSnapshot(nsvc, eps int) *discovery.Snapshot {
	snap := &discovery.Snapshot{}
	for i := range nsvc {
		svc := &discovery.Service{
			Namespace: fmt.Sprintf("ns%d", i%50),
			Name:      fmt.Sprintf("svc%d", i),
			IP:        netip.AddrFrom4([4]byte{9, 251, byte(i >> 8), byte(i)}),
			Headless:  i%10 == 0,
			Ports:     []discovery.ServicePort{{Name: "http", Protocol: discovery.TCP, Port: 80}},
		}
		if svc.Headless {
			svc.IP = netip.Addr{}
		}
		for j := range eps {
			n := i*eps + j
			svc.Endpoints = append(svc.Endpoints, discovery.Endpoint{
				Addresses: []netip.Addr{netip.AddrFrom4([4]byte{10, byte(n >> 16), byte(n >> 8), byte(n)})},
				Ready:     true,
			})
		}
		snap.Services = append(snap.Services, svc)
	}
	return snap
}
