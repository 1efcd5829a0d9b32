package proxy_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/proxy"
	"github.com/edgewire/edgewire/overlay/proxy/proxytest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// clock is a fake Config.Now.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

var (
	svcIP   = netip.MustParseAddr("9.251.0.10")
	svcIP6  = netip.MustParseAddr("fd00:9251::10")
	client  = netip.MustParseAddrPort("10.0.0.1:40000")
	httpDst = netip.AddrPortFrom(svcIP, 80)
)

// ep returns a ready endpoint at addrs on node.
func ep(node string, addrs ...string) discovery.Endpoint {
	e := discovery.Endpoint{NodeName: node, Ready: true, Serving: true}
	for _, a := range addrs {
		e.Addresses = append(e.Addresses, netip.MustParseAddr(a))
	}
	return e
}

// service returns a service web/default at svcIP with TCP port 80 → 8080 and the endpoints.
func service(eps ...discovery.Endpoint) *discovery.Service {
	return &discovery.Service{
		Namespace: "default",
		Name:      "web",
		IP:        svcIP,
		Ports:     []discovery.ServicePort{{Name: "http", Protocol: discovery.TCP, Port: 80, TargetPort: 8080}},
		Endpoints: eps,
	}
}

func withPolicy(s *discovery.Service, policy string) *discovery.Service {
	s.Annotations = map[string]string{discovery.AnnotationLBPolicy: policy}
	return s
}

func snapshot(svcs ...*discovery.Service) *discovery.Snapshot {
	return &discovery.Snapshot{Services: svcs}
}

// newProxy returns a proxy over a fake dialer and a fake clock.
func newProxy(t testing.TB, cfg proxy.Config, svcs ...*discovery.Service) (*proxy.Proxy, *proxytest.Dialer, *clock) {
	t.Helper()
	d := &proxytest.Dialer{}
	c := newClock()
	cfg.Dialer = d
	cfg.Now = c.Now
	p := proxy.New(cfg)
	p.Update(snapshot(svcs...))
	return p, d, c
}

// dial runs one flow and returns the endpoint it reached, failing the test on error.
func dial(t testing.TB, p *proxy.Proxy, src, dst netip.AddrPort) netip.AddrPort {
	t.Helper()
	conn, err := p.DialFlow(context.Background(), discovery.TCP, src, dst)
	if err != nil {
		t.Fatalf("DialFlow(%s → %s): %v", src, dst, err)
	}
	defer conn.Close()
	return conn.(*proxytest.Conn).Remote
}

func TestDialFlowErrors(t *testing.T) {
	notReady := ep("n1", "10.1.0.1")
	notReady.Ready = false
	headless := &discovery.Service{Namespace: "default", Name: "hl", Headless: true,
		Ports: []discovery.ServicePort{{Protocol: discovery.TCP, Port: 80}}, Endpoints: []discovery.Endpoint{ep("n1", "10.1.0.1")}}
	sctp := &discovery.Service{Namespace: "default", Name: "sctp", IP: netip.MustParseAddr("9.251.0.11"),
		Ports: []discovery.ServicePort{{Protocol: discovery.SCTP, Port: 80}}, Endpoints: []discovery.Endpoint{ep("n1", "10.1.0.1")}}

	cases := []struct {
		name  string
		snap  *discovery.Snapshot
		proto discovery.Protocol
		dst   netip.AddrPort
		want  error
	}{
		{"nil snapshot", nil, discovery.TCP, httpDst, proxy.ErrNoService},
		{"unknown address", snapshot(service(ep("n1", "10.1.0.1"))), discovery.TCP, netip.MustParseAddrPort("9.251.0.99:80"), proxy.ErrNoService},
		{"unknown port", snapshot(service(ep("n1", "10.1.0.1"))), discovery.TCP, netip.AddrPortFrom(svcIP, 81), proxy.ErrNoService},
		{"wrong protocol", snapshot(service(ep("n1", "10.1.0.1"))), discovery.UDP, httpDst, proxy.ErrNoService},
		{"SCTP not proxied", snapshot(sctp), discovery.SCTP, netip.MustParseAddrPort("9.251.0.11:80"), proxy.ErrNoService},
		{"headless not proxied", snapshot(headless), discovery.TCP, httpDst, proxy.ErrNoService},
		{"no endpoints", snapshot(service()), discovery.TCP, httpDst, proxy.ErrNoEndpoints},
		{"no ready endpoints", snapshot(service(notReady)), discovery.TCP, httpDst, proxy.ErrNoEndpoints},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := &proxytest.Dialer{}
			p := proxy.New(proxy.Config{Dialer: d})
			p.Update(tc.snap)
			conn, err := p.DialFlow(context.Background(), tc.proto, client, tc.dst)
			if !errors.Is(err, tc.want) {
				t.Fatalf("DialFlow: got conn %v, err %v; want %v", conn, err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.dst.String()) && !strings.Contains(err.Error(), "default/") {
				t.Errorf("error %q does not say what was asked", err)
			}
			if got := d.Dials(); len(got) != 0 {
				t.Errorf("dialled %v, want no dial", got)
			}
			st := p.Stats()
			if st.NoService+st.NoEndpoints != 1 || st.OK != 0 {
				t.Errorf("stats %+v, want one refusal", st)
			}
		})
	}
}

