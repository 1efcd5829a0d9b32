package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/edgewire/edgewire/overlay/control"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// statusBackend answers Status with st; the other verbs are not used.
type statusBackend struct{ st control.Status }

func (b statusBackend) Status() control.Status                { return b.st }
func (b statusBackend) Services() []control.Service           { return nil }
func (b statusBackend) WireGuard() (control.WireGuard, error) { return control.WireGuard{}, nil }
func (b statusBackend) Down()                                 {}
func (b statusBackend) Resolve(context.Context, string, string) (control.Resolution, error) {
	return control.Resolution{}, errors.New("not in this test")
}
func (b statusBackend) Ping(context.Context, string, int, bool, func(control.PingResult)) error {
	return errors.New("not in this test")
}

// limitsStatus has a distinct value in every limit field, so a field shown in the wrong place
// shows up.
func limitsStatus() control.Status {
	return control.Status{
		Node: "edge-1",
		Limits: control.LimitStats{
			Flows: control.FlowLimits{
				TCP: control.FlowCap{Held: 11, Max: 4000, MaxPerClient: 1000, RefusedPerClient: 12, RefusedTotal: 13},
				UDP: control.FlowCap{Held: 21, Max: 2000, MaxPerClient: 500, RefusedPerClient: 22, RefusedTotal: 23,
					Evicted: 24, QueueDrops: 25},
			},
			Forward: control.ForwardLimits{
				TCPHeld: 31, MaxTCP: 4001, MaxTCPPerPeer: 2001, TCPBusyPerPeer: 32, TCPBusyTotal: 33,
				UDPHeld: 41, MaxUDP: 2002, MaxUDPPerPeer: 1001, UDPCapPerPeer: 42, UDPCapTotal: 43, UDPEvicted: 44,
			},
			DNS: control.DNSLimits{
				RateLimited: 51, Untracked: 52, QueueFull: 53, Expired: 54, ForwardRefused: 55,
				Coalesced: 56, TCPRefused: 57, ReplyDropped: 58, Dropped: 59, ReadErrors: 60, Policed: 61,
			},
		},
		Process: control.ProcessStats{
			RSSBytes: 40 << 20, PeakRSSBytes: 90 << 20, HeapBytes: 10 << 20, GoMemLimit: 200 << 20,
			Goroutines: 70, GOMAXPROCS: 2, OpenFiles: 80, FileLimit: 20000,
			WireGuardBuffers: 384, WireGuardBuffersMax: 768, WireGuardFlushes: 3, MemoryReleases: 4,
		},
	}
}

// runStatus serves st on a control socket and runs `meshctl status` with args against it.
func runStatus(t *testing.T, st control.Status, args ...string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	srv := control.NewServer(sock, statusBackend{st}, nil)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	cmd := newStatusCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetArgs(append([]string{"--control-socket", sock}, args...))
	if err := cmd.ExecuteContext(context.Background()); err != nil {
		t.Fatalf("status %v: %v", args, err)
	}
	return out.String()
}

func TestStatusLimitsText(t *testing.T) {
	out := runStatus(t, limitsStatus())
	// Each group is one line; tabwriter's padding is folded to single spaces.
	lines := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		if label, rest, ok := strings.Cut(strings.Join(strings.Fields(l), " "), ": "); ok {
			lines[label] = rest
		}
	}
	tests := []struct {
		name, label, want string
	}{
		{name: "flows", label: "flows",
			want: "tcp 11 of 4000 (1000 per client), refused 12 per client, 13 total; udp 21 of 2000 (500 per client), refused 22 per client, 23 total, 24 evicted, 25 queue drops"},
		{name: "forward listener", label: "forward listener",
			want: "tcp 31 of 4001 (2001 per peer), busy 32 per peer, 33 total; udp 41 of 2002 (1001 per peer), dropped 42 per peer, 43 total, 44 evicted"},
		{name: "dns", label: "dns",
			want: "61 policed before the socket, 51 rate limited (52 datagrams from untracked sources), 53 queue full, 54 expired, 55 forward refused, 56 coalesced, 57 tcp refused, 58 replies dropped, 59 dropped, 60 read errors"},
		{name: "process", label: "process",
			want: "RSS 40.00 MiB (peak 90.00 MiB), heap 10.00 MiB of GOMEMLIMIT 200.00 MiB; 70 goroutines, GOMAXPROCS 2; 80 of 20000 files open"},
		{name: "wireguard buffers", label: "wireguard buffers",
			want: "384 of 768 out (64 KiB each), nearly out 3 times; memory returned to the kernel 4 times"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got, ok := lines[tc.label]; !ok || got != tc.want {
				t.Errorf("line %q:\n got %q\nwant %q\nwhole output:\n%s", tc.label, got, tc.want, out)
			}
		})
	}
	if !strings.Contains(out, "\nLimits:") {
		t.Errorf("no Limits section:\n%s", out)
	}
}

func TestStatusLimitsJSON(t *testing.T) {
	out := runStatus(t, limitsStatus(), "--json")
	var doc map[string]any
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	// The names scripts read: changing one breaks them.
	tests := []struct {
		path string
		want float64
	}{
		{"limits.flows.tcp.held", 11}, {"limits.flows.tcp.max", 4000}, {"limits.flows.tcp.maxPerClient", 1000},
		{"limits.flows.tcp.refusedPerClient", 12}, {"limits.flows.tcp.refusedTotal", 13},
		{"limits.flows.udp.held", 21}, {"limits.flows.udp.refusedPerClient", 22}, {"limits.flows.udp.refusedTotal", 23},
		{"limits.flows.udp.evicted", 24}, {"limits.flows.udp.queueDrops", 25},
		{"limits.forward.tcpHeld", 31}, {"limits.forward.maxTCP", 4001}, {"limits.forward.maxTCPPerPeer", 2001},
		{"limits.forward.tcpBusyPerPeer", 32}, {"limits.forward.tcpBusyTotal", 33},
		{"limits.forward.udpHeld", 41}, {"limits.forward.maxUDP", 2002}, {"limits.forward.maxUDPPerPeer", 1001},
		{"limits.forward.udpCapPerPeer", 42}, {"limits.forward.udpCapTotal", 43}, {"limits.forward.udpEvicted", 44},
		{"limits.dns.rateLimited", 51}, {"limits.dns.policed", 61}, {"limits.dns.untracked", 52}, {"limits.dns.queueFull", 53},
		{"limits.dns.expired", 54}, {"limits.dns.forwardRefused", 55}, {"limits.dns.coalesced", 56},
		{"limits.dns.tcpRefused", 57}, {"limits.dns.replyDropped", 58}, {"limits.dns.dropped", 59},
		{"limits.dns.readErrors", 60},
		{"process.openFiles", 80}, {"process.fileLimit", 20000},
	}
	for _, tc := range tests {
		t.Run(tc.path, func(t *testing.T) {
			var v any = doc
			for _, key := range strings.Split(tc.path, ".") {
				m, ok := v.(map[string]any)
				if !ok {
					t.Fatalf("%s: %v is not an object", key, v)
				}
				if v, ok = m[key]; !ok {
					t.Fatalf("no %q in %v", key, m)
				}
			}
			if v != tc.want {
				t.Errorf("%s = %v, want %v", tc.path, v, tc.want)
			}
		})
	}
}
