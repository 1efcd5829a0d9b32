package relay

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestBindings(t *testing.T) {
	dir := t.TempDir()
	bs, err := loadBindings(dir)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, node, peer, key string
		wantID                uint32
		wantBound             bool
	}{
		{name: "first node", node: "a", peer: "pa", key: "ka", wantID: 1},
		{name: "second node", node: "b", peer: "pb", key: "kb", wantID: 2},
		{name: "same keys again", node: "a", peer: "pa", key: "ka", wantID: 1},
		{name: "name with another WireGuard key", node: "a", peer: "pa", key: "kx", wantBound: true},
		{name: "name with another peer", node: "a", peer: "px", key: "ka", wantBound: true},
		{name: "keys under another name", node: "c", peer: "pa", key: "ka", wantBound: true},
		{name: "third node", node: "c", peer: "pc", key: "kc", wantID: 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id, err := bs.bind(tc.node, tc.peer, tc.key)
			if tc.wantBound {
				if !errors.Is(err, errBound) {
					t.Fatalf("err %v, want errBound", err)
				}
				return
			}
			if err != nil || id != tc.wantID {
				t.Fatalf("bind = %d, %v; want %d", id, err, tc.wantID)
			}
		})
	}
	again, err := loadBindings(dir)
	if err != nil {
		t.Fatal(err)
	}
	if id, err := again.bind("b", "pb", "kb"); err != nil || id != 2 {
		t.Fatalf("after reload b = %d, %v; want 2", id, err)
	}
	if id, err := again.bind("d", "pd", "kd"); err != nil || id != 4 {
		t.Fatalf("after reload a new node got %d, %v; want 4", id, err)
	}
}

func TestStateFilesRefused(t *testing.T) {
	tests := []struct {
		name string
		file string
		data string
		mode os.FileMode
		load func(dir string) error
	}{
		{name: "key readable by others", file: keyFile, data: "x", mode: 0o644,
			load: func(dir string) error { _, err := loadOrCreateKey(dir); return err }},
		{name: "key garbage", file: keyFile, data: "not a key", mode: 0o600,
			load: func(dir string) error { _, err := loadOrCreateKey(dir); return err }},
		{name: "bindings not JSON", file: bindingsFile, data: "{", mode: 0o600,
			load: func(dir string) error { _, err := loadBindings(dir); return err }},
		{name: "binding with ID 0", file: bindingsFile, data: `{"nodes":[{"name":"a","id":0}]}`, mode: 0o600,
			load: func(dir string) error { _, err := loadBindings(dir); return err }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, tc.file)
			if err := os.WriteFile(p, []byte(tc.data), tc.mode); err != nil {
				t.Fatal(err)
			}
			os.Chmod(p, tc.mode)
			if err := tc.load(dir); err == nil {
				t.Fatal("loaded a bad state file")
			}
			if b, _ := os.ReadFile(p); string(b) != tc.data {
				t.Fatal("a bad state file was overwritten")
			}
		})
	}
}

func TestBucket(t *testing.T) {
	b := newBucket(1000, 100, 0) // 1000 tokens/s, 100 burst
	tests := []struct {
		name string
		n    float64
		at   int64
		want bool
	}{
		{name: "burst", n: 100, at: 0, want: true},
		{name: "empty", n: 1, at: 0, want: false},
		{name: "refilled 50 after 50ms", n: 50, at: 50e6, want: true},
		{name: "capped at burst", n: 101, at: 10e9, want: false},
		{name: "full burst after long idle", n: 100, at: 10e9, want: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := b.take(tc.n, tc.at); got != tc.want {
				t.Fatalf("take(%v) at %d = %v, want %v", tc.n, tc.at, got, tc.want)
			}
		})
	}
}
