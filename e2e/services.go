package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// ServiceSpec describes a Kubernetes Service and its one EndpointSlice for a services file.
type ServiceSpec struct {
	Namespace string // "default" when empty
	Name      string
	// ClusterIP is spec.clusterIP: empty for none given (the agent derives one), "None" for a
	// headless service.
	ClusterIP   string
	Annotations map[string]string
	// AffinitySeconds > 0 sets sessionAffinity: ClientIP with that timeout.
	AffinitySeconds int
	Ports           []PortSpec
	Endpoints       []EndpointSpec
}

// PortSpec is a service port; the endpoint slice publishes TargetPort under the same name.
type PortSpec struct {
	Name       string
	Protocol   string // "TCP" when empty
	Port       int
	TargetPort int
}

// EndpointSpec is one endpoint address.
type EndpointSpec struct {
	IP    string
	Ready bool
	Node  string
}

// RenderServices renders specs as a multi-document YAML file of Service and EndpointSlice objects,
// as `kubectl get svc,endpointslices -o yaml` would give them.
func RenderServices(specs []ServiceSpec) string {
	var b strings.Builder
	for _, s := range specs {
		ns := s.Namespace
		if ns == "" {
			ns = "default"
		}
		fmt.Fprintf(&b, "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: %s\n  namespace: %s\n", s.Name, ns)
		if len(s.Annotations) > 0 {
			b.WriteString("  annotations:\n")
			keys := make([]string, 0, len(s.Annotations))
			for k := range s.Annotations {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				fmt.Fprintf(&b, "    %s: %q\n", k, s.Annotations[k])
			}
		}
		b.WriteString("spec:\n  type: ClusterIP\n")
		if s.ClusterIP != "" {
			fmt.Fprintf(&b, "  clusterIP: %s\n", s.ClusterIP)
		}
		if s.AffinitySeconds > 0 {
			fmt.Fprintf(&b, "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: %d\n", s.AffinitySeconds)
		}
		b.WriteString("  ports:\n")
		for _, p := range s.Ports {
			fmt.Fprintf(&b, "  - name: %s\n    protocol: %s\n    port: %d\n    targetPort: %d\n", p.Name, proto(p.Protocol), p.Port, p.TargetPort)
		}

		fmt.Fprintf(&b, "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: %s-e2e\n  namespace: %s\n", s.Name, ns)
		fmt.Fprintf(&b, "  labels:\n    kubernetes.io/service-name: %s\naddressType: IPv4\nports:\n", s.Name)
		for _, p := range s.Ports {
			fmt.Fprintf(&b, "- name: %s\n  protocol: %s\n  port: %d\n", p.Name, proto(p.Protocol), p.TargetPort)
		}
		if len(s.Endpoints) == 0 {
			b.WriteString("endpoints: []\n")
			continue
		}
		b.WriteString("endpoints:\n")
		for _, e := range s.Endpoints {
			fmt.Fprintf(&b, "- addresses: [%q]\n  conditions:\n    ready: %t\n", e.IP, e.Ready)
			if e.Node != "" {
				fmt.Fprintf(&b, "  nodeName: %s\n", e.Node)
			}
		}
	}
	return b.String()
}

func proto(p string) string {
	if p == "" {
		return "TCP"
	}
	return p
}

// WriteFileAtomic replaces path with content through a rename in the same directory, the way
// editors and kubelet's ConfigMap volumes update files, so that a watcher never reads half a file.
func WriteFileAtomic(t testing.TB, path, content string) {
	t.Helper()
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
	if _, err := tmp.WriteString(content); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		t.Fatalf("write %s: %v", path, err)
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		t.Fatalf("write %s: %v", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		t.Fatalf("write %s: %v", path, err)
	}
}
