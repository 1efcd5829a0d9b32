package k8s

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/rest"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/klog/v2"

	"github.com/edgewire/edgewire/discovery"
)

// coreResources are the resources every Run watches.
var coreResources = []string{"services", "endpointslices", "nodes"}

func webObjects() []runtime.Object {
	return []runtime.Object{
		service("shop", "web", nil),
		endpointSlice("shop", "web-a", "web", discoveryv1.AddressTypeIPv4,
			[]discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}},
			discoveryv1.Endpoint{Addresses: []string{"10.0.0.1"}, NodeName: ptr("edge-1")}),
		node("edge-1", map[string]string{discovery.AnnotationWireGuardKey: keyA, discovery.AnnotationEndpoints: "192.168.1.1:51820"}),
	}
}

func serviceKeys(s *discovery.Snapshot) string {
	var keys []string
	for _, svc := range s.Services {
		keys = append(keys, svc.Key())
	}
	return strings.Join(keys, ",")
}

// newSource is New over client with a logger writing to the returned buffer.
func newSource(t *testing.T, cfg Config) (*Source, *logBuffer) {
	t.Helper()
	log := newLogBuffer()
	cfg.Logger = log.logger()
	src, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return src, log
}

// TestRunFollowsChanges checks the first snapshot after sync and that each change of the API
// reaches update within a second, while changes that do not alter the catalog do not.
func TestRunFollowsChanges(t *testing.T) {
	client := fake.NewClientset(webObjects()...)
	w := watchWatches(client)
	src, log := newSource(t, Config{Client: fakeClient{client}, CachePath: filepath.Join(t.TempDir(), "catalog-k8s.json")})
	r := startRun(t, src)

	first := r.next(t, log)
	want := convert(objects{
		services: []*corev1.Service{webObjects()[0].(*corev1.Service)},
		slices:   []*discoveryv1.EndpointSlice{webObjects()[1].(*discoveryv1.EndpointSlice)},
		nodes:    []*corev1.Node{webObjects()[2].(*corev1.Node)},
	}).snap
	if !reflect.DeepEqual(first, want) {
		t.Fatalf("first snapshot:\n got %s\nwant %s", encodeSnapshot(first), encodeSnapshot(want))
	}
	if len(first.Services[0].Endpoints) != 1 || len(first.Nodes) != 1 || first.Nodes[0].WireGuardKey != keyA {
		t.Fatalf("first snapshot lacks the endpoint or node: %s", encodeSnapshot(first))
	}
	w.wait(t, coreResources...)

	ctx := context.Background()
	var slowest time.Duration
	// change applies f to the API and waits for the update it causes.
	change := func(what string, f func() error) *discovery.Snapshot {
		t.Helper()
		start := time.Now()
		if err := f(); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		s := r.next(t, log)
		took := time.Since(start)
		slowest = max(slowest, took)
		// A correctness bound, not a performance goal (make bench and TestKubernetes measure the
		// latency): generous, so a loaded CI machine does not fail it.
		if took > deadline {
			t.Errorf("%s reached update after %v, want well within %v", what, took, deadline)
		}
		return s
	}

	s := change("create a Service", func() error {
		_, err := client.CoreV1().Services("shop").Create(ctx, service("shop", "api", nil), metav1.CreateOptions{})
		return err
	})
	if got := serviceKeys(s); got != "shop/api,shop/web" {
		t.Errorf("services = %s, want shop/api,shop/web", got)
	}

	s = change("add an endpoint", func() error {
		es := webObjects()[1].(*discoveryv1.EndpointSlice)
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{"10.0.0.2"}})
		_, err := client.DiscoveryV1().EndpointSlices("shop").Update(ctx, es, metav1.UpdateOptions{})
		return err
	})
	if eps := s.Services[1].Endpoints; len(eps) != 2 || eps[1].Addresses[0] != netip.MustParseAddr("10.0.0.2") {
		t.Errorf("web endpoints = %+v, want 10.0.0.1 and 10.0.0.2", eps)
	}

	// A label and a Node status change nothing in the catalog: the next update is the one after.
	svc := service("shop", "api", nil)
	svc.Labels = map[string]string{"team": "x"}
	if _, err := client.CoreV1().Services("shop").Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	n := webObjects()[2].(*corev1.Node)
	n.Status.Phase = corev1.NodeRunning
	if _, err := client.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	s = change("delete a Service", func() error {
		return client.CoreV1().Services("shop").Delete(ctx, "api", metav1.DeleteOptions{})
	})
	if got := serviceKeys(s); got != "shop/web" {
		t.Errorf("after the label, status and delete: services = %s, want shop/web (no update for the label or status)", got)
	}

	s = change("annotate a Node", func() error {
		n := webObjects()[2].(*corev1.Node)
		n.Annotations[discovery.AnnotationEndpoints] = "192.168.1.1:51820,[fd00::1]:51820"
		_, err := client.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{})
		return err
	})
	if eps := s.Nodes[0].Endpoints; len(eps) != 2 {
		t.Errorf("node endpoints = %v, want two", eps)
	}

	s = change("a Node with a bad key", func() error {
		_, err := client.CoreV1().Nodes().Create(ctx, node("edge-2", map[string]string{discovery.AnnotationWireGuardKey: "bad"}), metav1.CreateOptions{})
		if err != nil {
			return err
		}
		_, err = client.CoreV1().Nodes().Create(ctx, node("edge-3", nil), metav1.CreateOptions{})
		return err
	})
	// edge-2 alone changes nothing, so the update is the one with edge-3 whether or not the two
	// creations came in one burst.
	if got := nodeNames(s); got != "edge-1,edge-3" {
		t.Errorf("nodes = %s, want edge-1,edge-3 (edge-2 skipped)", got)
	}
	line := log.wait(t, "Node edge-2", discovery.AnnotationWireGuardKey, "node skipped")
	if !strings.Contains(line, "level=WARN") {
		t.Errorf("bad node logged as %q, want a warning", line)
	}
	r.stop(t)
	if c := strings.Count(log.String(), "Node edge-2"); c != 1 {
		t.Errorf("the bad node was logged %d times, want once:\n%s", c, log.String())
	}
	r.noUpdate(t)
	t.Logf("slowest change to reach update: %v", slowest)
}

