package discovery

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// svcSpec describes a test service compactly: "ns/name", plus an optional ClusterIP and kind.
type svcSpec struct {
	key          string
	clusterIP    string
	headless     bool
	externalName string
}

func buildSnapshot(t *testing.T, specs []svcSpec) *Snapshot {
	t.Helper()
	s := &Snapshot{}
	for _, sp := range specs {
		ns, name, ok := strings.Cut(sp.key, "/")
		if !ok {
			t.Fatalf("bad key %q", sp.key)
		}
		svc := &Service{Namespace: ns, Name: name, Headless: sp.headless, ExternalName: sp.externalName}
		if sp.clusterIP != "" {
			svc.ClusterIP = netip.MustParseAddr(sp.clusterIP)
		}
		s.Services = append(s.Services, svc)
	}
	return s
}

func ipsByKey(s *Snapshot) map[string]netip.Addr {
	m := make(map[string]netip.Addr, len(s.Services))
	for _, svc := range s.Services {
		m[svc.Key()] = svc.IP
	}
	return m
}

// checkInvariants verifies what must hold after any successful AssignIPs.
func checkInvariants(t *testing.T, s *Snapshot, prefix netip.Prefix, reserved []netip.Addr) {
	t.Helper()
	r := newIPRange(prefix.Masked())
	seen := map[netip.Addr]string{}
	for _, svc := range s.Services {
		if svc.Headless || svc.ExternalName != "" {
			if svc.IP.IsValid() {
				t.Errorf("%s: headless/ExternalName service got IP %v", svc.Key(), svc.IP)
			}
			continue
		}
		if !r.usable(svc.IP) {
			t.Errorf("%s: IP %v is not a usable address of %v", svc.Key(), svc.IP, prefix)
		}
		for _, a := range reserved {
			if svc.IP == a {
				t.Errorf("%s: got reserved address %v", svc.Key(), a)
			}
		}
		if other, dup := seen[svc.IP]; dup {
			t.Errorf("%s and %s share IP %v", other, svc.Key(), svc.IP)
		}
		seen[svc.IP] = svc.Key()
	}
}

