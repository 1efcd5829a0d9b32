package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// NodeSpec is a Kubernetes Node for a services file: the node directory entry other agents make
// WireGuard peers of.
type NodeSpec struct {
	Name string
	// PublicKey is the node's WireGuard public key in base64 (edgewire.io/wireguard-public-key).
	PublicKey string
	// Endpoints are the node's WireGuard socket addresses, ip:port (edgewire.io/endpoints).
	Endpoints []string
}

// RenderNodes renders nodes as Node objects, to be appended to RenderServices' output.
func RenderNodes(nodes []NodeSpec) string {
	var b strings.Builder
	for _, n := range nodes {
		fmt.Fprintf(&b, "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: %s\n", n.Name)
		if n.PublicKey == "" && len(n.Endpoints) == 0 {
			continue
		}
		b.WriteString("  annotations:\n")
		if n.PublicKey != "" {
			fmt.Fprintf(&b, "    edgewire.io/wireguard-public-key: %q\n", n.PublicKey)
		}
		if len(n.Endpoints) > 0 {
			fmt.Fprintf(&b, "    edgewire.io/endpoints: %q\n", strings.Join(n.Endpoints, ","))
		}
	}
	return b.String()
}

// NodeKeys is what `meshctl keygen --json` prints.
type NodeKeys struct {
	WireGuardPublicKey string `json:"wireguardPublicKey"`
	OverlayAddress     string `json:"overlayAddress"`
	Created            bool   `json:"created"`
}

// Keygen runs `meshctl keygen --json --state-dir dir` in n and checks that the key files it wrote
// are 0600.
func Keygen(t testing.TB, n *Node, meshctl, dir string) NodeKeys {
	t.Helper()
	out := n.MustExec(t, meshctl, "keygen", "--json", "--state-dir", dir)
	var k NodeKeys
	if err := json.Unmarshal([]byte(out), &k); err != nil {
		t.Fatalf("meshctl keygen --json in %s: %v\n%s", n.Role, err, out)
	}
	if !k.Created || k.WireGuardPublicKey == "" || k.OverlayAddress == "" {
		t.Fatalf("meshctl keygen in %s: want new keys and an overlay address, got %+v", n.Role, k)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("keygen state dir: %v", err)
	}
	for _, e := range entries {
		info, err := e.Info()
		if err != nil {
			t.Fatalf("keygen state dir: %v", err)
		}
		if strings.HasSuffix(e.Name(), ".key") && info.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", filepath.Join(dir, e.Name()), info.Mode().Perm())
		}
	}
	return k
}

// OverlayStatus is the WireGuard part of `meshctl status --json`.
type OverlayStatus struct {
	Node       string   `json:"node"`
	PublicKey  string   `json:"publicKey"`
	Overlay    string   `json:"overlay"`
	ListenPort int      `json:"listenPort"`
	Peers      []WGPeer `json:"peers"`
}

// WGPeer is one peer in `meshctl status --json` and `meshctl wg show --json`.
type WGPeer struct {
	Node            string    `json:"node"`
	PublicKey       string    `json:"publicKey"`
	Endpoint        string    `json:"endpoint"`
	AllowedIPs      []string  `json:"allowedIPs"`
	LatestHandshake time.Time `json:"latestHandshake"`
	RxBytes         uint64    `json:"rxBytes"`
	TxBytes         uint64    `json:"txBytes"`
}

// OverlayStatus returns the agent's `meshctl status --json` (its WireGuard part).
func (a *Agent) OverlayStatus(t testing.TB) OverlayStatus {
	t.Helper()
	var s OverlayStatus
	a.CtlJSON(t, &s, "status")
	return s
}

// EndpointRow is one endpoint in `meshctl services --json`.
type EndpointRow struct {
	Address      string    `json:"address"`
	Node         string    `json:"node"`
	Ready        bool      `json:"ready"`
	Flows        uint64    `json:"flows"`
	EjectedUntil time.Time `json:"ejectedUntil"`
}

// ServiceEndpoints returns the endpoints of each service in `meshctl services --json`, keyed by
// "namespace/name".
func (a *Agent) ServiceEndpoints(t testing.TB) map[string][]EndpointRow {
	t.Helper()
	var rows []struct {
		Namespace string        `json:"namespace"`
		Name      string        `json:"name"`
		Endpoints []EndpointRow `json:"endpoints"`
	}
	a.CtlJSON(t, &rows, "services")
	m := make(map[string][]EndpointRow, len(rows))
	for _, r := range rows {
		m[r.Namespace+"/"+r.Name] = r.Endpoints
	}
	return m
}

// CaptureAll starts tcpdump on iface in n, writing every packet to a pcap file in the lab's
// directory, and returns once tcpdump listens. Unlike Node.Capture it uses immediate mode: without
// it, tcpdump hands packets over in blocks (up to a second late on a quiet link) and loses the last
// block when it is stopped.
func CaptureAll(t testing.TB, n *Node, iface string) (p *Proc, pcap string) {
	t.Helper()
	pcap = filepath.Join(n.lab.Dir, fmt.Sprintf("%s-%s-all.pcap", n.Role, iface))
	p = n.Start(t, "tcpdump-all-"+iface, "tcpdump", "-n", "-U", "--immediate-mode", "-i", iface, "-w", pcap)
	p.WaitLog(t, "listening on", 10*time.Second)
	return p, pcap
}

