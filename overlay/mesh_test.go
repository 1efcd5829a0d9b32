package overlay

import (
	"log/slog"
	"net/netip"
	"testing"

	"go.uber.org/goleak"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/identity"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestBuildDirectory(t *testing.T) {
	k1, err := identity.NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	k2, _ := identity.NewPrivateKey()
	pub1, pub2 := k1.PublicKey(), k2.PublicKey()
	ap := netip.MustParseAddrPort
	snap := &discovery.Snapshot{
		Nodes: []*discovery.Node{
			{Name: "self", WireGuardKey: pub1.String(), Endpoints: []netip.AddrPort{ap("10.0.0.1:51820")}},
			{Name: "peer", WireGuardKey: pub2.String(), Endpoints: []netip.AddrPort{ap("10.0.0.2:51820"), ap("203.0.113.2:51820")}},
			{Name: "no-key"},
			{Name: "bad-key", WireGuardKey: "not-a-key"},
		},
		Services: []*discovery.Service{{
			Namespace: "default", Name: "web",
			Ports: []discovery.ServicePort{{Name: "http", Protocol: discovery.TCP, Port: 80, TargetPort: 8080}},
			Endpoints: []discovery.Endpoint{
				{Addresses: []netip.Addr{netip.MustParseAddr("10.244.1.5")}, NodeName: "self", Ready: true},
				{Addresses: []netip.Addr{netip.MustParseAddr("10.244.2.5")}, NodeName: "peer", Ready: true},
			},
		}},
	}
	dir := buildDirectory(snap, "self", identity.DefaultOverlayPrefix, discardLogger())
	wantOverlay, _ := identity.OverlayAddr(identity.DefaultOverlayPrefix, pub2)

	tests := []struct {
		name string
		ok   bool
	}{
		{"self is not a peer", dir.byName["self"] == nil},
		{"peer is a peer", dir.byName["peer"] != nil},
		{"node without key is not a peer", dir.byName["no-key"] == nil},
		{"node with a bad key is not a peer", dir.byName["bad-key"] == nil},
		{"peer's overlay address derives from its key", dir.byName["peer"] != nil && dir.byName["peer"].overlay == wantOverlay},
		{"peer keeps its LAN addresses in order", dir.byName["peer"] != nil && len(dir.byName["peer"].lan) == 2 && dir.byName["peer"].lan[0] == ap("10.0.0.2:51820")},
		{"local endpoint target allowed", hasLocal(dir, discovery.TCP, "10.244.1.5:8080")},
		{"remote endpoint target not allowed", !hasLocal(dir, discovery.TCP, "10.244.2.5:8080")},
		{"wrong protocol not allowed", !hasLocal(dir, discovery.UDP, "10.244.1.5:8080")},
		{"wrong port not allowed", !hasLocal(dir, discovery.TCP, "10.244.1.5:22")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if !tc.ok {
				t.Fail()
			}
		})
	}
}

func hasLocal(d *directory, proto discovery.Protocol, ap string) bool {
	_, ok := d.local[localTarget{proto, netip.MustParseAddrPort(ap)}]
	return ok
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
