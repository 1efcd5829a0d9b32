package static

import (
	"bytes"
	"net/netip"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/edgewire/edgewire/discovery"
)

const incA = `# a catalog
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node1}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-fqdn, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: FQDN
endpoints: [{addresses: [a.example.org]}]
---
apiVersion: v1
kind: Node
metadata:
  name: node1
  annotations:
    edgewire.io/wireguard-public-key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    edgewire.io/endpoints: "10.0.0.1:51820"
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: db, namespace: default}
  spec: {clusterIP: None, ports: [{port: 5432}]}
`

// incEdits are changes to incA, each parsed with the cache warm from incA and compared with a parse
// from scratch.
var incEdits = []struct {
	name string
	edit func(string) string
}{
	{"unchanged", func(s string) string { return s }},
	{"endpoint added", func(s string) string {
		return strings.Replace(s, "- {addresses: [10.244.1.10], nodeName: node1}",
			"- {addresses: [10.244.1.10], nodeName: node1}\n- {addresses: [10.244.1.11], nodeName: node2}", 1)
	}},
	{"document removed", func(s string) string {
		i := strings.Index(s, "---\napiVersion: v1\nkind: ConfigMap")
		j := strings.Index(s, "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-fqdn")
		if i < 0 || j < 0 {
			return strings.Replace(s, "\n---\n", "\n", 1) // other bases: merge two documents
		}
		return s[:i] + s[j:]
	}},
	{"documents reordered", func(s string) string {
		parts := strings.Split(s, "---\n")
		if len(parts) < 6 {
			return s
		}
		parts[1], parts[5] = parts[5], parts[1]
		return strings.Join(parts, "---\n")
	}},
	{"document added", func(s string) string {
		return s + "---\napiVersion: v1\nkind: Service\nmetadata: {name: new, namespace: other}\nspec: {ports: [{port: 1}]}\n"
	}},
	{"duplicate service", func(s string) string {
		return s + "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {ports: [{port: 1}]}\n"
	}},
	{"duplicate node key", func(s string) string {
		return s + "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node9\n  annotations:\n    edgewire.io/wireguard-public-key: \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\n"
	}},
	{"invalid document", func(s string) string { return strings.Replace(s, "port: 80,", "port: 80000,", 1) }},
	{"yaml syntax error", func(s string) string { return s + "---\nkind: [unclosed\n" }},
	{"directive", func(s string) string { return "%YAML 1.2\n" + s }},
	{"slice moved before its service", func(s string) string {
		parts := strings.Split(s, "---\n")
		if len(parts) < 3 {
			return s
		}
		parts[1], parts[2] = parts[2], parts[1]
		return strings.Join(parts, "---\n")
	}},
}

func TestParseCachedMatchesParse(t *testing.T) {
	example, err := os.ReadFile("testdata/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, base := range []struct{ name, data string }{{"inline", incA}, {"example.yaml", string(example)}} {
		for _, tc := range incEdits {
			t.Run(base.name+"/"+tc.name, func(t *testing.T) {
				var cache docCache
				first, err := parseCached([]byte(base.data), "c.yaml", &cache)
				if err != nil {
					t.Fatalf("base: %v", err)
				}
				// What consumers do to a snapshot must not reach the cache.
				if err := discovery.AssignIPs(first.snap, netip.MustParsePrefix("9.251.0.0/16")); err != nil {
					t.Fatal(err)
				}
				data := []byte(tc.edit(base.data))
				got, gotErr := parseCached(data, "c.yaml", &cache)
				want, wantErr := parse(data, "c.yaml")
				if (gotErr == nil) != (wantErr == nil) || gotErr != nil && gotErr.Error() != wantErr.Error() {
					t.Fatalf("error %v, want %v", gotErr, wantErr)
				}
				if wantErr != nil {
					return
				}
				if !reflect.DeepEqual(got, want) {
					t.Errorf("cached parse differs from a full parse:\n got %+v\nwant %+v", got, want)
				}
				// And again, warm from the edited file.
				again, err := parseCached(data, "c.yaml", &cache)
				if err != nil || !reflect.DeepEqual(again, want) {
					t.Errorf("second cached parse: %v, differs: %v", err, !reflect.DeepEqual(again, want))
				}
			})
		}
	}
}