// PcapSummary classifies the packets of a LAN capture read back with `tcpdump -n -r`.
type PcapSummary struct {
	// UDP counts UDP datagrams by "src > dst" (ip.port) whose ports are both port.
	UDP map[string]int
	// Control counts link-level control traffic that is not the mesh's: ARP, IGMP, and IPv6
	// neighbour, router and multicast-listener messages (ICMPv6) that the kernel sends on its own.
	Control int
	// PortUnreachable counts ICMP "udp port PORT unreachable" errors: a node's WireGuard datagram
	// that reached a node whose agent was not (yet, or any more) listening. They quote only the
	// start of the encrypted datagram.
	PortUnreachable int
	// Other are the lines of every other packet.
	Other []string
}

// Total is the number of UDP datagrams on port.
func (s PcapSummary) Total() int {
	var n int
	for _, c := range s.UDP {
		n += c
	}
	return n
}

// Pairs lists the UDP "src > dst" pairs seen, sorted, with their counts.
func (s PcapSummary) Pairs() string {
	keys := make([]string, 0, len(s.UDP))
	for k := range s.UDP {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s: %d; ", k, s.UDP[k])
	}
	return strings.TrimSuffix(b.String(), "; ")
}

var (
	udpLine         = regexp.MustCompile(`^\S+ IP (\d+\.\d+\.\d+\.\d+)\.(\d+) > (\d+\.\d+\.\d+\.\d+)\.(\d+): UDP, length \d+$`)
	unreachableLine = regexp.MustCompile(`^\S+ IP \d+\.\d+\.\d+\.\d+ > \d+\.\d+\.\d+\.\d+: ICMP \d+\.\d+\.\d+\.\d+ udp port (\d+) unreachable, length \d+$`)
)

// ClassifyPcap reads `tcpdump -n -r` output (one packet per line, no -A or -X).
func ClassifyPcap(out string, port string) PcapSummary {
	s := PcapSummary{UDP: map[string]int{}}
	for line := range strings.Lines(out) {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "reading from file") {
			continue
		}
		if m := udpLine.FindStringSubmatch(line); m != nil && m[2] == port && m[4] == port {
			s.UDP[m[1]+" > "+m[3]]++
			continue
		}
		if m := unreachableLine.FindStringSubmatch(line); m != nil && m[1] == port {
			s.PortUnreachable++
			continue
		}
		f := strings.Fields(line)
		switch {
		case len(f) > 1 && f[1] == "ARP,":
			s.Control++
		case len(f) > 5 && f[1] == "IP" && f[5] == "igmp":
			s.Control++
		case len(f) > 1 && f[1] == "IP6" && strings.Contains(line, "ICMP6"):
			s.Control++
		default:
			s.Other = append(s.Other, line)
		}
	}
	return s
}

// BuildFwdProbe builds e2e/fwdprobe into dir and returns the binary's path.
func BuildFwdProbe(t testing.TB, dir string) string {
	t.Helper()
	out := filepath.Join(dir, "fwdprobe")
	start := time.Now()
	if err := goBuild(out, "github.com/edgewire/edgewire/e2e/fwdprobe"); err != nil {
		t.Fatalf("build fwdprobe: %v", err)
	}
	t.Logf("built fwdprobe in %v", time.Since(start).Round(time.Millisecond))
	return out
}

// Median returns the median of ds (0 for none); ds is sorted in place.
func Median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	return ds[len(ds)/2]
}

// request is one curl from a node: its status code, X-Backend and total time.
type request struct {
	start, end time.Time // set by curlOnce only
	code       string
	backend    string
	took       time.Duration // curl's time_total
	err        error         // set by curlOnce only
	out        string        // set by curlOnce only
}

func (r request) ok() bool { return r.err == nil && r.code == "200" && r.backend != "" }

// curlFormat makes curl print one RESULT line per request, parsed by parseRequests.
const curlFormat = "\nRESULT %{http_code} %{time_total} %header{x-backend}\n"

func parseRequests(out string) []request {
	var rs []request
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "RESULT" {
			continue
		}
		r := request{code: f[1]}
		if secs, err := strconv.ParseFloat(f[2], 64); err == nil {
			r.took = time.Duration(secs * float64(time.Second))
		}
		if len(f) > 3 {
			r.backend = f[3]
		}
		rs = append(rs, r)
	}
	return rs
}

// curlOnce makes one request (a new connection) from n.
func curlOnce(n *Node, url string) request {
	start := time.Now()
	out, err := n.Exec("curl", "-sS", "-m", "5", "-o", "/dev/null", "-H", "Connection: close", "-w", curlFormat, url)
	var r request
	if rs := parseRequests(out); len(rs) == 1 {
		r = rs[0]
	}
	r.start, r.end, r.err, r.out = start, time.Now(), err, out
	return r
}

// curlMesh requests url n times from node with one curl process (URL globbing, a connection each).
func curlMesh(t testing.TB, node *Node, url string, n int) []request {
	t.Helper()
	out, err := node.ExecTimeout(2*time.Minute, "curl", "-sS", "-m", "5", "-H", "Connection: close", "-o", "/dev/null",
		"-w", curlFormat, fmt.Sprintf("%s?i=[1-%d]", url, n))
	rs := parseRequests(out)
	if len(rs) != n {
		t.Fatalf("curl %s x%d: %d results (err %v)\n%s", url, n, len(rs), err, lastLines(out, 20))
	}
	return rs
}

// wgPeerBlocks splits `wg show` output into its peer sections, keyed by public key.
func wgPeerBlocks(out string) map[string]string {
	blocks := map[string]string{}
	var key string
	var b strings.Builder
	flush := func() {
		if key != "" {
			blocks[key] = b.String()
		}
		b.Reset()
	}
	for line := range strings.Lines(out) {
		if rest, ok := strings.CutPrefix(line, "peer: "); ok {
			flush()
			key = strings.Fields(rest)[0]
		}
		b.WriteString(line)
	}
	flush()
	return blocks
}
