package static

import (
	"encoding/base64"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/edgewire/edgewire/discovery"
)

// Two WireGuard public keys, as `wg pubkey` prints them.
var (
	keyA = base64.StdEncoding.EncodeToString([]byte(strings.Repeat("a", 32)))
	keyB = base64.StdEncoding.EncodeToString([]byte(strings.Repeat("b", 32)))
)

// meshNode is a Node object with the given annotations (YAML flow mapping entries).
func meshNode(name, annotations string) string {
	return "apiVersion: v1\nkind: Node\nmetadata:\n  name: " + name + "\n  annotations:\n" + annotations
}

func TestParseMeshNodes(t *testing.T) {
	aps := func(ss ...string) []netip.AddrPort {
		out := make([]netip.AddrPort, len(ss))
		for i, s := range ss {
			out[i] = netip.MustParseAddrPort(s)
		}
		return out
	}
	tests := []struct {
		name string
		in   string
		want []*discovery.Node
	}{
		{
			name: "key and endpoints, LAN first, order kept",
			in: meshNode("edge-1", "    edgewire.io/wireguard-public-key: "+keyA+"\n"+
				"    edgewire.io/endpoints: 192.168.1.5:51820,[2001:db8::5]:51820,203.0.113.7:40000\n"),
			want: []*discovery.Node{{
				Name:         "edge-1",
				WireGuardKey: keyA,
				Endpoints:    aps("192.168.1.5:51820", "[2001:db8::5]:51820", "203.0.113.7:40000"),
				Annotations: map[string]string{
					discovery.AnnotationWireGuardKey: keyA,
					discovery.AnnotationEndpoints:    "192.168.1.5:51820,[2001:db8::5]:51820,203.0.113.7:40000",
				},
			}},
		},
		{
			name: "spaces around endpoints, IPv4-mapped unmapped",
			in: meshNode("edge-1", "    edgewire.io/wireguard-public-key: "+keyA+"\n"+
				"    edgewire.io/endpoints: ' 10.0.0.1:1 , [::ffff:10.0.0.2]:2 '\n"),
			want: []*discovery.Node{{
				Name: "edge-1", WireGuardKey: keyA, Endpoints: aps("10.0.0.1:1", "10.0.0.2:2"),
				Annotations: map[string]string{
					discovery.AnnotationWireGuardKey: keyA,
					discovery.AnnotationEndpoints:    " 10.0.0.1:1 , [::ffff:10.0.0.2]:2 ",
				},
			}},
		},
		{
			name: "key without endpoints",
			in:   meshNode("edge-1", "    edgewire.io/wireguard-public-key: "+keyA+"\n"),
			want: []*discovery.Node{{
				Name: "edge-1", WireGuardKey: keyA,
				Annotations: map[string]string{discovery.AnnotationWireGuardKey: keyA},
			}},
		},
		{
			name: "empty endpoints",
			in:   meshNode("edge-1", "    edgewire.io/wireguard-public-key: "+keyA+"\n    edgewire.io/endpoints: ''\n"),
			want: []*discovery.Node{{
				Name: "edge-1", WireGuardKey: keyA,
				Annotations: map[string]string{discovery.AnnotationWireGuardKey: keyA, discovery.AnnotationEndpoints: ""},
			}},
		},
		{
			name: "node without a key is not a peer",
			in:   "apiVersion: v1\nkind: Node\nmetadata: {name: plain}\n",
			want: []*discovery.Node{{Name: "plain"}},
		},
		{
			name: "two nodes, two keys",
			in: meshNode("edge-2", "    edgewire.io/wireguard-public-key: "+keyB+"\n") + "---\n" +
				meshNode("edge-1", "    edgewire.io/wireguard-public-key: "+keyA+"\n"),
			want: []*discovery.Node{
				{Name: "edge-1", WireGuardKey: keyA, Annotations: map[string]string{discovery.AnnotationWireGuardKey: keyA}},
				{Name: "edge-2", WireGuardKey: keyB, Annotations: map[string]string{discovery.AnnotationWireGuardKey: keyB}},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse([]byte(tc.in), "nodes.yaml")
			if err != nil {
				t.Fatalf("Parse(): %v", err)
			}
			want := &discovery.Snapshot{Services: []*discovery.Service{}, Nodes: tc.want}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("Parse() mismatch\n got: %s\nwant: %s", dump(got), dump(want))
			}
		})
	}
}

