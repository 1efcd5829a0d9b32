package k8s

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/edgewire/edgewire/discovery"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// deadline is how long a test waits for something that should take well under a second (a
// change reaching update: ~20 ms), leaving room for a loaded machine and -race.
const deadline = 5 * time.Second

// Two WireGuard public keys, as `wg pubkey` prints them.
var (
	keyA = base64.StdEncoding.EncodeToString([]byte(strings.Repeat("a", 32)))
	keyB = base64.StdEncoding.EncodeToString([]byte(strings.Repeat("b", 32)))
)

// logBuffer collects a logger's text output and wakes waiters on every write; safe for concurrent
// use.
type logBuffer struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	wrote chan struct{} // capacity 1
}

func newLogBuffer() *logBuffer { return &logBuffer{wrote: make(chan struct{}, 1)} }

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	nudge(b.wrote)
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *logBuffer) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// line returns the first log line that contains all of want, or "".
func (b *logBuffer) line(want ...string) string {
	for l := range strings.Lines(b.String()) {
		if containsAll(l, want) {
			return l
		}
	}
	return ""
}

// wait waits until a log line contains all of want and returns it.
func (b *logBuffer) wait(t *testing.T, want ...string) string {
	t.Helper()
	timeout := time.After(deadline)
	for {
		if l := b.line(want...); l != "" {
			return l
		}
		select {
		case <-b.wrote:
		case <-timeout:
			t.Fatalf("no log line containing %q within %v; log:\n%s", want, deadline, b.String())
		}
	}
}

func containsAll(s string, subs []string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

// fakeClient is the package's Client over client-go's fake clientset, whose reactors the tests
// use to watch and break the API.
type fakeClient struct{ *fake.Clientset }

var _ Client = fakeClient{}

func (c fakeClient) List(ctx context.Context, res Resource, namespace string, opts metav1.ListOptions) (runtime.Object, error) {
	var list runtime.Object
	var err error
	switch res {
	case ResourceServices:
		list, err = c.CoreV1().Services(namespace).List(ctx, opts)
	case ResourceEndpointSlices:
		list, err = c.DiscoveryV1().EndpointSlices(namespace).List(ctx, opts)
	case ResourceNodes:
		list, err = c.CoreV1().Nodes().List(ctx, opts)
	case ResourceSecrets:
		list, err = c.CoreV1().Secrets(namespace).List(ctx, opts)
	default:
		return nil, fmt.Errorf("fake client: unknown resource %q", res)
	}
	if err != nil {
		return nil, err
	}
	return list, nil
}

func (c fakeClient) Watch(ctx context.Context, res Resource, namespace string, opts metav1.ListOptions) (watch.Interface, error) {
	switch res {
	case ResourceServices:
		return c.CoreV1().Services(namespace).Watch(ctx, opts)
	case ResourceEndpointSlices:
		return c.DiscoveryV1().EndpointSlices(namespace).Watch(ctx, opts)
	case ResourceNodes:
		return c.CoreV1().Nodes().Watch(ctx, opts)
	case ResourceSecrets:
		return c.CoreV1().Secrets(namespace).Watch(ctx, opts)
	}
	return nil, fmt.Errorf("fake client: unknown resource %q", res)
}

func (c fakeClient) MergePatch(ctx context.Context, res Resource, namespace, name string, patch []byte, opts metav1.PatchOptions) error {
	var err error
	switch res {
	case ResourceNodes:
		_, err = c.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, opts)
	case ResourceSecrets:
		_, err = c.CoreV1().Secrets(namespace).Patch(ctx, name, types.MergePatchType, patch, opts)
	default:
		err = fmt.Errorf("fake client: the package never patches %q", res)
	}
	return err
}

// Kubernetes objects for tests.

func service(ns, name string, f func(*corev1.Service)) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{
			ClusterIP: "10.96.0.80", ClusterIPs: []string{"10.96.0.80"},
			Ports: []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80}},
		},
	}
	if f != nil {
		f(s)
	}
	return s
}

func endpointSlice(ns, name, svc string, at discoveryv1.AddressType, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: at, Endpoints: eps, Ports: ports,
	}
}

func node(name string, ann map[string]string) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: ann}}
}

func relaySecret(data map[string]string) *corev1.Secret {
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "edgewire", Name: "relays"}, Data: map[string][]byte{}}
	for k, v := range data {
		s.Data[k] = []byte(v)
	}
	return s
}

func ptr[T any](v T) *T { return &v }

// watches records which resources a fake clientset has started watches on, so that a test
// changes objects only once the informers watch (the fake drops events before that).
type watches struct {
	mu      sync.Mutex
	started map[string]bool
	changed chan struct{} // capacity 1
}

func watchWatches(c *fake.Clientset) *watches {
	w := &watches{started: make(map[string]bool), changed: make(chan struct{}, 1)}
	c.PrependWatchReactor("*", func(a k8stesting.Action) (bool, watch.Interface, error) {
		w.mu.Lock()
		w.started[a.GetResource().Resource] = true
		w.mu.Unlock()
		nudge(w.changed)
		return false, nil, nil // on to the fake's watch
	})
	return w
}

// wait waits until every resource has a watch.
func (w *watches) wait(t *testing.T, resources ...string) {
	t.Helper()
	timeout := time.After(deadline)
	for {
		w.mu.Lock()
		all := true
		for _, r := range resources {
			all = all && w.started[r]
		}
		w.mu.Unlock()
		if all {
			return
		}
		select {
		case <-w.changed:
		case <-timeout:
			t.Fatalf("informers did not watch %v within %v", resources, deadline)
		}
	}
}

// run is a Source running in the background for a test.
type run struct {
	updates chan *discovery.Snapshot
	cancel  context.CancelFunc
	done    chan error
}

// startRun runs src; the test's cleanup stops it and checks that Run returned nil.
func startRun(t *testing.T, src *Source) *run {
	t.Helper()
	r := &run{updates: make(chan *discovery.Snapshot, 64), done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.done <- src.Run(ctx, func(s *discovery.Snapshot) { r.updates <- s }) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// stop cancels Run and waits for it to return nil; later calls do nothing.
func (r *run) stop(t *testing.T) {
	t.Helper()
	if r.done == nil {
		return
	}
	r.cancel()
	select {
	case err := <-r.done:
		if err != nil {
			t.Errorf("Run() = %v, want nil after cancel", err)
		}
	case <-time.After(deadline):
		t.Errorf("Run did not return within %v after cancel", deadline)
	}
	r.done = nil
}

// next waits for the next update.
func (r *run) next(t *testing.T, log *logBuffer) *discovery.Snapshot {
	t.Helper()
	select {
	case s := <-r.updates:
		return s
	case err := <-r.done:
		t.Fatalf("Run returned %v before an update", err)
	case <-time.After(deadline):
		t.Fatalf("no update within %v; log:\n%s", deadline, log.String())
	}
	return nil
}

// noUpdate fails if an update is pending.
func (r *run) noUpdate(t *testing.T) {
	t.Helper()
	select {
	case s := <-r.updates:
		t.Fatalf("unexpected update: %s", encodeSnapshot(s))
	default:
	}
}
