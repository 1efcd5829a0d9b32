package path

import (
	"errors"
	"net/netip"
	"testing"
	"time"
)

func TestOnLinkCache(t *testing.T) {
	calls := 0
	c := onLinkCache{interfaces: func() ([]InterfacePrefix, error) {
		calls++
		if calls == 3 {
			return nil, errors.New("netlink busy")
		}
		return []InterfacePrefix{
			{"eth0", netip.MustParsePrefix("192.168.1.11/24")},
			{"eth0", netip.MustParsePrefix("fd00::11/64")},
			{"docker0", netip.MustParsePrefix("172.17.0.1/16")},
		}, nil
	}}
	ap := netip.MustParseAddrPort
	t0 := time.Unix(1000, 0)
	tests := []struct {
		name  string
		at    time.Duration
		addrs []netip.AddrPort
		want  bool
		calls int
	}{
		{"none", 0, nil, false, 0},
		{"on-link IPv4", 0, []netip.AddrPort{ap("10.0.0.5:51820"), ap("192.168.1.7:51820")}, true, 1},
		{"behind a NAT", time.Second, []netip.AddrPort{ap("192.168.2.7:51820")}, false, 1},
		{"IPv6 on-link, cached", 2 * time.Second, []netip.AddrPort{ap("[fd00::9]:51820")}, true, 1},
		{"IPv4-mapped", 3 * time.Second, []netip.AddrPort{ap("[::ffff:192.168.1.9]:51820")}, true, 1},
		{"this node's own docker0 address on every host", 3 * time.Second, []netip.AddrPort{ap("172.17.0.1:51820"), ap("192.168.2.7:51820")}, false, 1},
		{"another address on docker0's subnet", 3 * time.Second, []netip.AddrPort{ap("172.17.0.2:51820")}, true, 1},
		{"refreshed", onLinkRefresh, []netip.AddrPort{ap("192.168.1.8:51820")}, true, 2},
		{"refresh error keeps the last list", 2 * onLinkRefresh, []netip.AddrPort{ap("192.168.1.8:51820")}, true, 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := c.any(t0.Add(tc.at), tc.addrs); got != tc.want {
				t.Errorf("any = %v, want %v", got, tc.want)
			}
			if calls != tc.calls {
				t.Errorf("interfaces read %d times, want %d", calls, tc.calls)
			}
		})
	}
}