func TestParseMeshNodeErrors(t *testing.T) {
	const keyField = "metadata.annotations[edgewire.io/wireguard-public-key]: "
	const epField = "metadata.annotations[edgewire.io/endpoints]: "
	withKey := func(endpoints string) string {
		return meshNode("edge-1", "    edgewire.io/wireguard-public-key: "+keyA+"\n    edgewire.io/endpoints: '"+endpoints+"'\n")
	}
	tests := []struct {
		name string
		in   string
		want []string // substrings of the error
	}{
		{
			name: "endpoint without port",
			in:   withKey("10.0.0.1"),
			want: []string{`nodes.yaml: document 1 (Node edge-1), line 7: ` + epField + `"10.0.0.1" is not ip:port`},
		},
		{
			name: "second endpoint bad",
			in:   withKey("10.0.0.1:51820,fd00::1:51820"),
			want: []string{epField + `"fd00::1:51820" is not ip:port (IPv6 as [addr]:port)`},
		},
		{
			name: "port zero",
			in:   withKey("10.0.0.1:0"),
			want: []string{epField + `"10.0.0.1:0": port must be 1-65535`},
		},
		{
			name: "port out of range",
			in:   withKey("10.0.0.1:65536"),
			want: []string{epField + `"10.0.0.1:65536" is not ip:port`},
		},
		{
			name: "hostname",
			in:   withKey("edge-1.example:51820"),
			want: []string{epField + `"edge-1.example:51820" is not ip:port`},
		},
		{
			name: "zone",
			in:   withKey("[fe80::1%eth0]:51820"),
			want: []string{epField + `"[fe80::1%eth0]:51820": an address with a zone`},
		},
		{
			name: "unspecified address",
			in:   withKey("0.0.0.0:51820"),
			want: []string{epField + `"0.0.0.0:51820": not a unicast address`},
		},
		{
			name: "multicast address",
			in:   withKey("[ff02::1]:51820"),
			want: []string{epField + `"[ff02::1]:51820": not a unicast address`},
		},
		{
			name: "empty entry",
			in:   withKey("10.0.0.1:1,,10.0.0.2:1"),
			want: []string{epField + `empty entry in "10.0.0.1:1,,10.0.0.2:1"`},
		},
		{
			name: "duplicate endpoint",
			in:   withKey("10.0.0.1:1,[::ffff:10.0.0.1]:1"),
			want: []string{epField + `10.0.0.1:1 is listed twice`},
		},
		{
			name: "endpoints without key",
			in:   meshNode("edge-1", "    edgewire.io/endpoints: 10.0.0.1:51820\n"),
			want: []string{"line 6: " + epField + "set without edgewire.io/wireguard-public-key"},
		},
		{
			name: "key not base64",
			in:   meshNode("edge-1", "    edgewire.io/wireguard-public-key: not-a-key\n"),
			want: []string{`document 1 (Node edge-1), line 6: ` + keyField + `"not-a-key" is not a WireGuard public key (32 bytes in base64`},
		},
		{
			name: "key of 31 bytes",
			in:   meshNode("edge-1", "    edgewire.io/wireguard-public-key: "+base64.StdEncoding.EncodeToString(make([]byte, 31))+"\n"),
			want: []string{keyField, "is not a WireGuard public key"},
		},
		{
			name: "key without padding",
			in:   meshNode("edge-1", "    edgewire.io/wireguard-public-key: "+strings.TrimRight(keyA, "=")+"\n"),
			want: []string{keyField, "is not a WireGuard public key"},
		},
		{
			name: "key with a line break inside",
			in:   meshNode("edge-1", "    edgewire.io/wireguard-public-key: \""+keyA[:20]+"\\n"+keyA[20:43]+"\"\n"),
			want: []string{keyField, "is not a WireGuard public key"},
		},
		{
			name: "empty key",
			in:   meshNode("edge-1", "    edgewire.io/wireguard-public-key: ''\n"),
			want: []string{keyField + `"" is not a WireGuard public key`},
		},
		{
			name: "two nodes with the same key",
			in: meshNode("edge-1", "    edgewire.io/wireguard-public-key: "+keyA+"\n") + "---\n" +
				meshNode("edge-2", "    edgewire.io/wireguard-public-key: "+keyA+"\n"),
			want: []string{"document 2 (Node edge-2), line 13: " + keyField + "key " + keyA + " is also the key of Node edge-1 (document 1)"},
		},
		{
			name: "same key inside a NodeList",
			in: "apiVersion: v1\nkind: NodeList\nitems:\n" +
				"- metadata: {name: a, annotations: {edgewire.io/wireguard-public-key: " + keyB + "}}\n" +
				"- metadata: {name: b, annotations: {edgewire.io/wireguard-public-key: " + keyB + "}}\n",
			want: []string{"document 1, item 2 (Node b), line 5: " + keyField, "also the key of Node a (document 1, item 1)"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			snap, err := Parse([]byte(tc.in), "nodes.yaml")
			if err == nil {
				t.Fatalf("Parse() = %s, want an error", dump(snap))
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Parse() error\n  %v\nwant it to contain\n  %s", err, w)
				}
			}
		})
	}
}
