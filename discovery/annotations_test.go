package discovery

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestParseWireGuardKey(t *testing.T) {
	tests := []struct {
		name, in string
		ok       bool
	}{
		{"valid", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", true},
		{"too short", "AAAA", false},
		{"not base64", "!AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", false},
		{"non-canonical padding bits", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB=", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			raw, ok := ParseWireGuardKey(tc.in)
			if ok != tc.ok || ok && len(raw) != wireGuardKeySize {
				t.Errorf("ParseWireGuardKey(%q) = %d bytes, %v; want ok=%v", tc.in, len(raw), ok, tc.ok)
			}
		})
	}
}

func TestParseEndpoints(t *testing.T) {
	ap := netip.MustParseAddrPort
	tests := []struct {
		name, in string
		want     []netip.AddrPort
		err      string
	}{
		{name: "empty", in: "  "},
		{name: "order kept, spaces ignored", in: "10.0.0.5:51820, [fd00::5]:51820",
			want: []netip.AddrPort{ap("10.0.0.5:51820"), ap("[fd00::5]:51820")}},
		{name: "mapped address unmapped", in: "[::ffff:10.0.0.5]:1", want: []netip.AddrPort{ap("10.0.0.5:1")}},
		{name: "empty entry", in: "10.0.0.5:1,,10.0.0.6:1", err: "empty entry"},
		{name: "no port", in: "10.0.0.5", err: "not ip:port"},
		{name: "port 0", in: "10.0.0.5:0", err: "port must be"},
		{name: "zone", in: "[fe80::1%eth0]:1", err: "zone"},
		{name: "unspecified", in: "0.0.0.0:1", err: "unicast"},
		{name: "duplicate", in: "10.0.0.5:1,10.0.0.5:1", err: "twice"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseEndpoints(tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Errorf("ParseEndpoints(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
			}
		})
	}
}
