package k8s

import (
	"context"
	"errors"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/edgewire/edgewire/discovery"
)

func TestSelfAnnotations(t *testing.T) {
	overlay := netip.MustParseAddr("fd7a:115c:a1e0::1")
	tests := []struct {
		name    string
		self    discovery.Self
		want    map[string]string
		wantErr string
	}{
		{
			name: "IPv4 and IPv6 endpoints, LAN first",
			self: discovery.Self{WireGuardKey: keyA, Overlay: overlay, Endpoints: addrPorts("10.0.0.5:51820", "[fd00::5]:51820")},
			want: map[string]string{
				discovery.AnnotationWireGuardKey:   keyA,
				discovery.AnnotationOverlayAddress: "fd7a:115c:a1e0::1",
				discovery.AnnotationEndpoints:      "10.0.0.5:51820,[fd00::5]:51820",
			},
		},
		{
			name: "duplicate endpoint dropped, no overlay address",
			self: discovery.Self{WireGuardKey: keyA, Endpoints: addrPorts("10.0.0.5:51820", "10.0.0.5:51820")},
			want: map[string]string{
				discovery.AnnotationWireGuardKey:   keyA,
				discovery.AnnotationOverlayAddress: "",
				discovery.AnnotationEndpoints:      "10.0.0.5:51820",
			},
		},
		{
			name: "no endpoints",
			self: discovery.Self{WireGuardKey: keyA, Overlay: overlay},
			want: map[string]string{
				discovery.AnnotationWireGuardKey:   keyA,
				discovery.AnnotationOverlayAddress: "fd7a:115c:a1e0::1",
				discovery.AnnotationEndpoints:      "",
			},
		},
		{name: "bad key", self: discovery.Self{WireGuardKey: "abc"}, wantErr: "not a WireGuard public key"},
		{name: "port zero", self: discovery.Self{WireGuardKey: keyA, Endpoints: addrPorts("10.0.0.5:0")}, wantErr: "port must be"},
		{name: "unspecified address", self: discovery.Self{WireGuardKey: keyA, Endpoints: addrPorts("0.0.0.0:51820")}, wantErr: "not a unicast"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := selfAnnotations(tc.self)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("annotations = %v, want %v", got, tc.want)
			}
			// What a node publishes, the other nodes accept.
			n, _, err := convertNode(node("edge-1", got))
			if err != nil || !reflect.DeepEqual(n.Endpoints, dedupe(tc.self.Endpoints)) {
				t.Errorf("other nodes read %+v, %v", n, err)
			}
		})
	}
}

func dedupe(eps []netip.AddrPort) []netip.AddrPort {
	var out []netip.AddrPort
	for _, ap := range eps {
		if !slices.Contains(out, ap) {
			out = append(out, ap)
		}
	}
	return out
}

// nodeWatch watches the fake's Nodes from the test's side.
type nodeWatch struct{ w watch.Interface }

func watchNodes(t *testing.T, client *fake.Clientset) *nodeWatch {
	t.Helper()
	w, err := client.CoreV1().Nodes().Watch(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Stop)
	return &nodeWatch{w}
}

// until waits for an event of Node name that satisfies ok and returns the Node.
func (nw *nodeWatch) until(t *testing.T, name, what string, ok func(*corev1.Node) bool) *corev1.Node {
	t.Helper()
	timeout := time.After(deadline)
	for {
		select {
		case ev := <-nw.w.ResultChan():
			if n, isNode := ev.Object.(*corev1.Node); isNode && n.Name == name && ev.Type != watch.Deleted && ok(n) {
				return n
			}
		case <-timeout:
			t.Fatalf("Node %s: not %s within %v", name, what, deadline)
			return nil
		}
	}
}

