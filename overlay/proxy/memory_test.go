package proxy_test

import (
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"testing"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/proxy"
	"github.com/edgewire/edgewire/overlay/proxy/proxytest"
)

// scaleSnapshot returns services services with two TCP ports and perService ready endpoints each,
// every endpoint at an address of its own, as the scale benchmark's catalogs (e2e/bench_scale_test.go).
func scaleSnapshot(services, perService int) *discovery.Snapshot {
	s := &discovery.Snapshot{Services: make([]*discovery.Service, 0, services)}
	ports := []discovery.EndpointPort{{Name: "http", Protocol: discovery.TCP, Port: 8080}, {Name: "grpc", Protocol: discovery.TCP, Port: 9090}}
	n := 0
	for i := range services {
		svc := &discovery.Service{
			Namespace: fmt.Sprintf("team-%02d", i%50),
			Name:      fmt.Sprintf("svc-%05d", i),
			IP:        netip.AddrFrom4([4]byte{9, 251, byte(i >> 8), byte(i)}),
			Ports: []discovery.ServicePort{
				{Name: "http", Protocol: discovery.TCP, Port: 80, TargetPort: 8080},
				{Name: "grpc", Protocol: discovery.TCP, Port: 9090, TargetPort: 9090},
			},
			Endpoints: make([]discovery.Endpoint, perService),
		}
		for j := range svc.Endpoints {
			n++
			svc.Endpoints[j] = discovery.Endpoint{
				Addresses: []netip.Addr{netip.AddrFrom4([4]byte{10, byte(128 + n>>16), byte(n >> 8), byte(n)})},
				NodeName:  fmt.Sprintf("edge-%02d", n%10),
				Ready:     true,
				Serving:   true,
				Ports:     ports,
			}
		}
		s.Services = append(s.Services, svc)
	}
	return s
}

// heapAlloc returns the bytes of live heap objects after a full collection.
func heapAlloc() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// BenchmarkUpdateScale measures Update over catalogs of the scale benchmark's sizes (two ports, ten
// endpoints a service) and reports the heap the table keeps between Updates, per target (endpoint ×
// port) and in all. Every Update after the first carries state over from the table before it.
func BenchmarkUpdateScale(b *testing.B) {
	for _, services := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("services=%d", services), func(b *testing.B) {
			snap := scaleSnapshot(services, 10)
			targets := services * 10 * 2
			p := proxy.New(proxy.Config{})
			before := heapAlloc()
			for b.Loop() {
				p.Update(snap)
			}
			b.StopTimer()
			kept := float64(heapAlloc()) - float64(before)
			b.ReportMetric(kept/float64(targets), "heapB/target")
			b.ReportMetric(kept/1e6, "heapMB")
			runtime.KeepAlive(p)
		})
	}
}

// TestUpdateCarriesState checks what an Update takes over from the table before it, for ports
// whose targets are searched by scanning (few endpoints) and through a map (many): flow counters
// of the targets still there, the failures of an endpoint still there and of one that moved to
// another service, and one target per address:port when endpoints repeat one.
func TestUpdateCarriesState(t *testing.T) {
	for _, tc := range []struct {
		name      string
		endpoints int
	}{
		{"few endpoints", 3},
		{"many endpoints", 40},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var eps []discovery.Endpoint
			for i := range tc.endpoints {
				eps = append(eps, ep("n", fmt.Sprintf("10.1.0.%d", i+1)))
			}
			failing := netip.MustParseAddrPort("10.1.0.1:8080")
			p, d, _ := newProxy(t, proxy.Config{}, service(eps...))
			d.Set(failing, proxytest.Refuse)
			for range 2 * tc.endpoints {
				dial(t, p, client, httpDst)
			}
			before := flowsByTarget(p, "web")
			if target(t, p, failing).Failures != 1 {
				t.Fatalf("status %+v, want one failure", target(t, p, failing))
			}

			// Reversed, the last endpoint gone, a new one and a repeat of the second added.
			next := slices.Clone(eps[:len(eps)-1])
			slices.Reverse(next)
			added := ep("n", "10.1.1.1")
			next = append(next, added, eps[1])
			p.Update(snapshot(service(next...)))
			after := flowsByTarget(p, "web")
			if len(after) != len(eps) {
				t.Errorf("%d targets after Update, want %d (one per address:port): %v", len(after), len(eps), after)
			}
			for addr, n := range after {
				want, ok := before[addr]
				if addr == netip.AddrPortFrom(added.Addresses[0], 8080) {
					want, ok = 0, true
				}
				if !ok || n != want {
					t.Errorf("target %s: %d flows after Update, want %d", addr, n, want)
				}
			}
			if ts := target(t, p, failing); ts.Failures != 1 {
				t.Errorf("status %+v after Update, want the failure kept", ts)
			}

			// The failing endpoint moves to another service.
			other := service(eps[0])
			other.Name, other.IP = "other", netip.MustParseAddr("9.251.0.11")
			p.Update(snapshot(service(eps[1:]...), other))
			for _, st := range p.Services() {
				for _, e := range st.Endpoints {
					for _, ts := range e.Targets {
						if ts.Address == failing && (st.Name != "other" || ts.Failures != 1) {
							t.Errorf("%s target %+v, want it in other with its failure", st.Name, ts)
						}
					}
				}
			}
		})
	}
}

// flowsByTarget returns the flow counters of service name's targets.
func flowsByTarget(p *proxy.Proxy, name string) map[netip.AddrPort]uint64 {
	m := map[netip.AddrPort]uint64{}
	for _, st := range p.Services() {
		if st.Name != name {
			continue
		}
		for _, e := range st.Endpoints {
			for _, ts := range e.Targets {
				m[ts.Address] += ts.Flows
			}
		}
	}
	return m
}
