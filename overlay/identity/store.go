package identity

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// Names of the key files in the state directory.
const (
	WireGuardKeyFile = "wireguard.key"
	Libp2pKeyFile    = "libp2p.key"
)

// maxKeyFile bounds what is read of a key file: both formats are far smaller.
const maxKeyFile = 4096

// LoadOrCreate returns the node identity kept in stateDir, creating the directory (0700) and any
// missing key file (0600) first. created is true when at least one key was generated. A key file
// that is group- or other-accessible, not a regular file, or malformed is an error naming the file;
// it is never replaced.
func LoadOrCreate(stateDir string) (id *Identity, created bool, err error) {
	if stateDir == "" {
		return nil, false, errors.New("identity: no state directory")
	}
	if err := ensureDir(stateDir); err != nil {
		return nil, false, err
	}
	id = &Identity{}

	wgPath := filepath.Join(stateDir, WireGuardKeyFile)
	data, made, err := loadOrCreateFile(wgPath, func() ([]byte, error) {
		k, err := NewPrivateKey()
		if err != nil {
			return nil, err
		}
		return []byte(k.String() + "\n"), nil
	})
	if err != nil {
		return nil, false, err
	}
	created = created || made
	if id.WireGuard, err = ParseKey(string(data)); err != nil {
		// Not err itself: it quotes the start of the file, and a private key must not reach a log.
		return nil, false, fmt.Errorf("identity: %s: not a WireGuard private key (want 32 bytes in base64, as `wg genkey` prints)", wgPath)
	}
	if id.WireGuard.IsZero() {
		return nil, false, fmt.Errorf("identity: %s: the key is all zeros", wgPath)
	}
	id.WireGuardPublic = id.WireGuard.PublicKey()

	p2pPath := filepath.Join(stateDir, Libp2pKeyFile)
	data, made, err = loadOrCreateFile(p2pPath, func() ([]byte, error) {
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("generate libp2p key: %w", err)
		}
		return MarshalLibp2pKey(priv), nil
	})
	if err != nil {
		return nil, false, err
	}
	created = created || made
	if id.Libp2p, err = UnmarshalLibp2pKey(data); err != nil {
		return nil, false, fmt.Errorf("identity: %s: %w", p2pPath, err)
	}
	return id, created, nil
}

// ensureDir creates dir 0700 if missing and refuses one that group or other may write (they
// could replace the keys).
func ensureDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("identity: state directory: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("identity: state directory: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("identity: state directory %s: not a directory", dir)
	}
	if perm := fi.Mode().Perm(); perm&0o022 != 0 {
		return fmt.Errorf("identity: state directory %s: mode %#o lets group or other write it; want 0700 (chmod 700 %s)", dir, perm, dir)
	}
	return nil
}

// loadOrCreateFile returns the contents of the key file at path, first creating it from gen when
// it does not exist. made reports whether it did.
func loadOrCreateFile(path string, gen func() ([]byte, error)) (data []byte, made bool, err error) {
	data, err = readKeyFile(path)
	if err == nil {
		return data, false, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, false, err
	}
	content, err := gen()
	if err != nil {
		return nil, false, fmt.Errorf("identity: %s: %w", path, err)
	}
	switch err := createKeyFile(path, content); {
	case errors.Is(err, fs.ErrExist):
		// Another process created it first: use its key, so both agree.
	case err != nil:
		return nil, false, err
	default:
		made = true
	}
	data, err = readKeyFile(path)
	if err != nil {
		return nil, false, err
	}
	return data, made, nil
}

// readKeyFile reads a key file, checking that it is a regular file that only its owner may
// access. A missing file gives an error wrapping fs.ErrNotExist.
func readKeyFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return nil, fmt.Errorf("identity: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("identity: %s: not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("identity: %s: mode %#o lets group or other access the key; want 0600 (chmod 600 %s)", path, perm, path)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxKeyFile+1))
	if err != nil {
		return nil, fmt.Errorf("identity: read %s: %w", path, err)
	}
	if len(data) > maxKeyFile {
		return nil, fmt.Errorf("identity: %s: larger than %d bytes, not a key file", path, maxKeyFile)
	}
	return data, nil
}

// createKeyFile writes content to a temporary file beside path, syncs it and links it to path, so
// that path either does not exist or holds the whole key. It returns an error wrapping
// fs.ErrExist if path exists.
func createKeyFile(path string, content []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("identity: create %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	// CreateTemp makes the file 0600; chmod anyway so the mode does not depend on it.
	err = tmp.Chmod(0o600)
	if err == nil {
		_, err = tmp.Write(content)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("identity: write %s: %w", path, err)
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		return fmt.Errorf("identity: create %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync() // best effort: make the new name durable
		d.Close()
	}
	return nil
}

// MarshalLibp2pKey encodes an Ed25519 private key as a libp2p PrivateKey protobuf (see the package
// doc), what go-libp2p's crypto.UnmarshalPrivateKey reads.
func MarshalLibp2pKey(priv ed25519.PrivateKey) []byte {
	b := make([]byte, 0, 4+ed25519.PrivateKeySize)
	b = append(b, 0x08, libp2pKeyTypeEd25519, 0x12, ed25519.PrivateKeySize)
	return append(b, priv...)
}

// libp2pKeyTypeEd25519 is libp2p's KeyType Ed25519.
const libp2pKeyTypeEd25519 = 1

// UnmarshalLibp2pKey decodes a libp2p PrivateKey protobuf holding an Ed25519 key. It accepts the
// fields in any order, requires both, and rejects other key types, unknown fields, a Data of other
// than 64 bytes and a public half that does not match the seed.
func UnmarshalLibp2pKey(b []byte) (ed25519.PrivateKey, error) {
	var (
		keyType            uint64
		data               []byte
		haveType, haveData bool
	)
	for len(b) > 0 {
		tag, n := binary.Uvarint(b)
		if n <= 0 {
			return nil, errors.New("libp2p key: bad field tag")
		}
		b = b[n:]
		field, wire := tag>>3, tag&7
		switch {
		case field == 1 && wire == 0:
			v, n := binary.Uvarint(b)
			if n <= 0 {
				return nil, errors.New("libp2p key: bad Type varint")
			}
			keyType, haveType, b = v, true, b[n:]
		case field == 2 && wire == 2:
			l, n := binary.Uvarint(b)
			if n <= 0 || l > uint64(len(b)-n) {
				return nil, errors.New("libp2p key: Data length runs past the end")
			}
			data, haveData, b = b[n:n+int(l)], true, b[n+int(l):]
		default:
			return nil, fmt.Errorf("libp2p key: unexpected field %d (wire type %d)", field, wire)
		}
	}
	switch {
	case !haveType || !haveData:
		return nil, errors.New("libp2p key: missing Type or Data")
	case keyType != libp2pKeyTypeEd25519:
		return nil, fmt.Errorf("libp2p key: type %d, want Ed25519 (%d)", keyType, libp2pKeyTypeEd25519)
	case len(data) != ed25519.PrivateKeySize:
		return nil, fmt.Errorf("libp2p key: Ed25519 data is %d bytes, want %d", len(data), ed25519.PrivateKeySize)
	}
	priv := ed25519.NewKeyFromSeed(data[:ed25519.SeedSize])
	if !bytes.Equal(priv[ed25519.SeedSize:], data[ed25519.SeedSize:]) {
		return nil, errors.New("libp2p key: public key does not match the private key")
	}
	return priv, nil
}
