package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"testing"
)

func (s *singleNode) testDNS(t *testing.T) {
	// answers returns the non-empty lines of `dig +short`.
	answers := func(out string) []string {
		var a []string
		for line := range strings.Lines(out) {
			if line = strings.TrimSpace(line); line != "" {
				a = append(a, line)
			}
		}
		return a
	}
	exactly := func(want ...string) func(t *testing.T, out string) {
		return func(t *testing.T, out string) {
			got := answers(out)
			slices.Sort(got)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Errorf("answers %q, want %q", got, want)
			}
		}
	}
	nxdomain := func(t *testing.T, out string) {
		if !strings.Contains(out, "status: NXDOMAIN") {
			t.Errorf("status is not NXDOMAIN:\n%s", out)
		}
		if !strings.Contains(out, "AUTHORITY SECTION") || !strings.Contains(out, "\tSOA\t") {
			t.Errorf("no SOA record in the authority section:\n%s", out)
		}
	}
	// dig and short return fresh argument slices (no aliasing between table rows).
	dig := func(args ...string) []string {
		return append([]string{"dig", "@" + dnsIP, "+time=2", "+tries=2"}, args...)
	}
	short := func(args ...string) []string { return dig(append([]string{"+short"}, args...)...) }
	tests := []struct {
		name  string
		args  []string
		check func(t *testing.T, out string)
	}{
		{"A", short("web.default.svc.cluster.local", "A"), exactly(webIP)},
		{"A over TCP", short("+tcp", "web.default.svc.cluster.local", "A"), exactly(webIP)},
		{"A through resolv.conf", []string{"dig", "+short", "+time=2", "web.default.svc.cluster.local"}, exactly(webIP)},
		{"A case-insensitive", short("WEB.Default.SVC.cluster.local", "A"), exactly(webIP)},
		{"SRV named port", short("_http._tcp.web.default.svc.cluster.local", "SRV"), func(t *testing.T, out string) {
			got := answers(out)
			if len(got) != 1 {
				t.Fatalf("want one SRV record, got %q", got)
			}
			// priority weight port target
			f := strings.Fields(got[0])
			if len(f) != 4 || f[2] != "80" || f[3] != "web.default.svc.cluster.local." {
				t.Errorf("SRV %q, want port 80 and target web.default.svc.cluster.local.", got[0])
			}
		}},
		{"PTR", short("-x", webIP), exactly("web.default.svc.cluster.local.")},
		{"NXDOMAIN", dig("nope.default.svc.cluster.local", "A"), nxdomain},
		{"NXDOMAIN over TCP", dig("+tcp", "nope.default.svc.cluster.local", "A"), nxdomain},
		{"headless: ready endpoints", short("headless.default.svc.cluster.local", "A"),
			exactly("10.77.1.11", "10.77.1.12")},
		{"derived service IP", short("derived.default.svc.cluster.local", "A"), func(t *testing.T, out string) {
			got := answers(out)
			if len(got) != 1 {
				t.Fatalf("want one A record, got %q", got)
			}
			ip, err := netip.ParseAddr(got[0])
			if err != nil || !netip.MustParsePrefix(serviceCIDR).Contains(ip) {
				t.Errorf("derived service IP %q is not in %s", got[0], serviceCIDR)
			}
			for _, fixed := range []string{webIP, hashIP, stickyIP, echoIP, fragileIP, shrinkIP} {
				if got[0] == fixed {
					t.Errorf("derived service IP %s collides with a clusterIP of the file", got[0])
				}
			}
			t.Logf("derived.default gets %s", got[0])
		}},
		{"AAAA of an IPv4 service: NODATA", dig("web.default.svc.cluster.local", "AAAA"), func(t *testing.T, out string) {
			if !strings.Contains(out, "status: NOERROR") || !strings.Contains(out, "ANSWER: 0,") {
				t.Errorf("want NOERROR with no answer:\n%s", out)
			}
		}},
		{"large answer truncated over UDP", dig("+noedns", "+ignore", "bighead.default.svc.cluster.local", "A"), func(t *testing.T, out string) {
			if !regexp.MustCompile(`flags:[a-z ]* tc[ ;]`).MatchString(out) {
				t.Errorf("a %d-address answer over UDP without EDNS0 is not truncated (no tc flag):\n%s", bigHeadless, lastLines(out, 30))
			}
		}},
		{"large answer complete after TCP fallback", short("bighead.default.svc.cluster.local", "A"), func(t *testing.T, out string) {
			if got := answers(out); len(got) != bigHeadless {
				t.Errorf("%d addresses, want %d", len(got), bigHeadless)
			}
		}},
		{"upstream name forwarded", short(upstreamName, "A"), exactly(upstreamAddr)},
		{"upstream name forwarded over TCP", short("+tcp", upstreamName, "A"), exactly(upstreamAddr)},
		{"upstream NXDOMAIN forwarded", dig("missing.example.test", "A"), func(t *testing.T, out string) {
			if !strings.Contains(out, "status: NXDOMAIN") {
				t.Errorf("status is not NXDOMAIN:\n%s", out)
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, err := s.client.Exec(tc.args...)
			if err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			tc.check(t, out)
			if t.Failed() {
				t.Logf("command: %s", strings.Join(tc.args, " "))
			}
		})
	}
}