func TestPublish(t *testing.T) {
	edge1 := node("edge-1", map[string]string{"other": "kept"})
	edge1.Status.Capacity = corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("2")}
	client := fake.NewClientset(edge1, node("edge-2", nil))
	ws := watchWatches(client)
	nw := watchNodes(t, client)
	src, log := newSource(t, Config{Client: fakeClient{client}, NodeName: "edge-1"})

	self := discovery.Self{WireGuardKey: keyA, Overlay: netip.MustParseAddr("fd7a::1"), Endpoints: addrPorts("10.0.0.1:51820", "[fd00::1]:51820")}
	want, err := selfAnnotations(self)
	if err != nil {
		t.Fatal(err)
	}
	src.Publish(self) // before Run
	r := startRun(t, src)
	n := nw.until(t, "edge-1", "annotated", func(n *corev1.Node) bool { return hasAll(n.Annotations, want) })
	if n.Annotations["other"] != "kept" || n.Status.Capacity.Cpu().String() != "2" {
		t.Errorf("the patch touched more than the mesh annotations: %+v", n)
	}
	if want[discovery.AnnotationEndpoints] != "10.0.0.1:51820,[fd00::1]:51820" {
		t.Errorf("endpoints annotation = %q", want[discovery.AnnotationEndpoints])
	}
	log.wait(t, "published this node's WireGuard key", "node=edge-1")
	r.next(t, log)

	// Someone removes the annotations: they come back.
	ws.wait(t, coreResources...)
	n, err = client.CoreV1().Nodes().Get(context.Background(), "edge-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n.Annotations = map[string]string{"other": "kept", discovery.AnnotationEndpoints: "10.9.9.9:1"}
	if _, err := client.CoreV1().Nodes().Update(context.Background(), n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	nw.until(t, "edge-1", "stripped of its key", func(n *corev1.Node) bool { return !hasAll(n.Annotations, want) })
	nw.until(t, "edge-1", "annotated again", func(n *corev1.Node) bool { return hasAll(n.Annotations, want) })

	// Publish while Run runs: the new endpoints replace the old.
	self.Endpoints = addrPorts("10.0.0.2:51820")
	src.Publish(self)
	nw.until(t, "edge-1", "given the new endpoints", func(n *corev1.Node) bool {
		return n.Annotations[discovery.AnnotationEndpoints] == "10.0.0.2:51820"
	})
	if n, _ := client.CoreV1().Nodes().Get(context.Background(), "edge-2", metav1.GetOptions{}); len(n.Annotations) != 0 {
		t.Errorf("another Node was annotated: %v", n.Annotations)
	}
}

func TestPublishRetries(t *testing.T) {
	tests := []struct {
		name  string
		setup func(*fake.Clientset) (fix func())
		want  []string // in the error log line
	}{
		{
			name: "Node missing until created",
			setup: func(c *fake.Clientset) func() {
				return func() {
					if _, err := c.CoreV1().Nodes().Create(context.Background(), node("edge-1", nil), metav1.CreateOptions{}); err != nil {
						panic(err)
					}
				}
			},
			want: []string{"Node edge-1 not found", "spec.nodeName"},
		},
		{
			name: "patch forbidden until RBAC is fixed",
			setup: func(c *fake.Clientset) func() {
				if _, err := c.CoreV1().Nodes().Create(context.Background(), node("edge-1", nil), metav1.CreateOptions{}); err != nil {
					panic(err)
				}
				allowed := make(chan struct{})
				c.PrependReactor("patch", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
					select {
					case <-allowed:
						return false, nil, nil
					default:
						return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "nodes"}, "edge-1", errors.New("RBAC: no"))
					}
				})
				return func() { close(allowed) }
			},
			want: []string{"ClusterRole", "patch on nodes"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			client := fake.NewClientset()
			fix := tc.setup(client)
			nw := watchNodes(t, client)
			src, log := newSource(t, Config{Client: fakeClient{client}, NodeName: "edge-1"})
			src.retryMin = 10 * time.Millisecond
			self := discovery.Self{WireGuardKey: keyA, Endpoints: addrPorts("10.0.0.1:51820")}
			src.Publish(self)
			startRun(t, src)
			line := log.wait(t, append([]string{"level=ERROR", "cannot publish", "retry_in="}, tc.want...)...)
			t.Logf("logged: %s", line)
			fix()
			want, _ := selfAnnotations(self)
			nw.until(t, "edge-1", "annotated after the fix", func(n *corev1.Node) bool { return hasAll(n.Annotations, want) })
		})
	}
}

func TestPublishRejects(t *testing.T) {
	src, log := newSource(t, Config{Client: fakeClient{fake.NewClientset()}})
	src.Publish(discovery.Self{WireGuardKey: keyA})
	log.wait(t, "level=ERROR", "no node name configured")

	src, log = newSource(t, Config{Client: fakeClient{fake.NewClientset()}, NodeName: "edge-1"})
	src.Publish(discovery.Self{WireGuardKey: "bad"})
	log.wait(t, "level=ERROR", "not publishing", "not a WireGuard public key")
	if src.wanted() != nil {
		t.Errorf("a bad self was recorded: %v", src.wanted())
	}
}