func TestEligibility(t *testing.T) {
	terminating := ep("n1", "10.1.0.2")
	terminating.Terminating = true
	notReady := ep("n1", "10.1.0.3")
	notReady.Ready = false
	named := func(node, addr string, port uint16) discovery.Endpoint {
		e := ep(node, addr)
		e.Ports = []discovery.EndpointPort{{Name: "web", Protocol: discovery.TCP, Port: port}}
		return e
	}
	namedSvc := func(eps ...discovery.Endpoint) *discovery.Service {
		s := service(eps...)
		s.Ports[0].TargetPort = 0
		s.Ports[0].TargetPortName = "web"
		return s
	}
	v6svc := func(eps ...discovery.Endpoint) *discovery.Service {
		s := service(eps...)
		s.IP = svcIP6
		return s
	}

	cases := []struct {
		name string
		svc  *discovery.Service
		dst  netip.AddrPort
		want []string // endpoints reached, as a set
	}{
		{"ready only", service(ep("n1", "10.1.0.1"), terminating, notReady), httpDst,
			[]string{"10.1.0.1:8080"}},
		{"named target port per endpoint", namedSvc(named("n1", "10.1.0.1", 8081), named("n2", "10.1.0.2", 9090), ep("n3", "10.1.0.3")), httpDst,
			[]string{"10.1.0.1:8081", "10.1.0.2:9090"}},
		{"same family preferred", service(ep("n1", "fd00::1", "10.1.0.1"), ep("n2", "fd00::2")), httpDst,
			[]string{"10.1.0.1:8080", "[fd00::2]:8080"}},
		{"v6 service", v6svc(ep("n1", "10.1.0.1", "fd00::1")), netip.AddrPortFrom(svcIP6, 80),
			[]string{"[fd00::1]:8080"}},
		{"duplicate address once", service(ep("n1", "10.1.0.1"), ep("n1", "10.1.0.1"), ep("n2")), httpDst,
			[]string{"10.1.0.1:8080"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, _, _ := newProxy(t, proxy.Config{}, tc.svc)
			got := map[string]int{}
			for range 3 * len(tc.want) {
				got[dial(t, p, client, tc.dst).String()]++
			}
			if len(got) != len(tc.want) {
				t.Fatalf("reached %v, want exactly %v", got, tc.want)
			}
			for _, w := range tc.want {
				if got[w] != 3 {
					t.Errorf("reached %v, want 3 flows to each of %v", got, tc.want)
				}
			}
			if st := p.Services()[0].Ports[0]; st.Eligible != len(tc.want) {
				t.Errorf("Services: %d eligible, want %d", st.Eligible, len(tc.want))
			}
		})
	}
}

