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
	"time"

	"github.com/spf13/pflag"
	"go.uber.org/goleak"

	"github.com/edgewire/edgewire/relay"
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

func TestLimitFlags(t *testing.T) {
	d := relay.DefaultLimits()
	defaults := relay.Limits{
		DataRate: 10e9 / 8, RegisterTimeout: d.RegisterTimeout,
		MaxUnauthStreams: d.MaxUnauthStreams, MaxUnauthStreamsPerIP: d.MaxUnauthStreamsPerIP,
		MaxUnauthConns: d.MaxUnauthConns, MaxUnauthConnsPerIP: d.MaxUnauthConnsPerIP, MaxConnsPerIP: d.MaxConnsPerIP,
	}
	tests := []struct {
		name    string
		args    []string
		want    func(l *relay.Limits)
		wantErr string
	}{
		{name: "defaults", args: nil, want: func(*relay.Limits) {}},
		{
			name: "every flag",
			args: []string{"--max-unauth-streams", "200", "--max-unauth-streams-per-ip", "20", "--max-unauth-conns", "500",
				"--max-unauth-conns-per-ip", "50", "--max-conns-per-ip", "2000", "--register-timeout", "30s", "--rate-limit", "1"},
			want: func(l *relay.Limits) {
				*l = relay.Limits{DataRate: 1e9 / 8, RegisterTimeout: 30 * time.Second,
					MaxUnauthStreams: 200, MaxUnauthStreamsPerIP: 20, MaxUnauthConns: 500, MaxUnauthConnsPerIP: 50, MaxConnsPerIP: 2000}
			},
		},
		{name: "per-ip equal to total", args: []string{"--max-unauth-streams", "8"}, want: func(l *relay.Limits) { l.MaxUnauthStreams = 8 }},
		{name: "zero streams", args: []string{"--max-unauth-streams", "0"}, wantErr: "--max-unauth-streams 0: want at least 1 (default 64)"},
		{name: "negative streams per ip", args: []string{"--max-unauth-streams-per-ip", "-1"}, wantErr: "--max-unauth-streams-per-ip -1: want at least 1"},
		{name: "zero conns", args: []string{"--max-unauth-conns", "0"}, wantErr: "--max-unauth-conns 0"},
		{name: "zero conns per ip", args: []string{"--max-unauth-conns-per-ip", "0"}, wantErr: "--max-unauth-conns-per-ip 0"},
		{name: "zero conns per ip registered", args: []string{"--max-conns-per-ip", "0"}, wantErr: "--max-conns-per-ip 0"},
		{name: "streams per ip over total", args: []string{"--max-unauth-streams", "4"}, wantErr: "raise --max-unauth-streams"},
		{name: "conns per ip over total", args: []string{"--max-unauth-conns", "16"}, wantErr: "raise --max-unauth-conns"},
		{name: "unauth conns per ip over conns per ip", args: []string{"--max-conns-per-ip", "16"}, wantErr: "raise --max-conns-per-ip"},
		{name: "register timeout too short", args: []string{"--register-timeout", "100ms"}, wantErr: "--register-timeout 100ms: want 1s to 5m0s"},
		{name: "register timeout too long", args: []string{"--register-timeout", "1h"}, wantErr: "--register-timeout 1h0m0s"},
		{name: "rate limit", args: []string{"--rate-limit", "0"}, wantErr: "--rate-limit 0"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var o options
			fs := pflag.NewFlagSet("mesh-relay", pflag.ContinueOnError)
			o.addFlags(fs)
			if err := fs.Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			got, err := o.limits()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := defaults
			tc.want(&want)
			if got != want {
				t.Errorf("limits\n got %+v\nwant %+v", got, want)
			}
		})
	}
}

// TestBadLimitRefusedAtStart runs the command: a bad bound stops it before it listens.
func TestBadLimitRefusedAtStart(t *testing.T) {
	cmd := newRootCmd()
	cmd.SetArgs([]string{"--state-dir", t.TempDir(), "--listen", "127.0.0.1:0", "--join-token", "s3cret",
		"--max-unauth-conns", "0"})
	var out bytes.Buffer
	cmd.SetOut(&out)
	err := cmd.ExecuteContext(context.Background())
	if err == nil || !strings.Contains(err.Error(), "--max-unauth-conns 0") {
		t.Fatalf("err %v, want the bad bound named", err)
	}
	if out.Len() != 0 {
		t.Errorf("it started: %s", out.String())
	}
}
