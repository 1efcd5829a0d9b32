package tun

import (
	"bytes"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/edgewire/edgewire/overlay/tun/tuntest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// splitterRig is a Splitter over a fake kernel with three routed fake devices.
type splitterRig struct {
	sp                    *Splitter
	kernel, svc, dns, ovl *tuntest.ChannelTUN
}

func newSplitterRig(t *testing.T) *splitterRig {
	t.Helper()
	r := &splitterRig{
		kernel: tuntest.NewChannelTUN("kernel", 8, 64),
		svc:    tuntest.NewChannelTUN("svc", 4, 64),
		dns:    tuntest.NewChannelTUN("dns", 4, 64),
		ovl:    tuntest.NewChannelTUN("overlay", 4, 64),
	}
	r.sp = NewSplitter(nil, r.kernel)
	r.sp.Route(netip.MustParsePrefix("9.251.0.0/16"), r.svc)
	r.sp.Route(netip.MustParsePrefix("fd00:9251::/64"), r.svc)
	r.sp.Route(netip.MustParsePrefix("9.251.7.0/24"), r.dns) // longer prefix inside the service range
	r.sp.Route(netip.MustParsePrefix("fd7a::/48"), r.ovl)
	if err := r.sp.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		// The documented order: close the devices, then the Splitter.
		for _, d := range []*tuntest.ChannelTUN{r.kernel, r.svc, r.dns, r.ovl} {
			d.Close()
		}
		if err := r.sp.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := r.sp.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	})
	return r
}

func udp(src, dst string, payload string) []byte {
	return tuntest.UDPPacket(netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst), []byte(payload))
}

func recv(t *testing.T, ch chan []byte, what string) []byte {
	t.Helper()
	select {
	case p := <-ch:
		return p
	case <-time.After(5 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		return nil
	}
}

func TestSplitterRoutes(t *testing.T) {
	r := newSplitterRig(t)
	for _, tc := range []struct {
		name string
		pkt  []byte
		want *tuntest.ChannelTUN
	}{
		{"ipv4 service", udp("10.0.0.1:1000", "9.251.0.10:80", "a"), r.svc},
		{"ipv4 longest prefix", udp("10.0.0.1:1000", "9.251.7.1:53", "b"), r.dns},
		{"ipv6 service", udp("[fd00::1]:1000", "[fd00:9251::10]:80", "c"), r.svc},
		{"ipv6 overlay", udp("[fd00::1]:1000", "[fd7a::2]:51820", "d"), r.ovl},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r.kernel.Inbound <- tc.pkt
			got := recv(t, tc.want.Outbound, tc.name)
			if !bytes.Equal(got, tc.pkt) {
				t.Fatalf("device got %x, want %x", got, tc.pkt)
			}
		})
	}
	st := r.sp.Stats()
	want := []uint64{1, 1, 1, 1}
	for i, rs := range st.Routes {
		if rs.Packets != want[i] {
			t.Errorf("route %v: %d packets, want %d", rs.Prefix, rs.Packets, want[i])
		}
	}
	for _, d := range []*tuntest.ChannelTUN{r.svc, r.dns, r.ovl} {
		if n := len(d.Outbound); n != 0 {
			name, _ := d.Name()
			t.Errorf("%s got %d extra packets", name, n)
		}
	}
}

// TestSplitterBatch sends a batch mixing destinations; each device gets its share in order.
func TestSplitterBatch(t *testing.T) {
	r := newSplitterRig(t)
	var svcWant, ovlWant [][]byte
	for i := range 40 {
		if i%3 == 0 {
			p := udp("[fd00::1]:1", "[fd7a::9]:2", string(rune('a'+i%26)))
			ovlWant = append(ovlWant, p)
			r.kernel.Inbound <- p
		} else {
			p := udp("10.0.0.1:1", "9.251.1.1:2", string(rune('a'+i%26)))
			svcWant = append(svcWant, p)
			r.kernel.Inbound <- p
		}
	}
	for i, want := range svcWant {
		if got := recv(t, r.svc.Outbound, "service packet"); !bytes.Equal(got, want) {
			t.Fatalf("service packet %d = %x, want %x", i, got, want)
		}
	}
	for i, want := range ovlWant {
		if got := recv(t, r.ovl.Outbound, "overlay packet"); !bytes.Equal(got, want) {
			t.Fatalf("overlay packet %d = %x, want %x", i, got, want)
		}
	}
}

func TestSplitterDevicesToKernel(t *testing.T) {
	r := newSplitterRig(t)
	for _, tc := range []struct {
		name string
		dev  *tuntest.ChannelTUN
		pkt  []byte
	}{
		{"service reply", r.svc, udp("9.251.0.10:80", "10.0.0.1:1000", "reply")},
		{"dns reply", r.dns, udp("9.251.7.1:53", "10.0.0.1:1000", "answer")},
		{"overlay packet", r.ovl, udp("[fd7a::2]:1", "[fd7a::1]:2", "decrypted")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.dev.Inbound <- tc.pkt
			if got := recv(t, r.kernel.Outbound, "kernel packet"); !bytes.Equal(got, tc.pkt) {
				t.Fatalf("kernel got %x, want %x", got, tc.pkt)
			}
		})
	}
	waitFor(t, "ToKernel == 3", func() bool { return r.sp.Stats().ToKernel == 3 })
}

func TestSplitterDrops(t *testing.T) {
	r := newSplitterRig(t)
	for _, tc := range []struct {
		name               string
		pkt                []byte
		noRoute, malformed uint64
	}{
		{"empty", []byte{}, 0, 1},
		{"ipv4 truncated", udp("10.0.0.1:1", "9.251.0.1:2", "x")[:12], 0, 1},
		{"ipv6 truncated", udp("[fd00::1]:1", "[fd00:9251::1]:2", "x")[:39], 0, 1},
		{"unknown version", []byte{0x70, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20}, 0, 1},
		{"ipv4 no route", udp("10.0.0.1:1", "8.8.8.8:53", "x"), 1, 0},
		{"ipv6 no route", udp("[fd00::1]:1", "[2001:db8::1]:53", "x"), 1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := r.sp.Stats()
			r.kernel.Inbound <- tc.pkt
			waitFor(t, "the drop to be counted", func() bool {
				st := r.sp.Stats()
				return st.DroppedNoRoute-before.DroppedNoRoute == tc.noRoute &&
					st.DroppedMalformed-before.DroppedMalformed == tc.malformed
			})
		})
	}
	// A routed packet still gets through after the drops, and nothing dropped reached a device.
	p := udp("10.0.0.1:1", "9.251.0.1:2", "after")
	r.kernel.Inbound <- p
	if got := recv(t, r.svc.Outbound, "routed packet"); !bytes.Equal(got, p) {
		t.Fatalf("service device got %x, want %x", got, p)
	}
	for _, d := range []*tuntest.ChannelTUN{r.svc, r.dns, r.ovl} {
		if n := len(d.Outbound); n != 0 {
			name, _ := d.Name()
			t.Errorf("%s got %d dropped packets", name, n)
		}
	}
}

func TestSplitterLifecycle(t *testing.T) {
	kernel := tuntest.NewChannelTUN("kernel", 1, 0)
	sp := NewSplitter(nil, kernel)
	if err := sp.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	if err := sp.Start(); err == nil {
		t.Error("second Start succeeded")
	}
	kernel.Close()
	if err := sp.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := sp.Start(); err == nil {
		t.Error("Start after Close succeeded")
	}

	// Close without Start returns at once.
	sp2 := NewSplitter(nil, kernel)
	if err := sp2.Close(); err != nil {
		t.Fatalf("Close before Start: %v", err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
