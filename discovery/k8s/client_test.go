package k8s

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"

	"github.com/edgewire/edgewire/discovery"
)

// apiRequest is a request the test API server received.
type apiRequest struct {
	method, path, contentType, accept, body string
	query                                   url.Values
}

// testAPI is an HTTP server that answers the requests of restClient as kube-apiserver would, in
// JSON: lists from lists, watches with the events of watches (then held open until the client
// leaves), patches with 200 or the Status in patchStatus.
type testAPI struct {
	srv  *httptest.Server
	stop chan struct{}
	// got wakes waitRequest on every request (capacity 1).
	got chan struct{}

	mu       sync.Mutex
	requests []apiRequest
	// lists and watches map a path (/api/v1/services) to the list object and the watch events.
	lists   map[string]runtime.Object
	watches map[string][]watch.Event
	// patchStatus maps a path to the failure its PATCH gets.
	patchStatus map[string]*metav1.Status
}

func newTestAPI(t *testing.T) *testAPI {
	a := &testAPI{
		stop:        make(chan struct{}),
		got:         make(chan struct{}, 1),
		lists:       make(map[string]runtime.Object),
		watches:     make(map[string][]watch.Event),
		patchStatus: make(map[string]*metav1.Status),
	}
	a.srv = httptest.NewServer(http.HandlerFunc(a.serve))
	t.Cleanup(func() {
		close(a.stop)
		a.srv.Close()
	})
	return a
}

func (a *testAPI) config() *rest.Config { return &rest.Config{Host: a.srv.URL} }

// typed sets the apiVersion and kind that the API server writes into what it sends.
func typed(obj runtime.Object) runtime.Object {
	gvks, _, err := scheme.ObjectKinds(obj)
	if err != nil {
		panic(err)
	}
	obj = obj.DeepCopyObject()
	obj.GetObjectKind().SetGroupVersionKind(gvks[0])
	return obj
}

func (a *testAPI) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	a.mu.Lock()
	a.requests = append(a.requests, apiRequest{method: r.Method, path: r.URL.Path, query: r.URL.Query(),
		contentType: r.Header.Get("Content-Type"), accept: r.Header.Get("Accept"), body: string(body)})
	list, events, status := a.lists[r.URL.Path], a.watches[r.URL.Path], a.patchStatus[r.URL.Path]
	a.mu.Unlock()
	nudge(a.got)
	w.Header().Set("Content-Type", "application/json")

	switch {
	case r.Method == http.MethodPatch && status != nil:
		w.WriteHeader(int(status.Code))
		json.NewEncoder(w).Encode(status)
	case r.Method == http.MethodPatch:
		json.NewEncoder(w).Encode(typed(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "patched"}}))
	case r.Method == http.MethodGet && r.URL.Query().Get("watch") == "true":
		w.WriteHeader(http.StatusOK)
		enc := json.NewEncoder(w)
		for _, ev := range events {
			enc.Encode(map[string]any{"type": ev.Type, "object": typed(ev.Object)})
		}
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
		case <-a.stop:
		}
	case r.Method == http.MethodGet && list != nil:
		json.NewEncoder(w).Encode(typed(list))
	default:
		w.WriteHeader(http.StatusNotFound)
		json.NewEncoder(w).Encode(failure(http.StatusNotFound, metav1.StatusReasonNotFound))
	}
}

// failure is the Status of a failed request, as the API server sends it.
func failure(code int32, reason metav1.StatusReason) *metav1.Status {
	return &metav1.Status{TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"}, Status: metav1.StatusFailure,
		Reason: reason, Code: code, Message: "test API: " + string(reason)}
}

// received returns the requests received so far.
func (a *testAPI) received() []apiRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]apiRequest(nil), a.requests...)
}

// waitRequest waits until the server has received a request for which match is true.
func (a *testAPI) waitRequest(t *testing.T, what string, match func(apiRequest) bool) {
	t.Helper()
	timeout := time.After(deadline)
	for {
		if slices.ContainsFunc(a.received(), match) {
			return
		}
		select {
		case <-a.got:
		case <-timeout:
			t.Fatalf("no %s within %v; requests: %+v", what, deadline, a.received())
		}
	}
}

