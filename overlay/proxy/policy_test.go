package proxy_test

import (
	"bytes"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/proxy"
	"github.com/edgewire/edgewire/overlay/proxy/proxytest"
)

var (
	e0 = netip.MustParseAddrPort("10.1.0.1:8080")
	e1 = netip.MustParseAddrPort("10.1.0.2:8080")
	e2 = netip.MustParseAddrPort("10.1.0.3:8080")
)

func threeEndpoints() []discovery.Endpoint {
	return []discovery.Endpoint{ep("n1", "10.1.0.1"), ep("n2", "10.1.0.2"), ep("n3", "10.1.0.3")}
}

// seededRand is a deterministic, concurrency-safe Config.Rand.
func seededRand(seed uint64) func(int) int {
	var mu sync.Mutex
	r := rand.New(rand.NewPCG(seed, seed))
	return func(n int) int {
		mu.Lock()
		defer mu.Unlock()
		return r.IntN(n)
	}
}

// clientN returns a distinct client address:port for i.
func clientN(i int, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 2, byte(i >> 8), byte(i)}), port)
}

func TestPolicySpread(t *testing.T) {
	cases := []struct {
		name     string
		policy   string
		rand     func(int) int
		sameIP   bool // all flows from one client IP (different ports)
		min, max int  // flows each endpoint must get out of 300
	}{
		{"round-robin default", "", nil, true, 100, 100},
		{"round-robin named", "round-robin", nil, true, 100, 100},
		{"unknown policy is round-robin", "least-conn", nil, true, 100, 100},
		{"random spreads", "random", seededRand(1), true, 70, 130},
		{"source-hash spreads client IPs", "source-hash", nil, false, 60, 140},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, _, _ := newProxy(t, proxy.Config{Rand: tc.rand}, withPolicy(service(threeEndpoints()...), tc.policy))
			got := map[netip.AddrPort]int{}
			for i := range 300 {
				src := clientN(i, uint16(30000+i))
				if tc.sameIP {
					src = netip.AddrPortFrom(client.Addr(), uint16(30000+i))
				}
				got[dial(t, p, src, httpDst)]++
			}
			for _, e := range []netip.AddrPort{e0, e1, e2} {
				if got[e] < tc.min || got[e] > tc.max {
					t.Errorf("flows per endpoint %v, want %d..%d each", got, tc.min, tc.max)
					break
				}
			}
		})
	}
}

func TestRandomUsesRand(t *testing.T) {
	last := func(n int) int { return n - 1 }
	p, _, _ := newProxy(t, proxy.Config{Rand: last}, withPolicy(service(threeEndpoints()...), "random"))
	for i := range 10 {
		if got := dial(t, p, clientN(i, 1000), httpDst); got != e2 {
			t.Fatalf("flow %d reached %s, want %s (Rand always picks the last)", i, got, e2)
		}
	}
}

func TestSourceHash(t *testing.T) {
	four := append(threeEndpoints(), ep("n4", "10.1.0.4"))
	p, _, _ := newProxy(t, proxy.Config{}, withPolicy(service(four...), "source-hash"))

	const clients = 400
	before := make([]netip.AddrPort, clients)
	for i := range clients {
		before[i] = dial(t, p, clientN(i, 40000), httpDst)
	}

	t.Run("source port does not matter", func(t *testing.T) {
		for i := range 50 {
			for port := range uint16(5) {
				if got := dial(t, p, clientN(i, 50000+port), httpDst); got != before[i] {
					t.Fatalf("client %d port %d reached %s, first flow reached %s", i, 50000+port, got, before[i])
				}
			}
		}
	})
	t.Run("same on another node", func(t *testing.T) {
		other, _, _ := newProxy(t, proxy.Config{}, withPolicy(service(four...), "source-hash"))
		for i := range clients {
			if got := dial(t, other, clientN(i, 1), httpDst); got != before[i] {
				t.Fatalf("client %d reached %s on a second proxy, %s on the first", i, got, before[i])
			}
		}
	})
	t.Run("removing an endpoint moves only its clients", func(t *testing.T) {
		removed := four[1] // 10.1.0.2
		rest := []discovery.Endpoint{four[0], four[2], four[3]}
		p.Update(snapshot(withPolicy(service(rest...), "source-hash")))
		moved := 0
		for i := range clients {
			got := dial(t, p, clientN(i, 40000), httpDst)
			switch {
			case before[i].Addr() == removed.Addresses[0]:
				moved++
				if got == before[i] {
					t.Fatalf("client %d still reaches the removed endpoint", i)
				}
			case got != before[i]:
				t.Fatalf("client %d moved from %s to %s, though its endpoint stayed", i, before[i], got)
			}
		}
		if moved < clients/8 {
			t.Errorf("only %d of %d clients were on the removed endpoint: hash does not spread", moved, clients)
		}
	})
}

