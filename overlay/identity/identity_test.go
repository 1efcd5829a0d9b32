package identity

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"math/big"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestLoadOrCreate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	id, created, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !created {
		t.Error("first LoadOrCreate: created = false")
	}

	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o700 {
		t.Errorf("state dir mode = %#o, want 0700", got)
	}
	for _, name := range []string{WireGuardKeyFile, Libp2pKeyFile} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != 0o600 {
			t.Errorf("%s mode = %#o, want 0600", name, got)
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 2 {
		t.Errorf("state dir holds %d entries, want the 2 key files (no temporary files left)", len(entries))
	}

	// wireguard.key: base64 of 32 clamped bytes and a newline, as `wg genkey` prints.
	wg, err := os.ReadFile(filepath.Join(dir, WireGuardKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if len(wg) != 45 || wg[44] != '\n' {
		t.Errorf("wireguard.key = %d bytes %q, want 44 base64 characters and a newline", len(wg), wg)
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(wg)))
	if err != nil || len(raw) != 32 {
		t.Fatalf("wireguard.key does not decode to 32 bytes: %v", err)
	}
	if raw[0]&7 != 0 || raw[31]&0x80 != 0 || raw[31]&0x40 == 0 {
		t.Errorf("wireguard.key is not clamped: first byte %#x, last %#x", raw[0], raw[31])
	}
	if !bytes.Equal(raw, id.WireGuard[:]) {
		t.Error("Identity.WireGuard differs from wireguard.key")
	}
	if id.WireGuardPublic != id.WireGuard.PublicKey() {
		t.Error("Identity.WireGuardPublic is not the public key of Identity.WireGuard")
	}

	// libp2p.key: the protobuf header then seed||public.
	p2p, err := os.ReadFile(filepath.Join(dir, Libp2pKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if len(p2p) != 68 || !bytes.Equal(p2p[:4], []byte{0x08, 0x01, 0x12, 0x40}) {
		t.Errorf("libp2p.key = %d bytes starting % x, want 68 starting 08 01 12 40", len(p2p), p2p[:min(4, len(p2p))])
	}
	if !bytes.Equal(p2p[4:], id.Libp2p) {
		t.Error("Identity.Libp2p differs from libp2p.key")
	}

	again, created, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if created {
		t.Error("second LoadOrCreate: created = true")
	}
	if again.WireGuard != id.WireGuard || again.WireGuardPublic != id.WireGuardPublic || !again.Libp2p.Equal(id.Libp2p) {
		t.Error("second LoadOrCreate returned different keys")
	}

	other, _, err := LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if other.WireGuard == id.WireGuard || other.Libp2p.Equal(id.Libp2p) {
		t.Error("two state directories got the same keys")
	}
}

// TestLoadOrCreateOneMissing checks that a missing key file is created beside an existing one,
// which is kept.
func TestLoadOrCreateOneMissing(t *testing.T) {
	dir := t.TempDir()
	id, _, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, Libp2pKeyFile)); err != nil {
		t.Fatal(err)
	}
	again, created, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !created {
		t.Error("created = false after the libp2p key was removed")
	}
	if again.WireGuard != id.WireGuard {
		t.Error("the existing WireGuard key was replaced")
	}
	if again.Libp2p.Equal(id.Libp2p) {
		t.Error("the libp2p key was not regenerated")
	}
}

// TestPublicKeyMatchesWg checks PublicKey against Debian's `wg pubkey`, over generated keys and
// over keys that wg clamps itself.
func TestPublicKeyMatchesWg(t *testing.T) {
	wgPath, err := exec.LookPath("wg")
	if err != nil {
		t.Fatalf("wg (wireguard-tools) is needed by this test; run `make deps`: %v", err)
	}
	dir := t.TempDir()
	id, _, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	fileKey, err := os.ReadFile(filepath.Join(dir, WireGuardKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	var unclamped Key
	for i := range unclamped {
		unclamped[i] = 0xff
	}
	gen, err := NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		stdin string
		key   Key
	}{
		{name: "key file as written", stdin: string(fileKey), key: id.WireGuard},
		{name: "NewPrivateKey", stdin: gen.String() + "\n", key: gen},
		{name: "unclamped key", stdin: unclamped.String() + "\n", key: unclamped},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(wgPath, "pubkey")
			cmd.Stdin = strings.NewReader(tc.stdin)
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("wg pubkey: %v", err)
			}
			want := strings.TrimSpace(string(out))
			if got := tc.key.PublicKey().String(); got != want {
				t.Errorf("PublicKey = %s, wg pubkey = %s", got, want)
			}
		})
	}
}

