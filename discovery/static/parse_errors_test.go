package static

import (
	"strings"
	"testing"
)

// TestParseErrors checks that every kind of invalid input is an error naming the file, the
// document, the object, the line and the field.
func TestParseErrors(t *testing.T) {
	const svcHead = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n"
	const sliceHead = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\n"
	tests := []struct {
		name string
		in   string
		want []string // substrings of the error
	}{
		{
			name: "bad YAML",
			in:   svcHead + "---\nkind: [\n",
			want: []string{"f.yaml: document 2: yaml: line 6"},
		},
		{
			name: "missing metadata.name",
			in:   svcHead + "---\napiVersion: v1\nkind: Service\nmetadata:\n  namespace: x\n",
			want: []string{"f.yaml: document 2 (Service)", "line 8", "metadata.name: required"},
		},
		{
			name: "port out of range",
			in:   "---\n" + svcHead + "spec:\n  ports:\n  - name: http\n    port: 70000\n",
			want: []string{"f.yaml: document 1 (Service default/web), line 9: spec.ports[0].port: must be 1-65535, got 70000"},
		},
		{
			name: "missing port",
			in:   svcHead + "spec:\n  ports:\n  - name: http\n",
			want: []string{"document 1 (Service default/web), line 7: spec.ports[0].port: must be 1-65535, got 0"},
		},
		{
			name: "targetPort out of range",
			in:   svcHead + "spec:\n  ports:\n  - {port: 80, targetPort: 65536}\n",
			want: []string{"document 1 (Service default/web), line 7: spec.ports[0].targetPort: must be 1-65535, got 65536"},
		},
		{
			name: "bad targetPort name",
			in:   svcHead + "spec:\n  ports:\n  - {port: 80, targetPort: Not_A_Name}\n",
			want: []string{"spec.ports[0].targetPort: must be a port number or a port name", "Not_A_Name"},
		},
		{
			name: "negative targetPort",
			in:   svcHead + "spec:\n  ports:\n  - {port: 80, targetPort: -1}\n",
			want: []string{"line 7: spec.ports[0].targetPort: must be a port number or a port name", `got "-1"`},
		},
		{
			name: "unknown service protocol",
			in:   svcHead + "spec:\n  ports:\n  - {port: 80}\n  - {port: 81, protocol: HTTP}\n",
			want: []string{"document 1 (Service default/web), line 8: spec.ports[1].protocol: unknown protocol \"HTTP\""},
		},
		{
			name: "invalid clusterIP",
			in:   svcHead + "spec:\n  clusterIP: 10.96.0.300\n",
			want: []string{"document 1 (Service default/web), line 6: spec.clusterIP: invalid IP address \"10.96.0.300\""},
		},
		{
			name: "invalid clusterIPs",
			in:   svcHead + "spec:\n  clusterIPs: [nope]\n",
			want: []string{"line 6: spec.clusterIPs[0]: invalid IP address \"nope\""},
		},
		{
			name: "unknown service type",
			in:   svcHead + "spec:\n  type: Magic\n",
			want: []string{"spec.type: unknown type \"Magic\""},
		},
		{
			name: "ExternalName without externalName",
			in:   svcHead + "spec:\n  type: ExternalName\n",
			want: []string{"spec.externalName: required"},
		},
		{
			name: "unknown session affinity",
			in:   svcHead + "spec:\n  sessionAffinity: Cookie\n",
			want: []string{"spec.sessionAffinity: unknown value \"Cookie\""},
		},
		{
			name: "affinity timeout out of range",
			in:   svcHead + "spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n",
			want: []string{"spec.sessionAffinityConfig.clientIP.timeoutSeconds: must be 1-86400, got 0"},
		},
		{
			name: "invalid service name",
			in:   "apiVersion: v1\nkind: Service\nmetadata: {name: Web_1}\n",
			want: []string{"document 1 (Service default/Web_1), line 3: metadata.name: \"Web_1\" is not a valid name"},
		},
		{
			name: "wrong type for a field",
			in:   svcHead + "spec:\n  ports:\n  - {port: eighty}\n",
			want: []string{"document 1 (Service default/web): line 7: cannot unmarshal !!str `eighty`"},
		},
		{
			name: "duplicate service",
			in:   svcHead + "---\n" + strings.Replace(svcHead, "web", "api", 1) + "---\n" + svcHead,
			want: []string{"document 3 (Service default/web), line 14: metadata.name: duplicate Service default/web (first defined in document 1)"},
		},
		{
			name: "duplicate service in a List",
			in:   "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: a}}\n- {apiVersion: v1, kind: Service, metadata: {name: a}}\n",
			want: []string{"document 1, item 2 (Service default/a), line 5: metadata.name: duplicate Service default/a (first defined in document 1, item 1)"},
		},
		{
			name: "invalid endpoint address",
			in:   sliceHead + "endpoints:\n- addresses: [10.0.0.1]\n- addresses: [10.0.0.2, 10.0.0.x]\n",
			want: []string{"document 1 (EndpointSlice default/web-1), line 9: endpoints[1].addresses[1]: invalid address \"10.0.0.x\""},
		},
		{
			name: "address of the wrong family",
			in:   sliceHead + "endpoints:\n- addresses: [\"fd00::1\"]\n",
			want: []string{"endpoints[0].addresses[0]: invalid address \"fd00::1\": want an IPv4 address"},
		},
		{
			name: "endpoint without addresses",
			in:   sliceHead + "endpoints:\n- nodeName: n\n",
			want: []string{"endpoints[0].addresses: at least one address is required"},
		},
		{
			name: "slice port out of range",
			in:   sliceHead + "ports:\n- {name: http, port: 0}\n",
			want: []string{"document 1 (EndpointSlice default/web-1), line 8: ports[0].port: must be 1-65535, got 0"},
		},
		{
			name: "unknown slice protocol",
			in:   sliceHead + "ports:\n- {name: http, port: 80, protocol: tcp}\n",
			want: []string{"ports[0].protocol: unknown protocol \"tcp\""},
		},
		{
			name: "unknown address type",
			in:   strings.Replace(sliceHead, "IPv4", "IPX", 1),
			want: []string{"line 6: addressType: unknown address type \"IPX\""},
		},
		{
			name: "slice without service-name label",
			in:   "---\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels: {app: web}\n",
			want: []string{"f.yaml: document 2 (EndpointSlice default/web-1), line 7: metadata.labels: missing label kubernetes.io/service-name"},
		},
		{
			name: "duplicate slice",
			in:   sliceHead + "---\n" + sliceHead,
			want: []string{"document 2 (EndpointSlice default/web-1)", "duplicate EndpointSlice default/web-1 (first defined in document 1)"},
		},
		{
			name: "duplicate node",
			in:   "apiVersion: v1\nkind: Node\nmetadata: {name: n}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: n}\n",
			want: []string{"document 2 (Node n), line 7: metadata.name: duplicate Node n"},
		},
		{
			name: "missing kind",
			in:   "apiVersion: v1\nmetadata: {name: x}\n",
			want: []string{"document 1, line 1: kind: required"},
		},
		{
			name: "wrong apiVersion",
			in:   "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: x}\n",
			want: []string{"document 1 (EndpointSlice default/x), line 1: apiVersion: must be discovery.k8s.io/v1"},
		},
		{
			name: "document not an object",
			in:   "- a\n- b\n",
			want: []string{"f.yaml: document 1, line 1: must be a Kubernetes object (a mapping), got a list"},
		},
		{
			name: "List items not a list",
			in:   "apiVersion: v1\nkind: List\nitems: {a: b}\n",
			want: []string{"document 1 (List), line 3: items: must be a list"},
		},
		{
			name: "nested List",
			in:   "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: List, items: []}\n",
			want: []string{"document 1, item 1 (List), line 4: kind: a List inside a List is not supported"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			snap, err := Parse([]byte(tc.in), "f.yaml")
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