func nodeNames(s *discovery.Snapshot) string {
	var names []string
	for _, n := range s.Nodes {
		names = append(names, n.Name)
	}
	return strings.Join(names, ",")
}

// closedPort returns the address of a localhost TCP port that nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// TestRunCache checks that the catalog read from the API server is saved, mode 0600, and served by
// the next Run when the API server cannot be reached.
func TestRunCache(t *testing.T) {
	path := filepath.Join(t.TempDir(), "catalog-k8s.json")
	client := fake.NewClientset(webObjects()...)
	src, log := newSource(t, Config{Client: fakeClient{client}, CachePath: path})
	r := startRun(t, src)
	live := r.next(t, log)
	r.stop(t) // the cache is written by now

	fi, err := os.Stat(path)
	if err != nil {
		t.Fatalf("no cache after a synced Run: %v", err)
	}
	if mode := fi.Mode().Perm(); mode != 0o600 {
		t.Errorf("cache mode = %v, want 0600", mode)
	}
	data, _ := os.ReadFile(path)
	if !bytes.Equal(data, encodeSnapshot(live)) {
		t.Errorf("cache = %s, want %s", data, encodeSnapshot(live))
	}

	// The same catalog again: the file is not rewritten.
	before := fi.ModTime()
	src, log = newSource(t, Config{Client: fakeClient{fake.NewClientset(webObjects()...)}, CachePath: path})
	r = startRun(t, src)
	r.next(t, log)
	r.stop(t)
	if fi, err := os.Stat(path); err != nil || !fi.ModTime().Equal(before) {
		t.Errorf("cache rewritten with the same content (mtime %v, was %v, err %v)", fi.ModTime(), before, err)
	}

	// The API server unreachable: the cache is served after SyncTimeout.
	const timeout = 200 * time.Millisecond
	src, log = newSource(t, Config{
		RESTConfig: &rest.Config{Host: "http://" + closedPort(t)}, CachePath: path, SyncTimeout: timeout,
	})
	start := time.Now()
	r = startRun(t, src)
	cached := r.next(t, log)
	if took := time.Since(start); took < timeout {
		t.Errorf("cache served after %v, before the sync timeout %v", took, timeout)
	}
	if !reflect.DeepEqual(cached, live) {
		t.Errorf("cached snapshot:\n got %s\nwant %s", encodeSnapshot(cached), encodeSnapshot(live))
	}
	log.wait(t, "level=WARN", "has not answered", "serving the cached catalog", path)
	// client-go's reflector errors reach the logger through klog.
	log.wait(t, "component=client-go", "connection refused")
	// Run returns promptly although client-go is backing off (see noWatchList).
	start = time.Now()
	r.stop(t)
	// client-go's back-off would hold Run for up to 30 s; the bound is generous for loaded machines.
	if took := time.Since(start); took > deadline {
		t.Errorf("Run took %v to return after cancel during an outage", took)
	}
	r.noUpdate(t)
}