func TestRESTClient(t *testing.T) {
	api := newTestAPI(t)
	api.lists["/api/v1/services"] = &corev1.ServiceList{ListMeta: metav1.ListMeta{ResourceVersion: "7"},
		Items: []corev1.Service{*service("shop", "web", nil)}}
	api.lists["/api/v1/namespaces/edgewire/secrets"] = &corev1.SecretList{Items: []corev1.Secret{*relaySecret(map[string]string{"A": "x"})}}
	slice := webObjects()[1].(*discoveryv1.EndpointSlice)
	api.watches["/apis/discovery.k8s.io/v1/endpointslices"] = []watch.Event{{Type: watch.Added, Object: slice}}
	api.patchStatus["/api/v1/namespaces/edgewire/secrets/relays"] = failure(http.StatusForbidden, metav1.StatusReasonForbidden)
	api.patchStatus["/api/v1/nodes/gone"] = failure(http.StatusNotFound, metav1.StatusReasonNotFound)

	// klog is process-global: route it before anything logs through it, as New does.
	routeKlog(newLogBuffer().logger())
	c, err := newRESTClient(api.config())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()

	// List, all namespaces.
	obj, err := c.List(ctx, ResourceServices, "", metav1.ListOptions{ResourceVersion: "0", Limit: 500})
	if err != nil {
		t.Fatalf("List services: %v", err)
	}
	svcs, ok := obj.(*corev1.ServiceList)
	if !ok || len(svcs.Items) != 1 || svcs.Items[0].Name != "web" || svcs.Items[0].Spec.Ports[0].Port != 80 || svcs.ResourceVersion != "7" {
		t.Errorf("List services = %#v", obj)
	}

	// List, one namespace, with a field selector.
	obj, err = c.List(ctx, ResourceSecrets, "edgewire", metav1.ListOptions{FieldSelector: "metadata.name=relays"})
	if err != nil {
		t.Fatalf("List secrets: %v", err)
	}
	if secs, ok := obj.(*corev1.SecretList); !ok || len(secs.Items) != 1 || string(secs.Items[0].Data["A"]) != "x" {
		t.Errorf("List secrets = %#v", obj)
	}

	// Watch, in the discovery.k8s.io group.
	w, err := c.Watch(ctx, ResourceEndpointSlices, "", metav1.ListOptions{ResourceVersion: "7", AllowWatchBookmarks: true})
	if err != nil {
		t.Fatalf("Watch endpointslices: %v", err)
	}
	select {
	case ev := <-w.ResultChan():
		es, ok := ev.Object.(*discoveryv1.EndpointSlice)
		if ev.Type != watch.Added || !ok || es.Name != "web-a" || es.Endpoints[0].Addresses[0] != "10.0.0.1" {
			t.Errorf("watch event = %v %#v", ev.Type, ev.Object)
		}
	case <-ctx.Done():
		t.Fatal("no watch event")
	}
	w.Stop()

	// Merge patches: a cluster-scoped one that succeeds, a namespaced one that is refused.
	patch := []byte(`{"metadata":{"annotations":{"a":"b"}}}`)
	if err := c.MergePatch(ctx, ResourceNodes, "", "edge-1", patch, metav1.PatchOptions{FieldManager: fieldManager}); err != nil {
		t.Errorf("MergePatch node: %v", err)
	}
	err = c.MergePatch(ctx, ResourceSecrets, "edgewire", "relays", patch, metav1.PatchOptions{FieldManager: fieldManager})
	if !apierrors.IsForbidden(err) || !strings.Contains(secretPatchHint(err, "edgewire", "relays"), "resourceNames [relays]") {
		t.Errorf("MergePatch of a forbidden Secret = %v, want a Forbidden status error", err)
	}
	err = c.MergePatch(ctx, ResourceNodes, "", "gone", patch, metav1.PatchOptions{})
	if !apierrors.IsNotFound(err) {
		t.Errorf("MergePatch of a missing Node = %v, want a NotFound status error", err)
	}
	if _, err := c.List(ctx, Resource("pods"), "", metav1.ListOptions{}); err == nil {
		t.Error("List of a resource the package does not use succeeded")
	}

	// What went over the wire, as client-go's generated clients send it.
	const accept = "application/vnd.kubernetes.protobuf,application/json"
	want := []apiRequest{
		{method: "GET", path: "/api/v1/services", query: url.Values{"resourceVersion": {"0"}, "limit": {"500"}}},
		{method: "GET", path: "/api/v1/namespaces/edgewire/secrets", query: url.Values{"fieldSelector": {"metadata.name=relays"}}},
		{method: "GET", path: "/apis/discovery.k8s.io/v1/endpointslices",
			query: url.Values{"watch": {"true"}, "resourceVersion": {"7"}, "allowWatchBookmarks": {"true"}}},
		{method: "PATCH", path: "/api/v1/nodes/edge-1", query: url.Values{"fieldManager": {"edgewire"}},
			contentType: "application/merge-patch+json", body: string(patch)},
		{method: "PATCH", path: "/api/v1/namespaces/edgewire/secrets/relays", query: url.Values{"fieldManager": {"edgewire"}},
			contentType: "application/merge-patch+json", body: string(patch)},
		{method: "PATCH", path: "/api/v1/nodes/gone", query: url.Values{},
			contentType: "application/merge-patch+json", body: string(patch)},
	}
	got := api.received()
	for i := range got {
		if got[i].accept != accept {
			t.Errorf("request %d (%s %s): Accept %q, want %q", i, got[i].method, got[i].path, got[i].accept, accept)
		}
		got[i].accept = ""
		if got[i].method == "GET" {
			got[i].contentType = "" // no body
		}
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("requests:\n got %+v\nwant %+v", got, want)
	}
}