func TestLoadOrCreateRefuses(t *testing.T) {
	good := func(t *testing.T, dir string) {
		t.Helper()
		if _, _, err := LoadOrCreate(dir); err != nil {
			t.Fatal(err)
		}
	}
	write := func(name string, data []byte, mode os.FileMode) func(*testing.T, string) {
		return func(t *testing.T, dir string) {
			good(t, dir)
			p := filepath.Join(dir, name)
			if err := os.WriteFile(p, data, mode); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(p, mode); err != nil { // WriteFile keeps an existing file's mode
				t.Fatal(err)
			}
		}
	}
	chmod := func(name string, mode os.FileMode) func(*testing.T, string) {
		return func(t *testing.T, dir string) {
			good(t, dir)
			if err := os.Chmod(filepath.Join(dir, name), mode); err != nil {
				t.Fatal(err)
			}
		}
	}
	seed := bytes.Repeat([]byte{7}, ed25519.SeedSize)
	priv := ed25519.NewKeyFromSeed(seed)
	wrongPub := bytes.Clone(MarshalLibp2pKey(priv))
	wrongPub[len(wrongPub)-1] ^= 1

	tests := []struct {
		name    string
		setup   func(*testing.T, string)
		wantErr string
	}{
		{name: "WireGuard key readable by group", setup: chmod(WireGuardKeyFile, 0o640), wantErr: "wireguard.key: mode 0640"},
		{name: "WireGuard key readable by other", setup: chmod(WireGuardKeyFile, 0o604), wantErr: "wireguard.key: mode 0604"},
		{name: "libp2p key readable by all", setup: chmod(Libp2pKeyFile, 0o644), wantErr: "libp2p.key: mode 0644"},
		{name: "state dir writable by other", setup: func(t *testing.T, dir string) {
			good(t, dir)
			if err := os.Chmod(dir, 0o777); err != nil {
				t.Fatal(err)
			}
		}, wantErr: "lets group or other write it"},
		{name: "WireGuard key not base64", setup: write(WireGuardKeyFile, []byte("not a key!\n"), 0o600), wantErr: "wireguard.key: not a WireGuard private key"},
		{name: "WireGuard key too short", setup: write(WireGuardKeyFile, []byte(base64.StdEncoding.EncodeToString(make([]byte, 31))+"\n"), 0o600), wantErr: "not a WireGuard private key"},
		{name: "WireGuard key empty", setup: write(WireGuardKeyFile, nil, 0o600), wantErr: "not a WireGuard private key"},
		{name: "WireGuard key all zeros", setup: write(WireGuardKeyFile, []byte(Key{}.String()+"\n"), 0o600), wantErr: "all zeros"},
		{name: "WireGuard key is a directory", setup: func(t *testing.T, dir string) {
			if err := os.Mkdir(filepath.Join(dir, WireGuardKeyFile), 0o700); err != nil {
				t.Fatal(err)
			}
		}, wantErr: "not a regular file"},
		{name: "libp2p key truncated", setup: write(Libp2pKeyFile, MarshalLibp2pKey(priv)[:40], 0o600), wantErr: "libp2p.key: libp2p key: Data length"},
		{name: "libp2p key public half wrong", setup: write(Libp2pKeyFile, wrongPub, 0o600), wantErr: "does not match"},
		{name: "libp2p key is text", setup: write(Libp2pKeyFile, []byte("hello\n"), 0o600), wantErr: "libp2p.key: libp2p key"},
		{name: "libp2p key huge", setup: write(Libp2pKeyFile, make([]byte, 5000), 0o600), wantErr: "larger than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			tc.setup(t, dir)
			before := snapshotDir(t, dir)
			_, _, err := LoadOrCreate(dir)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
			}
			if after := snapshotDir(t, dir); after != before {
				t.Errorf("LoadOrCreate changed the state directory after refusing it:\nbefore %s\nafter  %s", before, after)
			}
		})
	}
}