func TestParseCachedFailureKeepsCache(t *testing.T) {
	var cache docCache
	if _, err := parseCached([]byte(incA), "c.yaml", &cache); err != nil {
		t.Fatal(err)
	}
	n := len(cache.docs)
	if n == 0 {
		t.Fatal("nothing cached")
	}
	if _, err := parseCached([]byte(incA+"---\nkind: [x\n"), "c.yaml", &cache); err == nil {
		t.Fatal("want an error")
	}
	if len(cache.docs) != n {
		t.Errorf("a failed parse changed the cache: %d documents, was %d", len(cache.docs), n)
	}
}

func TestSplitDocuments(t *testing.T) {
	tests := []struct {
		name  string
		in    string
		want  []string
		lines []int
		docs  []int
		ok    bool
	}{
		{name: "no marker", in: "a: 1\n", want: []string{"a: 1\n"}, lines: []int{1}, docs: []int{1}, ok: true},
		{name: "comment then documents", in: "# c\n---\na: 1\n--- # two\nb: 2", want: []string{"# c\n", "---\na: 1\n", "--- # two\nb: 2"},
			lines: []int{1, 2, 4}, docs: []int{0, 1, 1}, ok: true},
		{name: "dashes that are not a marker", in: "---\na: |\n  ----\n  x---\n", want: []string{"---\na: |\n  ----\n  x---\n"}, lines: []int{1}, docs: []int{1}, ok: true},
		{name: "four dashes", in: "a: 1\n----\n", want: []string{"a: 1\n----\n"}, lines: []int{1}, docs: []int{1}, ok: true},
		{name: "CRLF", in: "---\r\na: 1\r\n---\r\nb: 2\r\n", want: []string{"---\r\na: 1\r\n", "---\r\nb: 2\r\n"}, lines: []int{1, 3}, docs: []int{1, 1}, ok: true},
		{name: "empty document", in: "---\n---\na: 1\n", want: []string{"---\n", "---\na: 1\n"}, lines: []int{1, 2}, docs: []int{0, 1}, ok: true},
		{name: "directive", in: "%YAML 1.2\n---\na: 1\n", ok: false},
		{name: "empty", in: "", ok: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			chunks, ok := splitDocuments([]byte(tc.in))
			if ok != tc.ok {
				t.Fatalf("ok = %v, want %v", ok, tc.ok)
			}
			if len(chunks) != len(tc.want) {
				t.Fatalf("%d chunks, want %d: %+v", len(chunks), len(tc.want), chunks)
			}
			for i, c := range chunks {
				if string(c.data) != tc.want[i] || c.line != tc.lines[i] || c.docs != tc.docs[i] {
					t.Errorf("chunk %d = %q line %d docs %d, want %q line %d docs %d", i, c.data, c.line, c.docs, tc.want[i], tc.lines[i], tc.docs[i])
				}
			}
		})
	}
}

// TestParseCachedLargeChange is the case the cache exists for: one service changed in a catalog of
// 10,000 services and 100,000 endpoints, where the cached parse must equal a full one.
func TestParseCachedLargeChange(t *testing.T) {
	data := largeCatalog(10000, 100000)
	var cache docCache
	start := time.Now()
	if _, err := parseCached(data, "large.yaml", &cache); err != nil {
		t.Fatal(err)
	}
	full := time.Since(start)
	changed := bytes.Replace(data, []byte("name: svc-5000\n"), []byte("name: svc-5000-renamed\n"), 1)
	start = time.Now()
	got, err := parseCached(changed, "large.yaml", &cache)
	if err != nil {
		t.Fatal(err)
	}
	incremental := time.Since(start)
	want, err := Parse(changed, "large.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.snap, want) {
		t.Fatal("cached parse of the large catalog differs from a full parse")
	}
	// Timing is for the log (make bench measures the agent's end-to-end change time).
	t.Logf("10,000 services: full parse %v, one service changed %v", full, incremental)
}
