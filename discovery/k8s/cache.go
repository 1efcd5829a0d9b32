package k8s

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/edgewire/edgewire/discovery"
)

// cacheVersion is the version of the cache file format. A file of another version is not read
// (and is overwritten by the next snapshot from the API server).
const cacheVersion = 1

// errNoCache is returned by loadCache when the cache file does not exist.
var errNoCache = errors.New("no cached catalog")

// The cache file: a JSON object with the format version and the snapshot, written with names of
// its own so that renaming a field of a discovery type cannot silently change the format. Service
// IPs are not kept: consumers assign them (discovery.AssignIPs).
type (
	cacheFile struct {
		Version  int            `json:"version"`
		Services []cacheService `json:"services"`
		Nodes    []cacheNode    `json:"nodes"`
		Relays   []string       `json:"relays,omitempty"`
	}
	cacheService struct {
		Namespace              string            `json:"namespace"`
		Name                   string            `json:"name"`
		ClusterIP              netip.Addr        `json:"clusterIP,omitzero"`
		Headless               bool              `json:"headless,omitempty"`
		ExternalName           string            `json:"externalName,omitempty"`
		Ports                  []cachePort       `json:"ports,omitempty"`
		Endpoints              []cacheEndpoint   `json:"endpoints,omitempty"`
		SessionAffinity        bool              `json:"sessionAffinity,omitempty"`
		AffinityTimeoutSeconds int64             `json:"affinityTimeoutSeconds,omitempty"`
		Annotations            map[string]string `json:"annotations,omitempty"`
	}
	cachePort struct {
		Name           string             `json:"name,omitempty"`
		Protocol       discovery.Protocol `json:"protocol"`
		Port           uint16             `json:"port"`
		TargetPort     uint16             `json:"targetPort,omitempty"`
		TargetPortName string             `json:"targetPortName,omitempty"`
	}
	cacheEndpoint struct {
		Addresses   []netip.Addr        `json:"addresses"`
		Hostname    string              `json:"hostname,omitempty"`
		NodeName    string              `json:"nodeName,omitempty"`
		Zone        string              `json:"zone,omitempty"`
		Ready       bool                `json:"ready"`
		Serving     bool                `json:"serving"`
		Terminating bool                `json:"terminating"`
		Ports       []cacheEndpointPort `json:"ports,omitempty"`
	}
	cacheEndpointPort struct {
		Name     string             `json:"name,omitempty"`
		Protocol discovery.Protocol `json:"protocol"`
		Port     uint16             `json:"port,omitempty"`
	}
	cacheNode struct {
		Name         string            `json:"name"`
		WireGuardKey string            `json:"wireGuardKey,omitempty"`
		Endpoints    []netip.AddrPort  `json:"endpoints,omitempty"`
		Annotations  map[string]string `json:"annotations,omitempty"`
	}
)

// encodeSnapshot returns the cache file content for s. The encoding is deterministic (snapshots
// are sorted, and encoding/json sorts map keys), so equal snapshots encode to equal bytes: Run
// compares encodings to skip updates that change nothing.
func encodeSnapshot(s *discovery.Snapshot) []byte {
	f := cacheFile{Version: cacheVersion, Services: []cacheService{}, Nodes: []cacheNode{}, Relays: s.Relays}
	for _, svc := range s.Services {
		cs := cacheService{
			Namespace: svc.Namespace, Name: svc.Name, ClusterIP: svc.ClusterIP, Headless: svc.Headless,
			ExternalName: svc.ExternalName, SessionAffinity: svc.SessionAffinity,
			AffinityTimeoutSeconds: int64(svc.AffinityTimeout / time.Second), Annotations: svc.Annotations,
		}
		for _, p := range svc.Ports {
			cs.Ports = append(cs.Ports, cachePort(p))
		}
		for _, e := range svc.Endpoints {
			ce := cacheEndpoint{
				Addresses: e.Addresses, Hostname: e.Hostname, NodeName: e.NodeName, Zone: e.Zone,
				Ready: e.Ready, Serving: e.Serving, Terminating: e.Terminating,
			}
			for _, p := range e.Ports {
				ce.Ports = append(ce.Ports, cacheEndpointPort(p))
			}
			cs.Endpoints = append(cs.Endpoints, ce)
		}
		f.Services = append(f.Services, cs)
	}
	for _, n := range s.Nodes {
		f.Nodes = append(f.Nodes, cacheNode(*n))
	}
	b, err := json.Marshal(&f)
	if err != nil {
		// Only unsupported types or values fail, and the types above have none.
		panic(fmt.Sprintf("encode cached catalog: %v", err))
	}
	return append(b, '\n')
}

