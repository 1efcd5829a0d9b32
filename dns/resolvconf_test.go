package dns

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestReadResolvConf(t *testing.T) {
	tests := []struct {
		name    string
		content string
		exclude []netip.Addr
		want    []string
		wantErr bool
	}{
		{
			name:    "IPv4 and IPv6 with comments and options",
			content: "# generated\nsearch default.svc.cluster.local\nnameserver 10.0.0.2\nnameserver 2001:db8::53 # v6\n; old\noptions ndots:5\n",
			want:    []string{"10.0.0.2:53", "[2001:db8::53]:53"},
		},
		{
			name:    "own DNS IP excluded",
			content: "nameserver 169.254.96.16\nnameserver 1.1.1.1\n",
			exclude: []netip.Addr{netip.MustParseAddr("169.254.96.16")},
			want:    []string{"1.1.1.1:53"},
		},
		{
			name:    "systemd-resolved stub kept unless excluded",
			content: "nameserver 127.0.0.53\n",
			want:    []string{"127.0.0.53:53"},
		},
		{
			name:    "stub excluded",
			content: "nameserver 127.0.0.53\n",
			exclude: []netip.Addr{netip.MustParseAddr("127.0.0.53")},
			want:    nil,
		},
		{
			name:    "duplicates removed, order kept",
			content: "nameserver 8.8.8.8\nnameserver 1.1.1.1\nnameserver 8.8.8.8\n",
			want:    []string{"8.8.8.8:53", "1.1.1.1:53"},
		},
		{
			name:    "link-local with zone",
			content: "nameserver fe80::1%eth0\n",
			want:    []string{"[fe80::1%eth0]:53"},
		},
		{
			name:    "v4-mapped written as v4",
			content: "nameserver ::ffff:10.0.0.3\n",
			want:    []string{"10.0.0.3:53"},
		},
		{
			name:    "no nameservers",
			content: "search example.com\n",
			want:    nil,
		},
		{
			name:    "bad address",
			content: "nameserver dns.example.com\n",
			wantErr: true,
		},
		{
			name:    "nameserver without address",
			content: "nameserver\n",
			wantErr: true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "resolv.conf")
			if err := os.WriteFile(path, []byte(tc.content), 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := ReadResolvConf(path, tc.exclude...)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("ReadResolvConf = %q, want an error", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("ReadResolvConf: %v", err)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("ReadResolvConf = %q, want %q", got, tc.want)
			}
			s, err := New(Config{Upstreams: got})
			if err != nil {
				t.Fatalf("the result is not a valid Config.Upstreams: %v", err)
			}
			s.Close()
		})
	}
}

func TestReadResolvConfMissing(t *testing.T) {
	if _, err := ReadResolvConf(filepath.Join(t.TempDir(), "absent")); err == nil {
		t.Error("ReadResolvConf of a missing file succeeded")
	}
}