func TestAssignIPs(t *testing.T) {
	const derived = "derived" // want: some usable address other than the ClusterIP
	tests := []struct {
		name     string
		prefix   string
		reserved []string
		services []svcSpec
		want     map[string]string // key → IP, "" for none, derived for any derived address
		wantErr  string
	}{
		{
			name:     "ClusterIP in range kept",
			prefix:   "9.251.0.0/16",
			services: []svcSpec{{key: "default/web", clusterIP: "9.251.3.4"}},
			want:     map[string]string{"default/web": "9.251.3.4"},
		},
		{
			name:     "ClusterIP out of range derived",
			prefix:   "9.251.0.0/16",
			services: []svcSpec{{key: "default/web", clusterIP: "10.96.0.10"}},
			want:     map[string]string{"default/web": derived},
		},
		{
			name:     "no ClusterIP derived",
			prefix:   "9.251.0.0/16",
			services: []svcSpec{{key: "default/web"}},
			want:     map[string]string{"default/web": derived},
		},
		{
			name:   "duplicate ClusterIP first by namespace/name keeps it",
			prefix: "9.251.0.0/16",
			services: []svcSpec{
				{key: "b/web", clusterIP: "9.251.0.7"},
				{key: "a/web", clusterIP: "9.251.0.7"},
				{key: "a/api", clusterIP: "9.251.0.8"},
			},
			want: map[string]string{"a/web": "9.251.0.7", "b/web": derived, "a/api": "9.251.0.8"},
		},
		{
			name:   "headless and ExternalName get none",
			prefix: "9.251.0.0/16",
			services: []svcSpec{
				{key: "default/db", headless: true},
				{key: "default/ext", externalName: "example.com", clusterIP: "9.251.0.9"},
				{key: "default/web", clusterIP: "9.251.0.9"},
			},
			want: map[string]string{"default/db": "", "default/ext": "", "default/web": "9.251.0.9"},
		},
		{
			name:     "ClusterIP on reserved address derived",
			prefix:   "9.251.0.0/16",
			reserved: []string{"9.251.0.10"},
			services: []svcSpec{{key: "kube-system/dns", clusterIP: "9.251.0.10"}},
			want:     map[string]string{"kube-system/dns": derived},
		},
		{
			name:     "network and broadcast ClusterIPs derived",
			prefix:   "9.251.0.0/16",
			services: []svcSpec{{key: "a/net", clusterIP: "9.251.0.0"}, {key: "a/bcast", clusterIP: "9.251.255.255"}},
			want:     map[string]string{"a/net": derived, "a/bcast": derived},
		},
		{
			name:     "reserved skipped when deriving",
			prefix:   "10.0.0.0/29", // usable .1-.6
			reserved: []string{"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"},
			services: []svcSpec{{key: "a/x"}, {key: "a/y"}},
			want:     map[string]string{"a/x": derived, "a/y": derived},
		},
		{
			name:     "every usable address of a small prefix",
			prefix:   "10.0.0.0/28",
			services: seqSpecs(14),
		},
		{
			name:     "full prefix",
			prefix:   "10.0.0.0/30", // usable .1 and .2
			services: []svcSpec{{key: "a/x"}, {key: "a/y"}, {key: "a/z"}},
			wantErr:  "prefix 10.0.0.0/30 is full",
		},
		{
			name:     "full prefix with reserved and kept addresses",
			prefix:   "10.0.0.0/30",
			reserved: []string{"10.0.0.1"},
			services: []svcSpec{{key: "a/x", clusterIP: "10.0.0.2"}, {key: "a/y"}},
			wantErr:  "is full",
		},
		{
			name:     "single-address prefix is full",
			prefix:   "10.0.0.1/32",
			services: []svcSpec{{key: "a/x"}},
			wantErr:  "is full",
		},
		{
			name:   "IPv6 prefix",
			prefix: "fd00:9251::/64",
			services: []svcSpec{
				{key: "default/web", clusterIP: "fd00:9251::80"},
				{key: "default/api", clusterIP: "10.96.0.1"},
				{key: "default/v4"},
			},
			want: map[string]string{"default/web": "fd00:9251::80", "default/api": derived, "default/v4": derived},
		},
		{
			name:     "unmasked prefix",
			prefix:   "9.251.7.7/16",
			services: []svcSpec{{key: "default/web", clusterIP: "9.251.3.4"}},
			want:     map[string]string{"default/web": "9.251.3.4"},
		},
		{
			name:     "invalid prefix",
			services: []svcSpec{{key: "default/web"}},
			wantErr:  "invalid prefix",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var prefix netip.Prefix
			if tc.prefix != "" {
				prefix = netip.MustParsePrefix(tc.prefix)
			}
			var reserved []netip.Addr
			for _, r := range tc.reserved {
				reserved = append(reserved, netip.MustParseAddr(r))
			}
			s := buildSnapshot(t, tc.services)
			err := AssignIPs(s, prefix, reserved...)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("AssignIPs() error = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("AssignIPs(): %v", err)
			}
			checkInvariants(t, s, prefix, reserved)
			got := ipsByKey(s)
			for key, want := range tc.want {
				ip := got[key]
				switch want {
				case "":
					if ip.IsValid() {
						t.Errorf("%s: IP = %v, want none", key, ip)
					}
				case derived:
					if !ip.IsValid() || ip == s.Services[indexOf(t, s, key)].ClusterIP {
						t.Errorf("%s: IP = %v, want a derived address", key, ip)
					}
				default:
					if ip != netip.MustParseAddr(want) {
						t.Errorf("%s: IP = %v, want %v", key, ip, want)
					}
				}
			}
		})
	}
}

func seqSpecs(n int) []svcSpec {
	specs := make([]svcSpec, n)
	for i := range specs {
		specs[i] = svcSpec{key: fmt.Sprintf("ns/svc-%d", i)}
	}
	return specs
}

func indexOf(t *testing.T, s *Snapshot, key string) int {
	t.Helper()
	for i, svc := range s.Services {
		if svc.Key() == key {
			return i
		}
	}
	t.Fatalf("no service %s", key)
	return -1
}

