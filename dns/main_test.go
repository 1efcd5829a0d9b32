package dns

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"go.uber.org/goleak"

	"github.com/edgewire/edgewire/discovery"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// recorder is a fake mdns.ResponseWriter (as CoreDNS's dnstest.Recorder): it packs the reply as
// the real writer would and keeps it unpacked again, so the test sees the wire form.
type recorder struct {
	remote net.Addr
	msg    *mdns.Msg
	size   int // packed size
	err    error
}

func newRecorder(tcp bool) *recorder {
	if tcp {
		return &recorder{remote: &net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 40000}}
	}
	return &recorder{remote: &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 40000}}
}

func (r *recorder) WriteMsg(m *mdns.Msg) error {
	b, err := m.Pack()
	if err != nil {
		r.err = err
		return err
	}
	r.size = len(b)
	r.msg = new(mdns.Msg)
	if err := r.msg.Unpack(b); err != nil {
		r.err = err
		return err
	}
	return nil
}

func (r *recorder) LocalAddr() net.Addr {
	return &net.UDPAddr{IP: net.IPv4(169, 254, 96, 16), Port: 53}
}
func (r *recorder) RemoteAddr() net.Addr        { return r.remote }
func (r *recorder) Write(b []byte) (int, error) { return len(b), nil }
func (r *recorder) Close() error                { return nil }
func (r *recorder) TsigStatus() error           { return nil }
func (r *recorder) TsigTimersOnly(bool)         {}
func (r *recorder) Hijack()                     {}
func (r *recorder) Network() string             { return r.remote.Network() }

// fakeClock is an injectable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// testSnapshot is the catalog most tests answer from.
func testSnapshot() *discovery.Snapshot {
	big := &discovery.Service{Namespace: "kube-system", Name: "big", Headless: true}
	for i := range 100 {
		big.Endpoints = append(big.Endpoints, discovery.Endpoint{
			Addresses: []netip.Addr{netip.AddrFrom4([4]byte{10, 245, byte(i / 250), byte(1 + i%250)})},
			Ready:     true,
		})
	}
	return &discovery.Snapshot{Services: []*discovery.Service{
		{
			Namespace: "default", Name: "db", Headless: true,
			Ports: []discovery.ServicePort{{Name: "pg", Protocol: discovery.TCP, Port: 5432, TargetPort: 15432}},
			Endpoints: []discovery.Endpoint{
				{Addresses: []netip.Addr{netip.MustParseAddr("10.244.1.5")}, Hostname: "db-0", Ready: true},
				{Addresses: []netip.Addr{netip.MustParseAddr("10.244.1.6")}, Ready: true},
				{Addresses: []netip.Addr{netip.MustParseAddr("10.244.1.7")}, Hostname: "db-2", Ready: false},
			},
		},
		{Namespace: "default", Name: "ext", ExternalName: "example.com"},
		{Namespace: "default", Name: "noip"},
		{
			Namespace: "default", Name: "v6", IP: netip.MustParseAddr("fd00::10"),
			Ports: []discovery.ServicePort{{Name: "http", Protocol: discovery.TCP, Port: 8080}},
		},
		{
			Namespace: "default", Name: "web", IP: netip.MustParseAddr("9.251.0.10"),
			Ports: []discovery.ServicePort{
				{Name: "http", Protocol: discovery.TCP, Port: 80},
				{Name: "dns", Protocol: discovery.UDP, Port: 53},
				{Protocol: discovery.TCP, Port: 9000},
			},
		},
		big,
		{Namespace: "Bad.Namespace", Name: "skipped", IP: netip.MustParseAddr("9.251.0.99")},
	}}
}

// newTestServer returns a server with testSnapshot loaded, closed at the end of the test.
func newTestServer(t testing.TB, cfg Config) *Server {
	t.Helper()
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	s.Update(testSnapshot())
	return s
}

// query builds a query; ednsSize 0 means no OPT record.
func query(name string, qtype uint16, ednsSize uint16) *mdns.Msg {
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	if ednsSize > 0 {
		m.SetEdns0(ednsSize, false)
	}
	return m
}

// rrStrings renders records without their OPT, with whitespace normalized, sorted.
func rrStrings(rrs []mdns.RR) []string {
	var out []string
	for _, rr := range rrs {
		if rr.Header().Rrtype == mdns.TypeOPT {
			continue
		}
		out = append(out, strings.Join(strings.Fields(rr.String()), " "))
	}
	slices.Sort(out)
	return out
}

func hasOPT(m *mdns.Msg) bool { return m.IsEdns0() != nil }

func hasSOA(m *mdns.Msg) bool {
	for _, rr := range m.Ns {
		if _, ok := rr.(*mdns.SOA); ok {
			return true
		}
	}
	return false
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func describe(m *mdns.Msg) string {
	if m == nil {
		return "<nil>"
	}
	return fmt.Sprintf("rcode=%s tc=%v answer=%v ns=%v extra=%v", mdns.RcodeToString[m.Rcode], m.Truncated,
		rrStrings(m.Answer), rrStrings(m.Ns), rrStrings(m.Extra))
}
