package main

import (
	"bytes"
	"context"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestJoinToken(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tests := []struct {
		name     string
		flag     string
		file     string
		want     string
		wantErr  string
		wantWarn bool
	}{
		{name: "flag", flag: "s3cret", want: "s3cret"},
		{name: "file", file: write("ok", "s3cret\n", 0o600), want: "s3cret"},
		{name: "world-readable file warns", file: write("wide", "s3cret", 0o644), want: "s3cret", wantWarn: true},
		{name: "empty file", file: write("empty", " \n", 0o600), wantErr: "empty"},
		{name: "missing file", file: filepath.Join(dir, "nope"), wantErr: "no such file"},
		{name: "both", flag: "a", file: write("both", "b", 0o600), wantErr: "not both"},
		{name: "neither", wantErr: "no join token"},
		{name: "blank flag", flag: "  ", wantErr: "blank"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var logs bytes.Buffer
			got, err := joinToken(tc.flag, tc.file, slog.New(slog.NewTextHandler(&logs, nil)))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
			if warned := strings.Contains(logs.String(), "readable by every user"); warned != tc.wantWarn {
				t.Fatalf("warned %v, want %v: %s", warned, tc.wantWarn, logs.String())
			}
			if strings.Contains(logs.String(), "s3cret") {
				t.Fatal("the token was logged")
			}
		})
	}
}

func TestParseListen(t *testing.T) {
	tests := []struct {
		name     string
		in       string
		wantAddr netip.Addr
		wantPort uint16
		wantErr  bool
	}{
		{name: "port", in: "4001", wantPort: 4001},
		{name: "v4", in: "10.0.0.1:4002", wantAddr: netip.MustParseAddr("10.0.0.1"), wantPort: 4002},
		{name: "v6", in: "[::1]:4003", wantAddr: netip.MustParseAddr("::1"), wantPort: 4003},
		{name: "all", in: ":4004", wantPort: 4004},
		{name: "bad port", in: "70000", wantErr: true},
		{name: "name", in: "relay.example.com:4001", wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, p, err := parseListen(tc.in)
			if (err != nil) != tc.wantErr || a != tc.wantAddr || p != tc.wantPort {
				t.Fatalf("parseListen(%q) = %v, %d, %v", tc.in, a, p, err)
			}
		})
	}
}

func TestRefusesWithoutToken(t *testing.T) {
	cmd := newRootCmd()
	cmd.SetArgs([]string{"--state-dir", t.TempDir(), "--listen", "127.0.0.1:0"})
	cmd.SetOut(new(bytes.Buffer))
	err := cmd.ExecuteContext(context.Background())
	if err == nil || !strings.Contains(err.Error(), "no join token") {
		t.Fatalf("err %v, want a refusal without a token", err)
	}
}