// TestAssignIPsDeterministic checks that the result depends only on the catalog, not on the order
// of the services, and does not change between runs (it is what every node computes).
func TestAssignIPsDeterministic(t *testing.T) {
	tests := []struct {
		name   string
		prefix string
		n      int
	}{
		{name: "large IPv4 prefix", prefix: "9.251.0.0/16", n: 500},
		{name: "crowded IPv4 prefix", prefix: "10.1.0.0/24", n: 250},
		{name: "IPv6 prefix", prefix: "fd00:1::/112", n: 500},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			prefix := netip.MustParsePrefix(tc.prefix)
			specs := seqSpecs(tc.n)
			// A few services with colliding ClusterIPs inside the prefix.
			ip := prefix.Addr().Next()
			for i := 0; i < tc.n; i += 10 {
				specs[i].clusterIP = ip.String()
				if i%20 == 0 {
					ip = ip.Next()
				}
			}
			first := buildSnapshot(t, specs)
			if err := AssignIPs(first, prefix); err != nil {
				t.Fatalf("AssignIPs(): %v", err)
			}
			checkInvariants(t, first, prefix, nil)
			want := ipsByKey(first)

			rng := rand.New(rand.NewPCG(1, 2))
			for round := range 5 {
				shuffled := buildSnapshot(t, specs)
				rng.Shuffle(len(shuffled.Services), func(i, j int) {
					shuffled.Services[i], shuffled.Services[j] = shuffled.Services[j], shuffled.Services[i]
				})
				if err := AssignIPs(shuffled, prefix); err != nil {
					t.Fatalf("round %d: AssignIPs(): %v", round, err)
				}
				for key, ip := range ipsByKey(shuffled) {
					if ip != want[key] {
						t.Fatalf("round %d: %s: IP = %v, want %v as in the first run", round, key, ip, want[key])
					}
				}
			}
		})
	}
}

// TestAssignIPsStable pins the derivation scheme: changing it would move every derived service IP
// of every deployed mesh, so it must be a deliberate change of this test too.
func TestAssignIPsStable(t *testing.T) {
	s := buildSnapshot(t, []svcSpec{{key: "default/web"}})
	if err := AssignIPs(s, netip.MustParsePrefix("9.251.0.0/16")); err != nil {
		t.Fatalf("AssignIPs(): %v", err)
	}
	// sha256("default/web#0") = c4 0e 0b 4a …: the host bits of a /16 are bytes 2 and 3.
	want := netip.MustParseAddr("9.251.11.74")
	if got := s.Services[0].IP; got != want {
		t.Errorf("default/web: IP = %v, want %v", got, want)
	}
}

func TestAssignIPsFast(t *testing.T) {
	const n = 10000
	s := buildSnapshot(t, seqSpecs(n))
	for i, svc := range s.Services {
		if i%2 == 0 {
			svc.ClusterIP = netip.AddrFrom4([4]byte{9, 251, byte(i >> 8), byte(i)})
		}
	}
	prefix := netip.MustParsePrefix("9.251.0.0/16")
	start := time.Now()
	if err := AssignIPs(s, prefix); err != nil {
		t.Fatalf("AssignIPs(): %v", err)
	}
	// The target is well under 100 ms; the bound is loose so that -race and loaded CI pass.
	if d := time.Since(start); d > time.Second {
		t.Errorf("AssignIPs of %d services took %v", n, d)
	}
	checkInvariants(t, s, prefix, nil)
}

func BenchmarkAssignIPs(b *testing.B) {
	prefix := netip.MustParsePrefix("9.251.0.0/16")
	s := &Snapshot{}
	for i := range 10000 {
		s.Services = append(s.Services, &Service{Namespace: "ns", Name: fmt.Sprintf("svc-%d", i)})
	}
	for b.Loop() {
		if err := AssignIPs(s, prefix); err != nil {
			b.Fatal(err)
		}
	}
}

func TestAssignIPsBadInput(t *testing.T) {
	prefix := netip.MustParsePrefix("9.251.0.0/16")
	tests := []struct {
		name    string
		snap    *Snapshot
		wantErr string
	}{
		{name: "nil snapshot", snap: nil, wantErr: "nil snapshot"},
		{name: "nil service", snap: &Snapshot{Services: []*Service{nil}}, wantErr: "service 0 is nil"},
		{name: "empty snapshot", snap: &Snapshot{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := AssignIPs(tc.snap, prefix)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("AssignIPs(): %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("AssignIPs() error = %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}
