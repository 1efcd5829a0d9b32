package forward

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"

	"go.uber.org/goleak"

	"github.com/edgewire/edgewire/discovery"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestHeaderRoundTrip(t *testing.T) {
	tests := []struct {
		name    string
		h       Header
		wantLen int
	}{
		{"tcp v4", Header{discovery.TCP, netip.MustParseAddrPort("10.1.2.3:8080")}, HeaderLen4},
		{"udp v4", Header{discovery.UDP, netip.MustParseAddrPort("192.168.0.1:53")}, HeaderLen4},
		{"tcp v6", Header{discovery.TCP, netip.MustParseAddrPort("[fd00:1::2]:443")}, HeaderLen6},
		{"udp v6", Header{discovery.UDP, netip.MustParseAddrPort("[2001:db8::1]:65535")}, HeaderLen6},
		{"tcp v4 port 1", Header{discovery.TCP, netip.MustParseAddrPort("127.0.0.1:1")}, HeaderLen4},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.h.Validate(); err != nil {
				t.Fatalf("Validate: %v", err)
			}
			prefix := []byte("prefix")
			b := MarshalHeader(append([]byte(nil), prefix...), tc.h)
			if !bytes.HasPrefix(b, prefix) {
				t.Fatalf("MarshalHeader did not append: % x", b)
			}
			b = b[len(prefix):]
			if len(b) != tc.wantLen {
				t.Fatalf("marshalled %d bytes, want %d", len(b), tc.wantLen)
			}
			payload := []byte("payload after the header")
			got, n, err := ParseHeader(append(b, payload...))
			if err != nil {
				t.Fatalf("ParseHeader: %v", err)
			}
			if n != tc.wantLen || got != tc.h {
				t.Fatalf("ParseHeader = %+v, %d; want %+v, %d", got, n, tc.h, tc.wantLen)
			}
		})
	}
}

func TestHeaderWireLayout(t *testing.T) {
	b := MarshalHeader(nil, Header{discovery.UDP, netip.MustParseAddrPort("10.0.0.1:258")})
	want := []byte{'E', 'W', 1, 17, 4, 0, 0x01, 0x02, 10, 0, 0, 1}
	if !bytes.Equal(b, want) {
		t.Fatalf("wire form % x, want % x", b, want)
	}
	// An IPv4-mapped target is sent as IPv4.
	b = MarshalHeader(nil, Header{discovery.TCP, netip.MustParseAddrPort("[::ffff:10.0.0.1]:258")})
	want = []byte{'E', 'W', 1, 6, 4, 0, 0x01, 0x02, 10, 0, 0, 1}
	if !bytes.Equal(b, want) {
		t.Fatalf("mapped target: wire form % x, want % x", b, want)
	}
}

func TestParseHeaderRejects(t *testing.T) {
	good4 := MarshalHeader(nil, Header{discovery.TCP, netip.MustParseAddrPort("10.0.0.1:80")})
	good6 := MarshalHeader(nil, Header{discovery.UDP, netip.MustParseAddrPort("[fd00::1]:53")})
	with := func(b []byte, i int, v byte) []byte {
		b = append([]byte(nil), b...)
		b[i] = v
		return b
	}
	tests := []struct {
		name string
		b    []byte
		want error
	}{
		{"empty", nil, ErrMalformed},
		{"short 2 bytes", good4[:2], ErrMalformed},
		{"short fixed part", good4[:7], ErrMalformed},
		{"bad magic", with(good4, 0, 'X'), ErrMalformed},
		{"bad magic second byte", with(good4, 1, 'w'), ErrMalformed},
		{"version 0", with(good4, 2, 0), ErrUnsupportedVersion},
		{"version 2", with(good4, 2, 2), ErrUnsupportedVersion},
		{"version 2 short", []byte{'E', 'W', 2}, ErrUnsupportedVersion},
		{"proto 0", with(good4, 3, 0), ErrMalformed},
		{"proto sctp", with(good4, 3, 132), ErrMalformed},
		{"family 0", with(good4, 4, 0), ErrMalformed},
		{"family 5", with(good4, 4, 5), ErrMalformed},
		{"flags set", with(good4, 5, 1), ErrMalformed},
		{"truncated v4 address", good4[:HeaderLen4-1], ErrMalformed},
		{"truncated v6 address", good6[:HeaderLen6-1], ErrMalformed},
		{"v6 family with v4 length", good6[:HeaderLen4], ErrMalformed},
		{"port 0", with(with(good4, 6, 0), 7, 0), ErrMalformed},
		{"unspecified v4", MarshalHeader(nil, Header{discovery.TCP, netip.MustParseAddrPort("0.0.0.0:80")}), ErrMalformed},
		{"unspecified v6", MarshalHeader(nil, Header{discovery.TCP, netip.MustParseAddrPort("[::]:80")}), ErrMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h, n, err := ParseHeader(tc.b)
			if !errors.Is(err, tc.want) {
				t.Fatalf("ParseHeader(% x) = %+v, %d, %v; want error %v", tc.b, h, n, err, tc.want)
			}
			if n != 0 || h != (Header{}) {
				t.Fatalf("ParseHeader returned %+v, %d with its error", h, n)
			}
		})
	}
}

func TestParseHeaderMappedTarget(t *testing.T) {
	// A peer may spell an IPv4 target as IPv4-mapped IPv6; Allow must see the IPv4 address.
	b := []byte{'E', 'W', 1, 6, 6, 0, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1}
	h, n, err := ParseHeader(b)
	if err != nil || n != HeaderLen6 {
		t.Fatalf("ParseHeader = %+v, %d, %v", h, n, err)
	}
	if want := netip.MustParseAddrPort("10.0.0.1:80"); h.Target != want {
		t.Fatalf("target %v, want %v", h.Target, want)
	}
}

func TestHeaderValidate(t *testing.T) {
	tests := []struct {
		name string
		h    Header
	}{
		{"sctp", Header{discovery.SCTP, netip.MustParseAddrPort("10.0.0.1:80")}},
		{"empty protocol", Header{"", netip.MustParseAddrPort("10.0.0.1:80")}},
		{"no address", Header{discovery.TCP, netip.AddrPort{}}},
		{"unspecified", Header{discovery.TCP, netip.MustParseAddrPort("0.0.0.0:80")}},
		{"port 0", Header{discovery.UDP, netip.MustParseAddrPort("10.0.0.1:0")}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.h.Validate(); !errors.Is(err, ErrMalformed) {
				t.Fatalf("Validate = %v, want ErrMalformed", err)
			}
			// What MarshalHeader writes for an invalid header never parses.
			if h, _, err := ParseHeader(MarshalHeader(nil, tc.h)); err == nil {
				t.Fatalf("invalid header %+v parsed as %+v", tc.h, h)
			}
		})
	}
}

func TestStatusErrors(t *testing.T) {
	tests := []struct {
		name string
		st   Status
		want error
	}{
		{"ok", StatusOK, nil},
		{"not allowed", StatusNotAllowed, ErrRefused},
		{"dial failed", StatusDialFailed, ErrDialFailed},
		{"bad request", StatusBadRequest, ErrBadRequest},
		{"unsupported version", StatusUnsupportedVersion, ErrUnsupportedVersion},
		{"unknown", 200, ErrProtocol},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.st.err(); !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Fatalf("status %d: err %v, want %v", tc.st, err, tc.want)
			}
		})
	}
}