// TestRunOverREST runs a Source through the REST client: the informers' list and watch requests
// (the relay Secret's namespace-scoped, with its field selector), decoding, and the Node patch of
// Publish.
func TestRunOverREST(t *testing.T) {
	api := newTestAPI(t)
	edge1 := webObjects()[2].(*corev1.Node)
	api.lists["/api/v1/services"] = &corev1.ServiceList{Items: []corev1.Service{*service("shop", "web", nil)}}
	api.lists["/apis/discovery.k8s.io/v1/endpointslices"] = &discoveryv1.EndpointSliceList{}
	api.lists["/api/v1/nodes"] = &corev1.NodeList{Items: []corev1.Node{*edge1}}
	api.lists["/api/v1/namespaces/edgewire/secrets"] = &corev1.SecretList{Items: []corev1.Secret{*relaySecret(map[string]string{"A": "/ip4/198.51.100.1/tcp/4001/p2p/A"})}}
	// The EndpointSlice arrives through the watch.
	api.watches["/apis/discovery.k8s.io/v1/endpointslices"] = []watch.Event{{Type: watch.Added, Object: webObjects()[1]}}

	src, log := newSource(t, Config{RESTConfig: api.config(), NodeName: "edge-1",
		RelaySecretNamespace: "edgewire", RelaySecretName: "relays"})
	src.Publish(discovery.Self{WireGuardKey: keyB, Endpoints: addrPorts("10.0.0.9:51820")})
	r := startRun(t, src)
	s := r.next(t, log)
	if len(s.Services) == 1 && len(s.Services[0].Endpoints) == 0 { // the list, then the watch's event
		s = r.next(t, log)
	}
	if got := serviceKeys(s); got != "shop/web" || len(s.Services[0].Endpoints) != 1 || nodeNames(s) != "edge-1" ||
		len(s.Relays) != 1 {
		t.Errorf("snapshot = %s, want shop/web with one endpoint, node edge-1 and one relay", encodeSnapshot(s))
	}
	log.wait(t, "published this node's WireGuard key", "node=edge-1")
	api.waitRequest(t, "merge patch of Node edge-1 with the new key", func(req apiRequest) bool {
		return req.method == "PATCH" && req.path == "/api/v1/nodes/edge-1" && strings.Contains(req.body, keyB) &&
			req.query.Get("fieldManager") == fieldManager
	})
	api.waitRequest(t, "watch of the relay Secret with its field selector", func(req apiRequest) bool {
		return req.path == "/api/v1/namespaces/edgewire/secrets" && req.query.Get("watch") == "true" &&
			req.query.Get("fieldSelector") == "metadata.name=relays"
	})
	r.stop(t)
	for _, req := range api.received() {
		if strings.HasPrefix(req.path, "/api/v1/namespaces/edgewire/secrets") && req.query.Get("fieldSelector") != "metadata.name=relays" {
			t.Errorf("relay Secret request without the field selector: %+v", req)
		}
	}
}
