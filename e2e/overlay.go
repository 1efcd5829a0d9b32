package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
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

// CapturePath is the pcap file Node.Capture writes for iface in n.
func CapturePath(n *Node, iface string) string {
	return filepath.Join(n.lab.Dir, fmt.Sprintf("%s-%s.pcap", n.Role, iface))
}

// PcapSummary classifies the packets of a LAN capture read back with `tcpdump -n -r`.
type PcapSummary struct {
	// UDP counts UDP datagrams by "src > dst" (ip.port) whose ports are both port.
	UDP map[string]int
	// Control counts link-level control traffic that is not the mesh's: ARP and IPv6 neighbour,
	// router and multicast-listener messages (ICMPv6) that the kernel sends on its own.
	Control int
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

var udpLine = regexp.MustCompile(`^\S+ IP (\d+\.\d+\.\d+\.\d+)\.(\d+) > (\d+\.\d+\.\d+\.\d+)\.(\d+): UDP, length \d+$`)

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
		f := strings.Fields(line)
		switch {
		case len(f) > 1 && f[1] == "ARP,":
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