// snapshotDir describes dir's entries (name, mode, content hash) to check that nothing changed.
func snapshotDir(t *testing.T, dir string) string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, e := range entries {
		fi, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		b.WriteString(e.Name() + " " + fi.Mode().String())
		if fi.Mode().IsRegular() {
			data, err := os.ReadFile(filepath.Join(dir, e.Name()))
			if err != nil {
				t.Fatal(err)
			}
			sum := sha256.Sum256(data)
			b.WriteString(" " + base64.StdEncoding.EncodeToString(sum[:8]))
		}
		b.WriteString("; ")
	}
	return b.String()
}

// TestPrivateKeyNotInErrors checks that a malformed key file's error does not quote it.
func TestPrivateKeyNotInErrors(t *testing.T) {
	dir := t.TempDir()
	secret := "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0" // base64, but 36 bytes
	if err := os.WriteFile(filepath.Join(dir, WireGuardKeyFile), []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err := LoadOrCreate(dir)
	if err == nil {
		t.Fatal("LoadOrCreate accepted a 36-byte key")
	}
	if strings.Contains(err.Error(), secret[:8]) {
		t.Errorf("error quotes the key file: %v", err)
	}
}

func TestParseKey(t *testing.T) {
	k, err := NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		in      string
		want    Key
		wantErr string
	}{
		{name: "round trip", in: k.String(), want: k},
		{name: "surrounding space", in: " " + k.String() + "\n", want: k},
		{name: "not base64", in: "!!!!", wantErr: "not base64"},
		{name: "missing padding", in: strings.TrimRight(k.String(), "="), wantErr: "not base64"},
		{name: "too long", in: base64.StdEncoding.EncodeToString(make([]byte, 33)), wantErr: "33 bytes, want 32"},
		{name: "empty", in: "", wantErr: "0 bytes, want 32"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseKey(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("ParseKey = %s, want %s", got, tc.want)
			}
		})
	}
}

func TestOverlayAddr(t *testing.T) {
	var zero, ones Key
	for i := range ones {
		ones[i] = 0xff
	}
	tests := []struct {
		name   string
		prefix string
		pub    Key
		want   string // "" to check only containment
	}{
		// Fixed vectors: SHA-256("edgewire overlay v1" || key), its leading bits after the prefix.
		{name: "default prefix, zero key", prefix: "fd65:7765:7769::/48", pub: zero, want: vector(t, "fd65:7765:7769::/48", zero)},
		{name: "default prefix, 0xff key", prefix: "fd65:7765:7769::/48", pub: ones, want: vector(t, "fd65:7765:7769::/48", ones)},
		{name: "/64", prefix: "fd00:1:2:3::/64", pub: ones},
		{name: "/96", prefix: "fd00::/96", pub: ones},
		{name: "/57, not on a byte boundary", prefix: "fd00:0:0:ff80::/57", pub: ones},
		{name: "host bits of the prefix ignored", prefix: "fd65:7765:7769:ffff::/48", pub: ones, want: vector(t, "fd65:7765:7769::/48", ones)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := netip.MustParsePrefix(tc.prefix)
			a, err := OverlayAddr(p, tc.pub)
			if err != nil {
				t.Fatal(err)
			}
			if !p.Masked().Contains(a) {
				t.Errorf("OverlayAddr = %s, outside %s", a, p.Masked())
			}
			b, err := OverlayAddr(p, tc.pub)
			if err != nil || a != b {
				t.Errorf("OverlayAddr not deterministic: %s then %s (%v)", a, b, err)
			}
			if tc.want != "" && a.String() != tc.want {
				t.Errorf("OverlayAddr = %s, want %s", a, tc.want)
			}
			// The host part is the leading 128-bits bits of the hash, whatever the alignment.
			hostBits := uint(128 - p.Bits())
			a16 := a.As16()
			host := new(big.Int).SetBytes(a16[:])
			host.And(host, new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), hostBits), big.NewInt(1)))
			sum := sha256.Sum256(append([]byte("edgewire overlay v1"), tc.pub[:]...))
			want := new(big.Int).Rsh(new(big.Int).SetBytes(sum[:16]), 128-hostBits)
			if host.Cmp(want) != 0 {
				t.Errorf("host bits of %s = %x, want the hash's leading %d bits %x", a, host, hostBits, want)
			}
		})
	}
}