func TestServicesStatus(t *testing.T) {
	eps := []discovery.Endpoint{ep("n1", "10.1.0.1"), ep("n2", "10.1.0.2"), ep("n3", "10.1.0.3")}
	eps[2].Ready = false
	s := withPolicy(service(eps...), "source-hash")
	s.SessionAffinity = true
	headless := &discovery.Service{Namespace: "default", Name: "aaa", Headless: true}
	p, _, _ := newProxy(t, proxy.Config{}, headless, s)
	for range 4 {
		dial(t, p, client, httpDst)
	}

	got := p.Services()
	if len(got) != 1 {
		t.Fatalf("Services() = %+v, want only the web service", got)
	}
	st := got[0]
	if st.Namespace != "default" || st.Name != "web" || st.IP != svcIP || st.Policy != proxy.PolicySourceHash ||
		!st.SessionAffinity || st.AffinityTimeoutSeconds != 10800 || st.EndpointsReady != 2 || st.EndpointsTotal != 3 {
		t.Errorf("service status %+v", st)
	}
	if len(st.Ports) != 1 || st.Ports[0].Port != 80 || st.Ports[0].Eligible != 2 || st.Ports[0].AffinityClients != 1 {
		t.Errorf("port status %+v", st.Ports)
	}
	var flows uint64
	for _, e := range st.Endpoints {
		flows += e.Flows
	}
	if flows != 4 || len(st.Endpoints[2].Targets) != 0 || st.Endpoints[2].Ready {
		t.Errorf("endpoint status %+v: want 4 flows, endpoint 3 not ready", st.Endpoints)
	}

	b, err := json.Marshal(got)
	if err != nil {
		t.Fatalf("marshal: %v", err)
	}
	for _, key := range []string{`"namespace":"default"`, `"ip":"9.251.0.10"`, `"policy":"source-hash"`,
		`"endpointsReady":2`, `"endpointsTotal":3`, `"address":"10.1.0.1:8080"`, `"servicePort":80`, `"flows":`} {
		if !strings.Contains(string(b), key) {
			t.Errorf("JSON %s lacks %s", b, key)
		}
	}
	if strings.Contains(string(b), "ejectedUntil") {
		t.Errorf("JSON %s shows an ejection", b)
	}

	sb, err := json.Marshal(p.Stats())
	if err != nil {
		t.Fatalf("marshal stats: %v", err)
	}
	if want := `{"ok":4,"noService":0,"noEndpoints":0,"failed":0,"dialFailures":0,"retries":0}`; string(sb) != want {
		t.Errorf("stats JSON %s, want %s", sb, want)
	}
}

// TestUpdateRace swaps the table while flows run; run with -race.
func TestUpdateRace(t *testing.T) {
	a := service(ep("n1", "10.1.0.1"), ep("n2", "10.1.0.2"))
	b := withPolicy(service(ep("n2", "10.1.0.2"), ep("n3", "10.1.0.3"), ep("n4", "10.1.0.4")), "source-hash")
	b.SessionAffinity = true
	p, _, _ := newProxy(t, proxy.Config{}, a)

	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := range 4 {
		wg.Go(func() {
			// At least 100 flows each, and on until the updates are done.
			for i := 0; i < 100 || !stop.Load(); i++ {
				src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(g), byte(i)}), uint16(i))
				conn, err := p.DialFlow(context.Background(), discovery.TCP, src, httpDst)
				if err != nil {
					errs <- err
					return
				}
				conn.Close()
				_ = p.Services()
			}
		})
	}
	for i := range 200 {
		if i%2 == 0 {
			p.Update(snapshot(b))
		} else {
			p.Update(snapshot(a))
		}
	}
	stop.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("flow during Update: %v", err)
	}
	if st := p.Stats(); st.OK < 400 {
		t.Errorf("stats %+v, want at least 400 flows", st)
	}
}
