package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgewire/edgewire/overlay/identity"
)

// runKeygen runs `meshctl keygen` with args and returns what it printed.
func runKeygen(t *testing.T, args ...string) string {
	t.Helper()
	cmd := newKeygenCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	if err := cmd.Execute(); err != nil {
		t.Fatalf("keygen %v: %v", args, err)
	}
	return out.String()
}

func TestKeygen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")

	var first, second keygenResult
	if err := json.Unmarshal([]byte(runKeygen(t, "--state-dir", dir, "--json")), &first); err != nil {
		t.Fatal(err)
	}
	if !first.Created {
		t.Error("first keygen: created = false")
	}
	if err := json.Unmarshal([]byte(runKeygen(t, "--state-dir", dir, "--json")), &second); err != nil {
		t.Fatal(err)
	}
	if second.Created {
		t.Error("second keygen: created = true")
	}
	second.Created = first.Created
	if first != second {
		t.Errorf("keygen printed different keys:\n%+v\n%+v", first, second)
	}

	pub, err := identity.ParseKey(first.WireGuardPublicKey)
	if err != nil {
		t.Fatal(err)
	}
	want, err := identity.OverlayAddr(identity.DefaultOverlayPrefix, pub)
	if err != nil {
		t.Fatal(err)
	}
	if first.OverlayAddress != want.String() {
		t.Errorf("overlayAddress = %s, want %s", first.OverlayAddress, want)
	}
	if raw, err := base64.StdEncoding.DecodeString(first.Libp2pPublicKey); err != nil || len(raw) != 32 {
		t.Errorf("libp2pPublicKey %q is not 32 bytes in base64 (%v)", first.Libp2pPublicKey, err)
	}

	plain := runKeygen(t, "--state-dir", dir)
	if plain != first.WireGuardPublicKey+"\n" {
		t.Errorf("keygen printed %q, want the public key %q and a newline", plain, first.WireGuardPublicKey)
	}

	var other keygenResult
	if err := json.Unmarshal([]byte(runKeygen(t, "--state-dir", dir, "--json", "--overlay-prefix", "fd00:1:2:3::/64")), &other); err != nil {
		t.Fatal(err)
	}
	if a, err := netip.ParseAddr(other.OverlayAddress); err != nil || !netip.MustParsePrefix("fd00:1:2:3::/64").Contains(a) {
		t.Errorf("overlayAddress = %s, not in --overlay-prefix fd00:1:2:3::/64 (%v)", other.OverlayAddress, err)
	}
}

func TestKeygenErrors(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{name: "IPv4 overlay prefix", args: []string{"--overlay-prefix", "10.99.0.0/16"}, wantErr: "--overlay-prefix: overlay prefix 10.99.0.0/16: must be IPv6"},
		{name: "unparsable overlay prefix", args: []string{"--overlay-prefix", "nope"}, wantErr: "--overlay-prefix"},
		{name: "arguments", args: []string{"extra"}, wantErr: "unknown command"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cmd := newKeygenCmd()
			cmd.SetOut(new(bytes.Buffer))
			cmd.SetErr(new(bytes.Buffer))
			cmd.SetArgs(append([]string{"--state-dir", t.TempDir()}, tc.args...))
			err := cmd.Execute()
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}
