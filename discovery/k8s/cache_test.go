package k8s

import (
	"bytes"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/edgewire/edgewire/discovery"
)

// fullSnapshot has every field of every discovery type set (but Service.IP, which consumers
// assign and the cache does not keep), so that a field added to them later and forgotten by the
// cache format fails TestCacheRoundTrip.
func fullSnapshot() *discovery.Snapshot {
	return &discovery.Snapshot{
		Services: []*discovery.Service{{
			Namespace: "shop", Name: "web", ClusterIP: netip.MustParseAddr("10.96.0.80"), Headless: true,
			ExternalName: "web.example.com",
			Ports:        []discovery.ServicePort{{Name: "http", Protocol: discovery.UDP, Port: 80, TargetPort: 8080, TargetPortName: "http"}},
			Endpoints: []discovery.Endpoint{{
				Addresses: addrs("10.0.0.1", "fd00::1"), Hostname: "web-0", NodeName: "edge-1", Zone: "z1",
				Ready: true, Serving: true, Terminating: true,
				Ports: []discovery.EndpointPort{{Name: "http", Protocol: discovery.SCTP, Port: 8080}},
			}},
			SessionAffinity: true, AffinityTimeout: 600 * time.Second,
			Annotations: map[string]string{discovery.AnnotationLBPolicy: "random"},
		}},
		Nodes: []*discovery.Node{{
			Name: "edge-1", WireGuardKey: keyA, Endpoints: addrPorts("10.0.0.1:51820", "[fd00::1]:51820"),
			Annotations: map[string]string{discovery.AnnotationWireGuardKey: keyA},
		}},
		Relays: []string{"/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWA"},
	}
}

// checkAllSet fails for every zero field under v, but those named in except ("Service.IP").
func checkAllSet(t *testing.T, v reflect.Value, path string, except map[string]bool) {
	t.Helper()
	switch v.Kind() {
	case reflect.Pointer:
		checkAllSet(t, v.Elem(), path, except)
	case reflect.Slice:
		if v.Len() == 0 {
			t.Errorf("%s is empty", path)
		}
		for i := range v.Len() {
			checkAllSet(t, v.Index(i), path, except)
		}
	case reflect.Struct:
		if v.Type().PkgPath() != reflect.TypeFor[discovery.Snapshot]().PkgPath() {
			if v.IsZero() {
				t.Errorf("%s is zero", path)
			}
			return // netip.Addr and the like
		}
		for i := range v.NumField() {
			name := v.Type().Name() + "." + v.Type().Field(i).Name
			if except[name] {
				continue
			}
			checkAllSet(t, v.Field(i), name, except)
		}
	default:
		if v.IsZero() {
			t.Errorf("%s is zero", path)
		}
	}
}

func TestCacheRoundTrip(t *testing.T) {
	want := fullSnapshot()
	checkAllSet(t, reflect.ValueOf(want), "Snapshot", map[string]bool{"Service.IP": true})

	data := encodeSnapshot(want)
	got, err := decodeSnapshot(data)
	if err != nil {
		t.Fatalf("decode: %v\n%s", err, data)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("round trip:\n got %s\nwant %s", encodeSnapshot(got), data)
	}
	if !bytes.HasPrefix(data, []byte(`{"version":1,`)) {
		t.Errorf("cache does not start with its format version: %s", data)
	}

	// The service IP is the consumers' business.
	withIP := fullSnapshot()
	withIP.Services[0].IP = netip.MustParseAddr("100.64.0.1")
	if !bytes.Equal(encodeSnapshot(withIP), data) {
		t.Errorf("the service IP changed the encoding")
	}

	empty, err := decodeSnapshot(encodeSnapshot(&discovery.Snapshot{}))
	if err != nil || !reflect.DeepEqual(empty, &discovery.Snapshot{}) {
		t.Errorf("empty snapshot round trip = %+v, %v", empty, err)
	}
}

func TestDecodeCacheErrors(t *testing.T) {
	good := string(encodeSnapshot(fullSnapshot()))
	tests := []struct {
		name string
		data string
		want string
	}{
		{name: "not JSON", data: "{", want: "parse"},
		{name: "empty file", data: "", want: "parse"},
		{name: "other version", data: `{"version":2,"services":[],"nodes":[]}`, want: "format version 2, want 1"},
		{name: "no version", data: `{"services":[],"nodes":[]}`, want: "format version 0, want 1"},
		{name: "unknown field", data: strings.Replace(good, `"version":1,`, `"version":1,"extra":true,`, 1), want: "unknown field"},
		{name: "bad address", data: strings.Replace(good, `"10.0.0.1"`, `"10.0.0.300"`, 1), want: "parse"},
		{name: "bad key", data: strings.Replace(good, `"wireGuardKey":"`+keyA, `"wireGuardKey":"abc`, 1), want: "not a WireGuard public key"},
		{
			name: "duplicate key",
			data: `{"version":1,"services":[],"nodes":[{"name":"a","wireGuardKey":"` + keyA + `"},{"name":"b","wireGuardKey":"` + keyA + `"}]}`,
			want: "also used by node a",
		},
		{name: "service without name", data: `{"version":1,"services":[{"namespace":"x","name":""}],"nodes":[]}`, want: "no namespace or name"},
		{
			name: "endpoint without address",
			data: `{"version":1,"services":[{"namespace":"x","name":"y","endpoints":[{"addresses":[],"ready":true,"serving":true,"terminating":false}]}],"nodes":[]}`,
			want: "no address",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := decodeSnapshot([]byte(tc.data))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("decode error = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestWriteCache(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state", "catalog-k8s.json") // the directory is made
	data := encodeSnapshot(fullSnapshot())
	if err := writeCache(path, data); err != nil {
		t.Fatal(err)
	}
	// An existing file with a looser mode is replaced, not rewritten in place.
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := writeCache(path, data); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if mode := fi.Mode().Perm(); mode != 0o600 {
		t.Errorf("cache mode = %v, want 0600", mode)
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("files beside the cache: %v, want only the cache", entries)
	}
	snap, _, err := loadCache(path)
	if err != nil || !reflect.DeepEqual(snap, fullSnapshot()) {
		t.Errorf("loadCache = %+v, %v", snap, err)
	}

	if _, _, err := loadCache(filepath.Join(dir, "missing.json")); !errors.Is(err, errNoCache) {
		t.Errorf("loadCache of a missing file = %v, want errNoCache", err)
	}
	if err := writeCache(filepath.Join(path, "below-a-file"), data); err == nil {
		t.Errorf("writeCache below a regular file succeeded")
	}
}
