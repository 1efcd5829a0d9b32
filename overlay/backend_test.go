package overlay

import (
	"reflect"
	"testing"

	"github.com/edgewire/edgewire/dns"
	"github.com/edgewire/edgewire/overlay/control"
	"github.com/edgewire/edgewire/overlay/forward"
	"github.com/edgewire/edgewire/overlay/netstack"
)

// TestLimitsMapping checks that each counter and cap of the netstack, the forward listener and
// the DNS server lands in its own field of control.LimitStats. The sources carry a distinct value
// in every field, those that are not limits included, so a swapped or wrong field shows.
func TestLimitsMapping(t *testing.T) {
	tests := []struct {
		name string
		got  any
		want any
	}{
		{
			name: "netstack flows",
			got: flowLimits(netstack.Stats{
				TCP: netstack.FlowStats{Opened: 1, Active: 2, Refused: 3, BytesUp: 4, BytesDown: 5, DroppedDatagrams: 6,
					CapClient: 7, CapTotal: 8, Evicted: 9, QueueDrops: 10, Held: 11, Max: 12, MaxPerClient: 13},
				UDP: netstack.FlowStats{Opened: 21, Active: 22, Refused: 23, BytesUp: 24, BytesDown: 25, DroppedDatagrams: 26,
					CapClient: 27, CapTotal: 28, Evicted: 29, QueueDrops: 30, Held: 31, Max: 32, MaxPerClient: 33},
				PacketsIn: 41, PacketsOut: 42, DroppedMalformed: 43, DroppedNotServed: 44, DroppedOutbound: 45,
			}),
			want: control.FlowLimits{
				TCP: control.FlowCap{Held: 11, Max: 12, MaxPerClient: 13, RefusedPerClient: 7, RefusedTotal: 8, Evicted: 9, QueueDrops: 10},
				UDP: control.FlowCap{Held: 31, Max: 32, MaxPerClient: 33, RefusedPerClient: 27, RefusedTotal: 28, Evicted: 29, QueueDrops: 30},
			},
		},
		{
			name: "forward listener",
			got: forwardLimits(forward.Stats{
				TCPAccepted: 1, UDPAccepted: 2, Refused: 3, BadHeader: 4, Unused: 5, DialFailures: 6, UDPDropped: 7,
				ActiveTCP: 8, ActiveUDP: 9, BytesIn: 10, BytesOut: 11,
				TCPBusyPeer: 12, TCPBusyTotal: 13, UDPCapPeer: 14, UDPCapTotal: 15, UDPEvicted: 16, TCPConns: 17,
				MaxTCPFlows: 18, MaxTCPFlowsPerPeer: 19, MaxUDPFlows: 20, MaxUDPFlowsPerPeer: 21,
			}),
			want: control.ForwardLimits{
				TCPHeld: 17, MaxTCP: 18, MaxTCPPerPeer: 19, TCPBusyPerPeer: 12, TCPBusyTotal: 13,
				UDPHeld: 9, MaxUDP: 20, MaxUDPPerPeer: 21, UDPCapPerPeer: 14, UDPCapTotal: 15, UDPEvicted: 16,
			},
		},
		{
			name: "dns",
			got: dnsLimits(dns.Stats{
				Queries: 1, Cluster: 2, NXDomain: 3, Forwarded: 4, CacheHits: 5, FormErr: 6, NotImp: 7, ServFail: 8, Refused: 9,
				Dropped: 10, RateLimited: 11, QueueFull: 12, Expired: 13, ReplyDropped: 14, ForwardRefused: 15,
				Coalesced: 16, Untracked: 17, TCPRefused: 18, ReadErrors: 19, Policed: 20,
			}),
			want: control.DNSLimits{
				RateLimited: 11, Untracked: 17, QueueFull: 12, Expired: 13, ForwardRefused: 15, Coalesced: 16,
				TCPRefused: 18, ReplyDropped: 14, Dropped: 10, ReadErrors: 19, Policed: 20,
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.got != tc.want {
				t.Errorf("got  %+v\nwant %+v", tc.got, tc.want)
			}
		})
	}
}

// TestLimitsMappingComplete fills every field of the sources with a distinct value and checks
// that every field of control.LimitStats receives one of its own: a field added to LimitStats
// and never filled in, or two fields filled from one counter, fails here.
func TestLimitsMappingComplete(t *testing.T) {
	var next uint64
	var ns netstack.Stats
	var fs forward.Stats
	var ds dns.Stats
	for _, p := range []any{&ns, &fs, &ds} {
		fillDistinct(t, reflect.ValueOf(p).Elem(), &next)
	}
	got := control.LimitStats{Flows: flowLimits(ns), Forward: forwardLimits(fs), DNS: dnsLimits(ds)}
	seen := map[uint64]string{}
	var walk func(v reflect.Value, path string)
	walk = func(v reflect.Value, path string) {
		switch v.Kind() {
		case reflect.Struct:
			for i := range v.NumField() {
				walk(v.Field(i), path+"."+v.Type().Field(i).Name)
			}
		case reflect.Uint64:
			n := v.Uint()
			if n == 0 {
				t.Errorf("%s is never filled in", path)
				return
			}
			if other, dup := seen[n]; dup {
				t.Errorf("%s and %s come from the same counter", path, other)
			}
			seen[n] = path
		default:
			t.Errorf("%s: unexpected kind %s", path, v.Kind())
		}
	}
	walk(reflect.ValueOf(got), "LimitStats")
	if len(seen) == 0 {
		t.Fatal("no field walked")
	}
}

// fillDistinct sets every integer field of v, recursively, to the next value of *next.
func fillDistinct(t *testing.T, v reflect.Value, next *uint64) {
	t.Helper()
	switch v.Kind() {
	case reflect.Struct:
		for i := range v.NumField() {
			fillDistinct(t, v.Field(i), next)
		}
	case reflect.Uint64, reflect.Uint32, reflect.Uint:
		*next++
		v.SetUint(*next)
	case reflect.Int64, reflect.Int32, reflect.Int:
		*next++
		v.SetInt(int64(*next))
	default:
		t.Fatalf("cannot fill a %s", v.Kind())
	}
}
