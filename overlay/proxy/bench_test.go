package proxy_test

import (
	"context"
	"fmt"
	"net/netip"
	"testing"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/proxy"
	"github.com/edgewire/edgewire/overlay/proxy/proxytest"
)

// BenchmarkDialFlowPick measures DialFlow's lookup and pick path over a fake dialer that answers at
// once without recording. Run with -benchmem.
func BenchmarkDialFlowPick(b *testing.B) {
	for _, bc := range []struct {
		policy    string
		affinity  bool
		endpoints int
	}{
		{"round-robin", false, 3},
		{"round-robin", false, 64},
		{"random", false, 3},
		{"source-hash", false, 3},
		{"source-hash", false, 64},
		{"round-robin", true, 3},
	} {
		name := fmt.Sprintf("%s/endpoints=%d/affinity=%v", bc.policy, bc.endpoints, bc.affinity)
		b.Run(name, func(b *testing.B) {
			var eps []discovery.Endpoint
			for i := range bc.endpoints {
				eps = append(eps, ep("n", netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}).String()))
			}
			s := withPolicy(service(eps...), bc.policy)
			s.SessionAffinity = bc.affinity
			d := &proxytest.Dialer{}
			d.DontRecord()
			p := proxy.New(proxy.Config{Dialer: d})
			p.Update(snapshot(s))
			ctx := context.Background()
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				i := 0
				for pb.Next() {
					i++
					src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 2, byte(i >> 8), byte(i)}), uint16(i))
					if _, err := p.DialFlow(ctx, discovery.TCP, src, httpDst); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}