func TestPublishRelay(t *testing.T) {
	const a1, a2 = "/ip4/198.51.100.1/udp/4001/quic-v1/p2p/12D3KooWA", "/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWA"
	ctx := context.Background()

	t.Run("patches its key, keeps the others", func(t *testing.T) {
		client := fake.NewClientset(relaySecret(map[string]string{"12D3KooWB": "/dns4/b/tcp/1/p2p/12D3KooWB"}))
		log := newLogBuffer()
		err := PublishRelay(ctx, RelayConfig{Client: fakeClient{client}, Logger: log.logger(), Namespace: "edgewire", Name: "relays",
			Key: "12D3KooWA", Addrs: []string{a1, a2}})
		if err != nil {
			t.Fatal(err)
		}
		sec, err := client.CoreV1().Secrets("edgewire").Get(ctx, "relays", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got := string(sec.Data["12D3KooWA"]); got != a1+"\n"+a2 {
			t.Errorf("data[12D3KooWA] = %q, want the addresses, newline-separated", got)
		}
		if len(sec.Data) != 2 {
			t.Errorf("data = %v, want the other relay's key kept", sec.Data)
		}
		// What the relay writes, the agents read.
		if got, _ := relayAddrs(sec); !reflect.DeepEqual(got, []string{"/dns4/b/tcp/1/p2p/12D3KooWB", a2, a1}) {
			t.Errorf("agents read %q", got)
		}
		log.wait(t, "published the relay's addresses", "secret=edgewire/relays")
	})

	t.Run("Secret missing until applied", func(t *testing.T) {
		client := fake.NewClientset()
		log := newLogBuffer()
		done := make(chan error, 1)
		go func() {
			done <- PublishRelay(ctx, RelayConfig{Client: fakeClient{client}, Logger: log.logger(), Namespace: "edgewire", Name: "relays",
				Key: "12D3KooWA", Addrs: []string{a1}})
		}()
		log.wait(t, "level=ERROR", "Secret edgewire/relays not found", "deploy/", "never creates it")
		if _, err := client.CoreV1().Secrets("edgewire").Create(ctx, relaySecret(nil), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("PublishRelay = %v after the Secret was created", err)
			}
		case <-time.After(deadline):
			t.Fatalf("PublishRelay did not retry within %v", deadline)
		}
		sec, _ := client.CoreV1().Secrets("edgewire").Get(ctx, "relays", metav1.GetOptions{})
		if string(sec.Data["12D3KooWA"]) != a1 {
			t.Errorf("data = %q", sec.Data)
		}
	})

	t.Run("forbidden until cancelled", func(t *testing.T) {
		client := fake.NewClientset(relaySecret(nil))
		client.PrependReactor("patch", "secrets", func(k8stesting.Action) (bool, runtime.Object, error) {
			return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "secrets"}, "relays", errors.New("RBAC: no"))
		})
		log := newLogBuffer()
		ctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() {
			done <- PublishRelay(ctx, RelayConfig{Client: fakeClient{client}, Logger: log.logger(), Namespace: "edgewire", Name: "relays",
				Key: "12D3KooWA", Addrs: []string{a1}})
		}()
		log.wait(t, "level=ERROR", "get and patch on secrets", "resourceNames [relays]")
		cancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "forbidden") {
				t.Errorf("PublishRelay = %v, want context.Canceled with the last error", err)
			}
		case <-time.After(deadline):
			t.Fatalf("PublishRelay did not return within %v of cancel", deadline)
		}
	})

	for _, tc := range []struct {
		name string
		cfg  RelayConfig
		want string
	}{
		{name: "key with a slash", cfg: RelayConfig{Namespace: "n", Name: "r", Key: "a/b", Addrs: []string{a1}}, want: "not a Secret data key"},
		{name: "no key", cfg: RelayConfig{Namespace: "n", Name: "r", Addrs: []string{a1}}, want: "not a Secret data key"},
		{name: "no addresses", cfg: RelayConfig{Namespace: "n", Name: "r", Key: "k"}, want: "no addresses"},
		{name: "address with a comma", cfg: RelayConfig{Namespace: "n", Name: "r", Key: "k", Addrs: []string{a1 + "," + a2}}, want: "comma or newline"},
		{name: "no Secret name", cfg: RelayConfig{Namespace: "n", Key: "k", Addrs: []string{a1}}, want: "namespace or name"},
	} {
		t.Run("invalid: "+tc.name, func(t *testing.T) {
			tc.cfg.Client = fakeClient{fake.NewClientset()}
			ctx, cancel := context.WithTimeout(ctx, deadline)
			defer cancel()
			err := PublishRelay(ctx, tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) || ctx.Err() != nil {
				t.Errorf("PublishRelay = %v, want an immediate error containing %q", err, tc.want)
			}
		})
	}
}
