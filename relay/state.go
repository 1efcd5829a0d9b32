package relay

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/libp2p/go-libp2p/core/crypto"
)

// Files in the relay's state directory.
const (
	keyFile      = "relay.key"
	bindingsFile = "bindings.json"
)

// binding is a node name bound to its keys and node ID.
type binding struct {
	Name         string `json:"name"`
	Peer         string `json:"peer"`
	WireGuardKey string `json:"wireguardKey"`
	ID           uint32 `json:"id"`
}

// bindingsDoc is the content of bindings.json.
type bindingsDoc struct {
	NextID uint32    `json:"nextID"`
	Nodes  []binding `json:"nodes"`
}

// errBound is wrapped when a name, key or peer is already bound to something else.
var errBound = errors.New("already bound")

// bindings keeps name → keys → ID, persisted in bindings.json.
type bindings struct {
	path string

	mu     sync.Mutex // guards all following fields
	nextID uint32
	byName map[string]binding
}

// loadOrCreateKey returns the relay's libp2p identity from dir/relay.key, creating it (0600) when
// missing. A key file that group or other may read is refused.
func loadOrCreateKey(dir string) (crypto.PrivKey, error) {
	path := filepath.Join(dir, keyFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		priv, _, err := crypto.GenerateEd25519Key(nil)
		if err != nil {
			return nil, fmt.Errorf("generate relay key: %w", err)
		}
		raw, err := crypto.MarshalPrivateKey(priv)
		if err != nil {
			return nil, fmt.Errorf("encode relay key: %w", err)
		}
		if err := writeFileAtomic(path, raw); err != nil {
			return nil, fmt.Errorf("relay key: %w", err)
		}
		return priv, nil
	}
	if err != nil {
		return nil, fmt.Errorf("relay key: %w", err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("relay key: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("relay key %s: mode %v, want 0600 (not readable by group or other)", path, fi.Mode().Perm())
	}
	priv, err := crypto.UnmarshalPrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("relay key %s: %w", path, err)
	}
	return priv, nil
}

// writeFileAtomic writes b to a temporary file (0600), syncs it and renames it to path.
func writeFileAtomic(path string, b []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func loadBindings(dir string) (*bindings, error) {
	bs := &bindings{path: filepath.Join(dir, bindingsFile), nextID: 1, byName: map[string]binding{}}
	b, err := os.ReadFile(bs.path)
	if errors.Is(err, fs.ErrNotExist) {
		return bs, nil
	}
	if err != nil {
		return nil, fmt.Errorf("bindings: %w", err)
	}
	var doc bindingsDoc
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("bindings %s: %w", bs.path, err)
	}
	for _, n := range doc.Nodes {
		if n.ID == 0 || n.Name == "" {
			return nil, fmt.Errorf("bindings %s: node %q with ID %d", bs.path, n.Name, n.ID)
		}
		bs.byName[n.Name] = n
		bs.nextID = max(bs.nextID, n.ID+1)
	}
	bs.nextID = max(bs.nextID, doc.NextID)
	return bs, nil
}

// bind returns the node ID of name, binding it to peer and wgKey if it is new. A name bound to other
// keys, or keys bound to another name, are refused with an error wrapping errBound.
func (bs *bindings) bind(name, peer, wgKey string) (uint32, error) {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	if b, ok := bs.byName[name]; ok {
		if b.Peer != peer || b.WireGuardKey != wgKey {
			return 0, fmt.Errorf("name %q: %w to other keys", name, errBound)
		}
		return b.ID, nil
	}
	for _, b := range bs.byName {
		if b.Peer == peer || b.WireGuardKey == wgKey {
			return 0, fmt.Errorf("keys of %q: %w to node %q", name, errBound, b.Name)
		}
	}
	b := binding{Name: name, Peer: peer, WireGuardKey: wgKey, ID: bs.nextID}
	bs.byName[name] = b
	bs.nextID++
	if err := bs.saveLocked(); err != nil {
		delete(bs.byName, name)
		bs.nextID--
		return 0, err
	}
	return b.ID, nil
}

func (bs *bindings) saveLocked() error {
	doc := bindingsDoc{NextID: bs.nextID, Nodes: make([]binding, 0, len(bs.byName))}
	for _, b := range bs.byName {
		doc.Nodes = append(doc.Nodes, b)
	}
	slices.SortFunc(doc.Nodes, func(a, b binding) int { return cmp.Compare(a.ID, b.ID) })
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return fmt.Errorf("bindings: %w", err)
	}
	return writeFileAtomic(bs.path, append(b, '\n'))
}