func (s *singleNode) testMeshctl(t *testing.T) {
	t.Run("status", func(t *testing.T) {
		var st Status
		s.agent.CtlJSON(t, &st, "status")
		want := Status{Node: "client", ServiceCIDR: serviceCIDR, DNSIP: dnsIP, ClusterDomain: "cluster.local", TUN: "mesh0"}
		got := st
		got.Services, got.Endpoints, got.Uptime = 0, 0, 0
		if got != want {
			t.Errorf("status %+v, want %+v (and counts)", st, want)
		}
		if st.Services != len(s.specs) {
			t.Errorf("status counts %d services, the file has %d", st.Services, len(s.specs))
		}
		if st.Endpoints < 3 {
			t.Errorf("status counts %d endpoints", st.Endpoints)
		}
		if st.Uptime <= 0 {
			t.Errorf("uptime %v", st.Uptime)
		}
		out, err := s.agent.Ctl("status")
		if err != nil || !strings.Contains(out, "client") {
			t.Errorf("meshctl status (text): %v\n%s", err, out)
		}
	})

	t.Run("services", func(t *testing.T) {
		rows := s.agent.Services(t)
		if len(rows) != len(s.specs) {
			t.Errorf("%d services listed, the file has %d: %v", len(rows), len(s.specs), rows)
		}
		tests := []struct {
			key          string
			ip           string
			ready, total int
			proto        string
			port         int
		}{
			{"default/web", webIP, 3, 3, "TCP", 80},
			{"default/echo", echoIP, 3, 3, "UDP", 9000},
			{"default/headless", "", 2, 3, "TCP", 80},
		}
		for _, tc := range tests {
			r, ok := rows[tc.key]
			if !ok {
				t.Errorf("%s not listed", tc.key)
				continue
			}
			if r.IP != tc.ip || r.Ready != tc.ready || r.Total != tc.total {
				t.Errorf("%s: ip %q ready %d/%d, want ip %q ready %d/%d", tc.key, r.IP, r.Ready, r.Total, tc.ip, tc.ready, tc.total)
			}
			if len(r.Ports) != 1 || r.Ports[0].Protocol != tc.proto || r.Ports[0].Port != tc.port {
				t.Errorf("%s: ports %+v, want %s/%d", tc.key, r.Ports, tc.proto, tc.port)
			}
		}
		if r := rows["default/derived"]; !netip.MustParsePrefix(serviceCIDR).Contains(netip.MustParseAddr(orZero(r.IP))) {
			t.Errorf("default/derived: ip %q not in %s", r.IP, serviceCIDR)
		}
		out, err := s.agent.Ctl("services")
		if err != nil || !strings.Contains(out, "web") || !strings.Contains(out, webIP) {
			t.Errorf("meshctl services (text): %v\n%s", err, out)
		}
	})

	t.Run("resolve", func(t *testing.T) {
		tests := []struct {
			name string
			args []string
			want string
		}{
			{"service", []string{"resolve", "web.default.svc.cluster.local"}, webIP},
			{"SRV", []string{"resolve", "_http._tcp.web.default.svc.cluster.local", "--type", "SRV"}, "web.default.svc.cluster.local"},
			{"upstream", []string{"resolve", upstreamName}, upstreamAddr},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				out, err := s.agent.Ctl(tc.args...)
				if err != nil || !strings.Contains(out, tc.want) {
					t.Errorf("meshctl %s: %v, want %q in\n%s", strings.Join(tc.args, " "), err, tc.want, out)
				}
				var res struct {
					Rcode  string   `json:"rcode"`
					Answer []string `json:"answer"`
				}
				s.agent.CtlJSON(t, &res, tc.args...)
				if res.Rcode != "NOERROR" || !strings.Contains(strings.Join(res.Answer, "\n"), tc.want) {
					t.Errorf("meshctl %s --json: %+v, want NOERROR with %q", strings.Join(tc.args, " "), res, tc.want)
				}
			})
		}
		t.Run("NXDOMAIN", func(t *testing.T) {
			var res struct {
				Rcode string `json:"rcode"`
			}
			out, _ := s.agent.Ctl("resolve", "nope.default.svc.cluster.local", "--json")
			if err := jsonUnmarshal(out, &res); err != nil || res.Rcode != "NXDOMAIN" {
				t.Errorf("meshctl resolve nope...: rcode %q (%v), want NXDOMAIN\n%s", res.Rcode, err, out)
			}
		})
	})
}

func orZero(ip string) string {
	if ip == "" {
		return "0.0.0.0"
	}
	return ip
}

func jsonUnmarshal(s string, v any) error {
	if err := json.Unmarshal([]byte(s), v); err != nil {
		return fmt.Errorf("decode %q: %w", shorten(s), err)
	}
	return nil
}