func TestRunNoUsableCache(t *testing.T) {
	tests := []struct {
		name  string
		cache string // content of the cache file; "" for none
		want  string
	}{
		{name: "no cache file", want: "there is no cached catalog: serving an empty catalog"},
		{name: "corrupt cache file", cache: "{not json", want: "the cached catalog is unusable: serving an empty catalog"},
		{name: "other format version", cache: `{"version":99}`, want: "format version 99"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "catalog-k8s.json")
			if tc.cache != "" {
				if err := os.WriteFile(path, []byte(tc.cache), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			src, log := newSource(t, Config{
				RESTConfig: &rest.Config{Host: "http://" + closedPort(t)}, CachePath: path, SyncTimeout: 50 * time.Millisecond,
			})
			r := startRun(t, src)
			if s := r.next(t, log); !reflect.DeepEqual(s, &discovery.Snapshot{}) {
				t.Errorf("snapshot = %s, want an empty one", encodeSnapshot(s))
			}
			log.wait(t, "level=WARN", tc.want)
		})
	}
}

// failList makes the fake fail to list resource until the returned function is called, as an
// unreachable API server would.
func failList(client *fake.Clientset, resource string) (recover func()) {
	up := make(chan struct{})
	client.PrependReactor("list", resource, func(k8stesting.Action) (bool, runtime.Object, error) {
		select {
		case <-up:
			return false, nil, nil
		default:
			return true, nil, errors.New("connection refused (test)")
		}
	})
	return func() { close(up) }
}

// TestRunReconciles checks that the live catalog replaces the cached one once the API server
// answers.
func TestRunReconciles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "catalog-k8s.json")
	old := &discovery.Snapshot{Services: []*discovery.Service{{Namespace: "shop", Name: "old"}},
		Relays: []string{"/dns4/relay/tcp/1/p2p/A"}}
	if err := writeCache(path, encodeSnapshot(old)); err != nil {
		t.Fatal(err)
	}
	client := fake.NewClientset(webObjects()...)
	recover := failList(client, "services")
	src, log := newSource(t, Config{Client: fakeClient{client}, CachePath: path, SyncTimeout: 50 * time.Millisecond})
	r := startRun(t, src)
	if s := r.next(t, log); !reflect.DeepEqual(s, old) {
		t.Fatalf("first snapshot = %s, want the cached one", encodeSnapshot(s))
	}
	recover()
	s := r.next(t, log) // client-go's reflector retries within about a second
	if got := serviceKeys(s); got != "shop/web" || s.Relays != nil {
		t.Errorf("after the API server answered: services %s, relays %q; want shop/web and no relays", got, s.Relays)
	}
	log.wait(t, "catalog read from the API server")
	r.stop(t)
	if data, _ := os.ReadFile(path); !bytes.Equal(data, encodeSnapshot(s)) {
		t.Errorf("cache = %s, want the live catalog", data)
	}
}

