package dns

import (
	"net/netip"
	"testing"
)

func TestAdmitDatagram(t *testing.T) {
	tests := []struct {
		name      string
		rate      int
		wantFirst int // datagrams a flooding source gets through at once
	}{
		{name: "burst of one second", rate: 100, wantFirst: 100},
		{name: "limit off", rate: -1, wantFirst: 1000},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestServer(t, Config{SourceRate: tc.rate})
			flood, other := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
			admitted := 0
			for range 1000 {
				if s.AdmitDatagram(flood) {
					admitted++
				}
			}
			// The refill during the loop is at most a few datagrams at this rate.
			if admitted < tc.wantFirst || admitted > tc.wantFirst+5 {
				t.Errorf("a flooding source got %d of 1000 datagrams through, want %d", admitted, tc.wantFirst)
			}
			if !s.AdmitDatagram(other) {
				t.Error("another source was refused while one floods")
			}
			if got, want := s.Stats().Policed, uint64(1000-admitted); got != want {
				t.Errorf("Policed = %d, want %d", got, want)
			}
		})
	}
}