// vector computes the expected overlay address for a /48 prefix byte-wise, independently of
// OverlayAddr's bit loop: the prefix's 6 bytes then the first 10 bytes of the hash.
func vector(t *testing.T, prefix string, pub Key) string {
	t.Helper()
	p := netip.MustParsePrefix(prefix).Masked()
	if p.Bits() != 48 {
		t.Fatalf("vector needs a /48, got %s", p)
	}
	sum := sha256.Sum256(append([]byte("edgewire overlay v1"), pub[:]...))
	a := p.Addr().As16()
	copy(a[6:], sum[:10])
	return netip.AddrFrom16(a).String()
}

func TestOverlayAddrDistinct(t *testing.T) {
	const n = 1000
	seen := make(map[netip.Addr]Key, n)
	for range n {
		k, err := NewPrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		pub := k.PublicKey()
		a, err := OverlayAddr(DefaultOverlayPrefix, pub)
		if err != nil {
			t.Fatal(err)
		}
		if prev, dup := seen[a]; dup {
			t.Fatalf("keys %s and %s share overlay address %s", prev, pub, a)
		}
		seen[a] = pub
	}
}

func TestOverlayPrefixErrors(t *testing.T) {
	tests := []struct {
		name    string
		prefix  netip.Prefix
		wantErr string
	}{
		{name: "zero prefix", prefix: netip.Prefix{}, wantErr: "invalid prefix"},
		{name: "IPv4", prefix: netip.MustParsePrefix("10.99.0.0/16"), wantErr: "must be IPv6"},
		{name: "IPv4-mapped", prefix: netip.MustParsePrefix("::ffff:10.99.0.0/112"), wantErr: "must be IPv6"},
		{name: "too short", prefix: netip.MustParsePrefix("fd00::/32"), wantErr: "must be /48 to /96, got /32"},
		{name: "too long", prefix: netip.MustParsePrefix("fd00::/112"), wantErr: "must be /48 to /96, got /112"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := OverlayAddr(tc.prefix, Key{1})
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestLibp2pKeyEncoding(t *testing.T) {
	_, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	enc := MarshalLibp2pKey(priv)
	// The same fields in the other order, as another protobuf encoder may write them.
	swapped := append(append([]byte{0x12, 0x40}, priv...), 0x08, 0x01)
	tests := []struct {
		name    string
		in      []byte
		wantErr string
	}{
		{name: "round trip", in: enc},
		{name: "fields swapped", in: swapped},
		{name: "empty", in: nil, wantErr: "missing Type or Data"},
		{name: "type only", in: []byte{0x08, 0x01}, wantErr: "missing Type or Data"},
		{name: "RSA type", in: append([]byte{0x08, 0x00}, enc[2:]...), wantErr: "type 0, want Ed25519"},
		{name: "secp256k1 type", in: append([]byte{0x08, 0x02}, enc[2:]...), wantErr: "type 2"},
		{name: "32-byte data", in: append([]byte{0x08, 0x01, 0x12, 0x20}, priv[:32]...), wantErr: "32 bytes, want 64"},
		{name: "unknown field", in: append(bytes.Clone(enc), 0x18, 0x01), wantErr: "unexpected field 3"},
		{name: "truncated varint", in: []byte{0x08}, wantErr: "bad Type varint"},
		{name: "bad tag", in: []byte{0xff}, wantErr: "bad field tag"},
		{name: "length past end", in: []byte{0x08, 0x01, 0x12, 0x7f, 0x00}, wantErr: "runs past the end"},
		{name: "huge length", in: []byte{0x08, 0x01, 0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, wantErr: "runs past the end"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := UnmarshalLibp2pKey(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !got.Equal(priv) {
				t.Error("decoded key differs from the encoded one")
			}
		})
	}
}

func FuzzUnmarshalLibp2pKey(f *testing.F) {
	_, priv, _ := ed25519.GenerateKey(nil)
	f.Add(MarshalLibp2pKey(priv))
	f.Add([]byte{0x08, 0x01, 0x12})
	f.Fuzz(func(t *testing.T, b []byte) {
		k, err := UnmarshalLibp2pKey(b)
		if err == nil && len(k) != ed25519.PrivateKeySize {
			t.Fatalf("accepted a key of %d bytes", len(k))
		}
	})
}