func TestRunRelaySecret(t *testing.T) {
	const relayA, relayB = "/ip4/198.51.100.1/tcp/4001/p2p/A", "/ip4/198.51.100.2/tcp/4001/p2p/B"
	other := relaySecret(map[string]string{"x": "/ip4/203.0.113.1/tcp/1/p2p/X"})
	other.Name = "not-the-relays"
	client := fake.NewClientset(append(webObjects(), relaySecret(map[string]string{"A": relayA}), other)...)
	w := watchWatches(client)
	src, log := newSource(t, Config{Client: fakeClient{client}, RelaySecretNamespace: "edgewire", RelaySecretName: "relays"})
	r := startRun(t, src)
	if s := r.next(t, log); !slices.Equal(s.Relays, []string{relayA}) {
		t.Fatalf("relays = %q, want %q", s.Relays, relayA)
	}
	w.wait(t, append(coreResources, "secrets")...)
	sec := relaySecret(map[string]string{"A": relayA, "B": relayB + "\n" + relayA})
	if _, err := client.CoreV1().Secrets("edgewire").Update(context.Background(), sec, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if s := r.next(t, log); !slices.Equal(s.Relays, []string{relayA, relayB}) {
		t.Errorf("relays = %q, want %q", s.Relays, []string{relayA, relayB})
	}
	if err := client.CoreV1().Secrets("edgewire").Delete(context.Background(), "relays", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if s := r.next(t, log); s.Relays != nil {
		t.Errorf("relays after the Secret was deleted = %q, want none", s.Relays)
	}
}

// TestRunRelaySecretUnreadable checks that the catalog is not held up by a relay Secret that
// cannot be read (RBAC), and that the cached relays stand in for it.
func TestRunRelaySecretUnreadable(t *testing.T) {
	const relayA = "/ip4/198.51.100.1/tcp/4001/p2p/A"
	path := filepath.Join(t.TempDir(), "catalog-k8s.json")
	if err := writeCache(path, encodeSnapshot(&discovery.Snapshot{Relays: []string{relayA}})); err != nil {
		t.Fatal(err)
	}
	client := fake.NewClientset(webObjects()...)
	failList(client, "secrets")
	src, log := newSource(t, Config{Client: fakeClient{client}, CachePath: path, SyncTimeout: 50 * time.Millisecond,
		RelaySecretNamespace: "edgewire", RelaySecretName: "relays"})
	r := startRun(t, src)
	s := r.next(t, log)
	if got := serviceKeys(s); got != "shop/web" || !slices.Equal(s.Relays, []string{relayA}) {
		t.Errorf("snapshot: services %s, relays %q; want shop/web and the cached relay", got, s.Relays)
	}
	log.wait(t, "level=WARN", "relay Secret has not been read", "edgewire/relays")
}

func TestRunErrors(t *testing.T) {
	src, log := newSource(t, Config{Client: fakeClient{fake.NewClientset()}})
	if err := src.Run(context.Background(), nil); err == nil {
		t.Error("Run with a nil update function succeeded")
	}
	if err := new(Source).Run(context.Background(), func(*discovery.Snapshot) {}); err == nil {
		t.Error("Run of a Source not made by New succeeded")
	}
	r := startRun(t, src)
	r.next(t, log)
	if err := src.Run(context.Background(), func(*discovery.Snapshot) {}); err == nil || !strings.Contains(err.Error(), "already running") {
		t.Errorf("second concurrent Run = %v, want an error", err)
	}
	r.stop(t)
	// Run may run again after it returned.
	r = startRun(t, src)
	r.next(t, log)
}

func TestNew(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBERNETES_SERVICE_PORT", "")
	tests := []struct {
		name string
		cfg  Config
		want string // error substring; "" for success
	}{
		{name: "fake client", cfg: Config{Client: fakeClient{fake.NewClientset()}}},
		{name: "REST config, no network", cfg: Config{RESTConfig: &rest.Config{Host: "https://192.0.2.1:6443"}}},
		{name: "not in a pod", cfg: Config{}, want: "set --kubeconfig"},
		{name: "missing kubeconfig", cfg: Config{Kubeconfig: "/nonexistent/kubeconfig"}, want: "kubeconfig /nonexistent/kubeconfig"},
		{name: "relay Secret without namespace", cfg: Config{Client: fakeClient{fake.NewClientset()}, RelaySecretName: "relays"}, want: "no namespace"},
		{name: "negative sync timeout", cfg: Config{Client: fakeClient{fake.NewClientset()}, SyncTimeout: -time.Second}, want: "negative"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg)
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("New: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("New error = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestKlogRouted(t *testing.T) {
	_, log := newSource(t, Config{Client: fakeClient{fake.NewClientset()}})
	klog.ErrorS(errors.New("boom"), "reflector trouble", "resource", "services")
	line := log.wait(t, "reflector trouble")
	if !containsAll(line, []string{"level=ERROR", "component=client-go", "boom", "resource=services"}) {
		t.Errorf("klog line = %q", line)
	}
}
