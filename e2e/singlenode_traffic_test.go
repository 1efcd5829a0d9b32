package e2e

import (
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func (s *singleNode) testHTTP(t *testing.T) {
	t.Run("by name", func(t *testing.T) {
		// Through the client's resolv.conf (the agent's DNS) and the service netstack.
		out := s.client.MustExec(t, "curl", "-sS", "-m", "5", "-D", "-", "http://web.default.svc.cluster.local/")
		if !strings.Contains(out, "X-Backend: b") {
			t.Errorf("curl by name: no X-Backend header in\n%s", out)
		}
	})

	t.Run("round robin", func(t *testing.T) {
		const n, backends = 300, 3
		start := time.Now()
		results := s.curlMany(t, "http://web.default.svc.cluster.local/", n)
		took := time.Since(start)
		counts, failed := countBackends(results)
		if len(failed) > 0 {
			t.Errorf("%d of %d requests failed: %v", len(failed), n, failed)
		}
		want := n / backends
		lo, hi := want*95/100, want*105/100
		for _, b := range []string{"b1", "b2", "b3"} {
			if c := counts[b]; c < lo || c > hi {
				t.Errorf("backend %s answered %d of %d requests, want %d..%d (all: %v)", b, c, n, lo, hi, counts)
			}
		}
		t.Logf("%d requests (one connection each) in %v (%v/request): %v",
			n, took.Round(time.Millisecond), (took / n).Round(time.Microsecond), counts)
	})

	t.Run("client port reuse", func(t *testing.T) {
		// A client reuses its source ports quickly; the service netstack, which closes first when a
		// backend does and so holds the 4-tuple in TIME_WAIT, must still accept the new SYN (as
		// Linux does, RFC 1122 4.2.2.13). A narrow port range in the client namespace, outside the
		// default one so that other subtests never meet these TIME_WAIT entries, brings every port
		// back within a second or two.
		const n, chunk = 4000, 250
		old := strings.Join(strings.Fields(s.client.MustExec(t, "sysctl", "-n", "net.ipv4.ip_local_port_range")), " ")
		s.client.MustExec(t, "sysctl", "-qw", "net.ipv4.ip_local_port_range=61000 64999")
		defer s.client.MustExec(t, "sysctl", "-qw", "net.ipv4.ip_local_port_range="+old)
		start := time.Now()
		for done := 0; done < n; done += chunk {
			results := s.curlMany(t, "http://"+webIP+"/", chunk, "--connect-timeout", "1")
			if _, failed := countBackends(results); len(failed) > 0 {
				t.Fatalf("%d of connections %d..%d from 4000 source ports failed: SYNs on reused "+
					"4-tuples go unanswered (the service netstack's TIME_WAIT?)", len(failed), done, done+chunk)
			}
		}
		t.Logf("%d connections from 4000 source ports in %v", n, time.Since(start).Round(time.Millisecond))
	})

	sticky := []struct {
		name string
		url  string
	}{
		{"source-hash", "http://web-hash.default.svc.cluster.local/"},
		{"client-ip affinity", "http://web-sticky.default.svc.cluster.local/"},
	}
	for _, tc := range sticky {
		t.Run(tc.name, func(t *testing.T) {
			// Each client address sticks to one backend.
			for _, src := range []string{"10.77.1.10", "10.77.1.20"} {
				results := s.curlMany(t, tc.url, 40, "--interface", src)
				counts, failed := countBackends(results)
				if len(failed) > 0 {
					t.Errorf("from %s: %d requests failed: %v", src, len(failed), failed)
				}
				if len(counts) != 1 {
					t.Errorf("from %s: requests spread over %d backends, want all on one: %v", src, len(counts), counts)
				}
				t.Logf("from %s: %v", src, counts)
			}
		})
	}

	t.Run("derived service IP", func(t *testing.T) {
		out := s.client.MustExec(t, "curl", "-sS", "-m", "5", "http://derived.default.svc.cluster.local/")
		if out != "b1\n" {
			t.Errorf("curl derived: got %q, want %q", out, "b1\n")
		}
	})

	t.Run("large body", func(t *testing.T) {
		const size = 50 << 20
		start := time.Now()
		out := s.client.MustExec(t, "curl", "-sS", "-m", "60", "-o", "/dev/null", "-w", "%{size_download}",
			fmt.Sprintf("http://%s/big?n=%d", webIP, size))
		took := time.Since(start)
		if strings.TrimSpace(out) != fmt.Sprint(size) {
			t.Errorf("downloaded %s bytes, want %d", out, size)
		}
		t.Logf("%d MiB through the service in %v (%.0f Mbit/s)", size>>20, took.Round(time.Millisecond),
			float64(size)*8/took.Seconds()/1e6)
	})

	t.Run("from a pod behind the node", func(t *testing.T) {
		// Forwarded flows reach mesh0 as the kernel's GRO super-packets and leave it as the service
		// netstack's GSO super-packets: both ways must arrive intact.
		const down = 50 << 20
		out := s.app.MustExec(t, "curl", "-sS", "-m", "60", "-o", "/dev/null", "-w", "%{size_download}",
			fmt.Sprintf("http://%s/big?n=%d", webIP, down))
		if strings.TrimSpace(out) != fmt.Sprint(down) {
			t.Errorf("pod downloaded %s bytes, want %d", out, down)
		}
		body := make([]byte, 20<<20)
		rand.Read(body)
		file := filepath.Join(s.lab.Dir, "upload.bin")
		if err := os.WriteFile(file, body, 0o644); err != nil {
			t.Fatal(err)
		}
		out = s.app.MustExec(t, "curl", "-sS", "-m", "60", "--data-binary", "@"+file, fmt.Sprintf("http://%s/sink", webIP))
		if want := fmt.Sprintf("%d %x", len(body), sha256.Sum256(body)); strings.TrimSpace(out) != want {
			t.Errorf("pod uploaded 20 MiB: server saw %q, want %q", strings.TrimSpace(out), want)
		}
	})

	t.Run("unknown port refused", func(t *testing.T) {
		// Nothing listens on web:81: the connection must fail fast, not hang.
		start := time.Now()
		out, err := s.client.Exec("curl", "-sS", "-m", "5", "http://"+webIP+":81/")
		if err == nil {
			t.Errorf("curl to an unknown service port succeeded: %s", out)
		}
		if took := time.Since(start); took > 3*time.Second {
			t.Errorf("curl to an unknown service port took %v to fail, want a prompt refusal", took)
		}
	})
}

func (s *singleNode) testUDP(t *testing.T) {
	long := strings.Repeat("x", 1200)
	tests := []struct {
		name   string
		server string
		msg    string
		count  int
	}{
		{"small datagrams by IP", echoIP + ":9000", "ping-%d", 10},
		{"large datagrams by IP", echoIP + ":9000", long + "-%d", 5},
		{"one-byte datagrams", echoIP + ":9000", "%d", 10},
		{"by name", "echo.default.svc.cluster.local:9000", "named-%d", 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// --burst sends all datagrams before reading: a proxy that merged or split them would
			// show up as fewer, longer, or shorter replies.
			out := s.client.MustExec(t, bins.Testserver, "udpclient", "--server", tc.server,
				"--msg", tc.msg, "--count", fmt.Sprint(tc.count), "--burst", "--timeout", "3s")
			lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
			if len(lines) != tc.count {
				t.Fatalf("got %d replies, want %d:\n%s", len(lines), tc.count, lastLines(out, 10))
			}
			var backend string
			for i, line := range lines {
				name, payload, ok := strings.Cut(line, ":")
				if !ok || !strings.HasPrefix(name, "b") {
					t.Fatalf("reply %d: %q is not BACKEND:PAYLOAD", i, shorten(line))
				}
				if want := strings.ReplaceAll(tc.msg, "%d", fmt.Sprint(i)); payload != want {
					t.Errorf("reply %d: payload %q, want %q (datagram boundaries lost or reordered)", i, shorten(payload), shorten(want))
				}
				// One UDP flow (one client socket) goes to one endpoint.
				if backend == "" {
					backend = name
				} else if name != backend {
					t.Errorf("reply %d from %s, earlier ones from %s: one flow must stay on one endpoint", i, name, backend)
				}
			}
		})
	}
}

func shorten(s string) string {
	if len(s) > 40 {
		return fmt.Sprintf("%s...(%d bytes)", s[:40], len(s))
	}
	return s
}