// decodeSnapshot parses and validates cache file content.
func decodeSnapshot(data []byte) (*discovery.Snapshot, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var f cacheFile
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("parse: %w", err)
	}
	if f.Version != cacheVersion {
		return nil, fmt.Errorf("format version %d, want %d", f.Version, cacheVersion)
	}
	s := &discovery.Snapshot{Relays: f.Relays}
	for i, cs := range f.Services {
		if cs.Namespace == "" || cs.Name == "" {
			return nil, fmt.Errorf("services[%d]: no namespace or name", i)
		}
		svc := &discovery.Service{
			Namespace: cs.Namespace, Name: cs.Name, ClusterIP: cs.ClusterIP, Headless: cs.Headless,
			ExternalName: cs.ExternalName, SessionAffinity: cs.SessionAffinity,
			AffinityTimeout: time.Duration(cs.AffinityTimeoutSeconds) * time.Second, Annotations: cs.Annotations,
		}
		for _, p := range cs.Ports {
			svc.Ports = append(svc.Ports, discovery.ServicePort(p))
		}
		for j, ce := range cs.Endpoints {
			if len(ce.Addresses) == 0 {
				return nil, fmt.Errorf("services[%d] (%s): endpoints[%d]: no address", i, svc.Key(), j)
			}
			e := discovery.Endpoint{
				Addresses: ce.Addresses, Hostname: ce.Hostname, NodeName: ce.NodeName, Zone: ce.Zone,
				Ready: ce.Ready, Serving: ce.Serving, Terminating: ce.Terminating,
			}
			for _, p := range ce.Ports {
				e.Ports = append(e.Ports, discovery.EndpointPort(p))
			}
			svc.Endpoints = append(svc.Endpoints, e)
		}
		s.Services = append(s.Services, svc)
	}
	keys := make(map[string]string, len(f.Nodes))
	for i, cn := range f.Nodes {
		if cn.Name == "" {
			return nil, fmt.Errorf("nodes[%d]: no name", i)
		}
		if cn.WireGuardKey != "" {
			raw, ok := discovery.ParseWireGuardKey(cn.WireGuardKey)
			if !ok {
				return nil, fmt.Errorf("nodes[%d] (%s): %q is not a WireGuard public key", i, cn.Name, cn.WireGuardKey)
			}
			if other, dup := keys[raw]; dup {
				return nil, fmt.Errorf("nodes[%d] (%s): WireGuard key also used by node %s", i, cn.Name, other)
			}
			keys[raw] = cn.Name
		}
		n := discovery.Node(cn)
		s.Nodes = append(s.Nodes, &n)
	}
	return s, nil
}

// loadCache reads the cache file at path. It returns errNoCache when there is none.
func loadCache(path string) (*discovery.Snapshot, time.Time, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, time.Time{}, errNoCache
	}
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("cached catalog: %w", err)
	}
	var mtime time.Time
	if fi, err := os.Stat(path); err == nil {
		mtime = fi.ModTime()
	}
	s, err := decodeSnapshot(data)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("cached catalog %s: %w", path, err)
	}
	return s, mtime, nil
}

// writeCache replaces the file at path with data atomically and durably: a temporary file in
// the same directory, mode 0600, synced, renamed over path, and the directory synced.
func writeCache(path string, data []byte) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("write cached catalog: %w", err)
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp") // mode 0600
	if err != nil {
		return fmt.Errorf("write cached catalog: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("write cached catalog %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("write cached catalog %s: sync: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write cached catalog %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write cached catalog: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync() // makes the rename durable; best effort
		d.Close()
	}
	return nil
}
