package e2e

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestLab checks the harness itself: namespaces on a LAN bridge reach each other's testservers,
// a routed hop forwards, a masquerading router rewrites sources, and teardown removes everything.
func TestLab(t *testing.T) {
	start := time.Now()
	rootBefore := rootLinks(t)
	var namespaces []string
	t.Run("build", func(t *testing.T) {
		lab := NewLab(t)
		lan := lab.LAN(t, "lan", netip.MustParsePrefix("10.77.1.0/24"))
		a, b := lab.Node(t, "a"), lab.Node(t, "b")
		lan.Attach(t, a, netip.MustParseAddr("10.77.1.1"))
		lan.Attach(t, b, netip.MustParseAddr("10.77.1.2"))

		// b reaches c (10.77.2.0/24) through router r, which masquerades towards c.
		r, c := lab.Router(t, "r"), lab.Node(t, "c")
		lan.Attach(t, r, netip.MustParseAddr("10.77.1.254"))
		rOut, _ := lab.Link(t, r, netip.MustParsePrefix("10.77.2.1/24"), c, netip.MustParsePrefix("10.77.2.2/24"))
		r.Masquerade(t, rOut, false)
		b.AddRoute(t, netip.MustParsePrefix("10.77.2.0/24"), netip.MustParseAddr("10.77.1.254"))
		b.SetResolvConf(t, netip.MustParseAddr("10.77.1.1"))
		namespaces = []string{lan.Switch.NS, a.NS, b.NS, r.NS, c.NS}

		srv := a.Start(t, "http", bins.Testserver, "http", "--listen", ":8080", "--name", "a1")
		srv.WaitLog(t, "listening on", 5*time.Second)
		echo := c.Start(t, "udpecho", bins.Testserver, "udpecho", "--listen", ":9000", "--name", "c1")
		echo.WaitLog(t, "listening on", 5*time.Second)
		cHTTP := c.Start(t, "http", bins.Testserver, "http", "--listen", ":8080", "--name", "c1")
		cHTTP.WaitLog(t, "listening on", 5*time.Second)

		tests := []struct {
			name string
			args []string
			want string
		}{
			{"bridge http", []string{"curl", "-sS", "-m", "5", "-D", "-", "http://10.77.1.1:8080/"}, "X-Backend: a1"},
			{"bridge big body", []string{"curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{size_download}", "http://10.77.1.1:8080/big?n=1000000"}, "1000000"},
			{"routed udp echo", []string{bins.Testserver, "udpclient", "--server", "10.77.2.2:9000", "--msg", "m%d", "--count", "3", "--burst"}, "c1:m0\nc1:m1\nc1:m2\n"},
			// c has no route back to 10.77.1.0/24: b reaches c only if r rewrites b's address.
			{"masqueraded source", []string{"curl", "-sS", "-m", "5", "http://10.77.2.2:8080/"}, "c1\n"},
			{"resolv.conf mounted", []string{"cat", "/etc/resolv.conf"}, "nameserver 10.77.1.1"},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				out := b.MustExec(t, tc.args...)
				if !strings.Contains(out, tc.want) {
					t.Errorf("%s: output %q does not contain %q", strings.Join(tc.args, " "), out, tc.want)
				}
			})
		}
		t.Run("root namespace untouched", func(t *testing.T) {
			if after := rootLinks(t); after != rootBefore {
				t.Errorf("root namespace interfaces changed:\nbefore:\n%s\nafter:\n%s", rootBefore, after)
			}
		})
		t.Run("capture", func(t *testing.T) {
			capture := a.Capture(t, "eth0", "tcp", "port", "8080")
			b.MustExec(t, "curl", "-sS", "-m", "5", "http://10.77.1.1:8080/")
			if err := capture.Stop(5 * time.Second); err != nil {
				t.Fatalf("tcpdump: %v\n%s", err, capture.Tail(5))
			}
			// tcpdump reports on exit how many packets it captured.
			if log := capture.Log(); !strings.Contains(log, "packets captured") || strings.Contains(log, " 0 packets captured") {
				t.Errorf("tcpdump captured nothing:\n%s", log)
			}
		})
		t.Run("sigterm stops testserver", func(t *testing.T) {
			if err := srv.Stop(5 * time.Second); err != nil {
				t.Fatalf("testserver did not exit cleanly on SIGTERM: %v\n%s", err, srv.Tail(10))
			}
		})
	})
	// The build subtest's cleanup has run: nothing of it may remain.
	for _, ns := range namespaces {
		if _, err := os.Stat(filepath.Join("/run/netns", ns)); err == nil {
			t.Errorf("namespace %s still exists after teardown", ns)
		}
		if _, err := os.Stat(filepath.Join("/etc/netns", ns)); err == nil {
			t.Errorf("/etc/netns/%s still exists after teardown", ns)
		}
	}
	t.Logf("lab built, checked and torn down in %v", time.Since(start).Round(time.Millisecond))
}

// rootLinks lists the names of the root namespace's interfaces.
func rootLinks(t testing.TB) string {
	t.Helper()
	out, err := run("ip", "-o", "link", "show")
	if err != nil {
		t.Fatalf("ip link show: %v\n%s", err, out)
	}
	var names []string
	for line := range strings.Lines(out) {
		if f := strings.Fields(line); len(f) > 1 {
			names = append(names, f[1])
		}
	}
	return strings.Join(names, " ")
}