func TestSessionAffinity(t *testing.T) {
	s := service(threeEndpoints()...)
	s.SessionAffinity = true
	s.AffinityTimeout = 10 * time.Second
	p, d, clk := newProxy(t, proxy.Config{}, s)
	a := netip.AddrPortFrom(client.Addr(), 1)
	other := netip.MustParseAddrPort("10.0.0.2:1")

	// The round-robin counter advances on every flow, sticky or not: flow k (from 0) starts at
	// endpoint k mod n of the current table.
	steps := []struct {
		name    string
		advance time.Duration
		update  *discovery.Service // applied before the flow when set
		refuse  netip.AddrPort     // made to refuse during the flow when valid
		src     netip.AddrPort
		want    netip.AddrPort
	}{
		{name: "first flow picks by round robin", src: a, want: e0},
		{name: "other client takes the next", src: other, want: e1},
		{name: "sticks although round robin moved", src: a, want: e0},
		{name: "sticks within timeout", advance: 9 * time.Second, src: a, want: e0},
		{name: "timeout counts from the last flow", advance: 9 * time.Second, src: a, want: e0},
		{name: "survives Update with endpoint present", update: reversed(s), src: a, want: e0}, // table e2 e1 e0
		{name: "re-picks after timeout", advance: 11 * time.Second, src: a, want: e2},          // flow 6: e2
		{name: "moves to the endpoint that answered", refuse: e2, src: a, want: e1},            // e2 refuses, then flow 7's e1
		{name: "follows the new endpoint", advance: 2 * time.Second, src: a, want: e1},         // e2's ejection is over
		{name: "endpoint removed re-picks", update: without(s, 1), src: a, want: e2},           // table e0 e2, flow 9: e2
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			clk.Advance(st.advance)
			if st.update != nil {
				p.Update(snapshot(st.update))
			}
			if st.refuse.IsValid() {
				d.Set(st.refuse, proxytest.Refuse)
				defer d.Set(st.refuse, proxytest.Answer)
			}
			if got := dial(t, p, st.src, httpDst); got != st.want {
				t.Fatalf("reached %s, want %s", got, st.want)
			}
		})
	}
}

// reversed returns a copy of s with its endpoints in reverse order.
func reversed(s *discovery.Service) *discovery.Service {
	c := *s
	c.Endpoints = nil
	for i := len(s.Endpoints) - 1; i >= 0; i-- {
		c.Endpoints = append(c.Endpoints, s.Endpoints[i])
	}
	return &c
}

// without returns a copy of s without endpoint i.
func without(s *discovery.Service, i int) *discovery.Service {
	c := *s
	c.Endpoints = append(append([]discovery.Endpoint(nil), s.Endpoints[:i]...), s.Endpoints[i+1:]...)
	return &c
}

// syncBuffer is an io.Writer safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) count(s string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Count(b.b.String(), s)
}

func TestUnknownPolicyLoggedOncePerUpdate(t *testing.T) {
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	s := withPolicy(service(threeEndpoints()...), "least-conn")
	p, _, _ := newProxy(t, proxy.Config{Logger: log}, s)
	const msg = "unknown load-balancing policy"
	for round := 1; round <= 3; round++ {
		for i := range 20 {
			dial(t, p, clientN(i, 1), httpDst)
		}
		if n := logs.count(msg); n != round {
			t.Fatalf("after %d updates and %d flows: %d warnings, want %d\n%s", round, 20*round, n, round, logs.b.String())
		}
		p.Update(snapshot(s))
	}
	if got := p.Services()[0].Policy; got != proxy.PolicyRoundRobin {
		t.Errorf("policy shown as %q, want round-robin", got)
	}
}

func TestTopologyPreferenceLocal(t *testing.T) {
	local := func(s *discovery.Service) *discovery.Service {
		if s.Annotations == nil {
			s.Annotations = map[string]string{}
		}
		s.Annotations[discovery.AnnotationTopologyPreference] = "local"
		return s
	}
	cases := []struct {
		name      string
		localNode string
		svc       *discovery.Service
		refuse    []netip.AddrPort
		want      map[netip.AddrPort]int // flows out of 300
	}{
		{
			name: "two local endpoints share all flows", localNode: "n1",
			svc:  local(service(ep("n1", "10.1.0.1"), ep("n1", "10.1.0.2"), ep("n3", "10.1.0.3"))),
			want: map[netip.AddrPort]int{e0: 150, e1: 150},
		},
		{
			name: "no local endpoint: all endpoints", localNode: "n9",
			svc:  local(service(threeEndpoints()...)),
			want: map[netip.AddrPort]int{e0: 100, e1: 100, e2: 100},
		},
		{
			name: "without the annotation: all endpoints", localNode: "n1",
			svc:  service(threeEndpoints()...),
			want: map[netip.AddrPort]int{e0: 100, e1: 100, e2: 100},
		},
		{
			name: "local endpoint down: falls over to the others", localNode: "n1",
			svc:    local(service(threeEndpoints()...)),
			refuse: []netip.AddrPort{e0},
			want:   map[netip.AddrPort]int{e1: 150, e2: 150},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, d, _ := newProxy(t, proxy.Config{LocalNode: tc.localNode}, tc.svc)
			for _, a := range tc.refuse {
				d.Set(a, proxytest.Refuse)
			}
			got := map[netip.AddrPort]int{}
			for i := range 300 {
				got[dial(t, p, netip.AddrPortFrom(client.Addr(), uint16(30000+i)), httpDst)]++
			}
			for a, n := range tc.want {
				if d := got[a] - n; d < -2 || d > 2 {
					t.Errorf("flows %v, want %v", got, tc.want)
					break
				}
			}
			if len(got) != len(tc.want) {
				t.Errorf("flows went to %v, want only %v", got, tc.want)
			}
		})
	}
}
