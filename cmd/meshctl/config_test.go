package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

func TestConfigFileAndFlags(t *testing.T) {
	tests := []struct {
		name    string
		file    string
		args    []string
		check   func(t *testing.T, o *upOptions)
		wantErr string
	}{
		{
			name: "file fills unset flags",
			file: "nodeName: edge-7\nservicesFile: /etc/x.yaml\nudpIdleTimeout: 30s\nupstreams: [10.0.0.2]\n",
			check: func(t *testing.T, o *upOptions) {
				if o.NodeName != "edge-7" || o.ServicesFile != "/etc/x.yaml" || o.UDPIdleTimeout != 30*time.Second || len(o.Upstreams) != 1 {
					t.Errorf("options = %+v", o)
				}
			},
		},
		{
			name: "flags win over the file",
			file: "nodeName: edge-7\nserviceCIDR: 10.96.0.0/12\n",
			args: []string{"--node-name", "edge-8"},
			check: func(t *testing.T, o *upOptions) {
				if o.NodeName != "edge-8" || o.ServiceCIDR != "10.96.0.0/12" {
					t.Errorf("options = %+v", o)
				}
			},
		},
		{
			name: "defaults stay when neither sets a field",
			file: "nodeName: edge-7\n",
			check: func(t *testing.T, o *upOptions) {
				if o.DNSIP != "169.254.96.16" || o.ClusterDomain != "cluster.local" || o.TUNName != "mesh0" {
					t.Errorf("options = %+v", o)
				}
			},
		},
		{name: "empty file is fine", file: "", check: func(t *testing.T, o *upOptions) {}},
		{name: "unknown field is an error", file: "nodeNme: x\n", wantErr: "nodeNme"},
		{name: "bad yaml is an error", file: "nodeName: [\n", wantErr: "config"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "config.yaml")
			if err := os.WriteFile(path, []byte(tc.file), 0o600); err != nil {
				t.Fatal(err)
			}
			fs := pflag.NewFlagSet("up", pflag.ContinueOnError)
			var o upOptions
			o.addFlags(fs)
			if err := fs.Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			err := o.loadConfigFile(path, fs)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want it to mention %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, &o)
		})
	}
}

func TestParseOptions(t *testing.T) {
	valid := func() upOptions {
		return upOptions{NodeName: "n", ServicesFile: "f", ServiceCIDR: "9.251.0.0/16", DNSIP: "169.254.96.16",
			ClusterDomain: "cluster.local", MTU: 1420, OverlayPrefix: "fd65:7765:7769::/48", ListenPort: 51820, ForwardPort: 51821, UDPIdleTimeout: time.Minute, ConnectTimeout: time.Second}
	}
	tests := []struct {
		name    string
		mutate  func(o *upOptions)
		wantErr string
	}{
		{name: "valid", mutate: func(o *upOptions) {}},
		{name: "bad cidr", mutate: func(o *upOptions) { o.ServiceCIDR = "9.251.0.0" }, wantErr: "--service-cidr"},
		{name: "cidr with host bits", mutate: func(o *upOptions) { o.ServiceCIDR = "9.251.1.0/16" }, wantErr: "did you mean 9.251.0.0/16"},
		{name: "bad dns ip", mutate: func(o *upOptions) { o.DNSIP = "dns" }, wantErr: "--dns-ip"},
		{name: "no services file", mutate: func(o *upOptions) { o.ServicesFile = "" }, wantErr: "--services-file"},
		{name: "small mtu", mutate: func(o *upOptions) { o.MTU = 500 }, wantErr: "--mtu"},
		{name: "bad upstream", mutate: func(o *upOptions) { o.Upstreams = []string{"resolver"} }, wantErr: "--upstream"},
		{name: "upstream without port", mutate: func(o *upOptions) { o.Upstreams = []string{"10.0.0.2"} }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := valid()
			tc.mutate(&o)
			_, err := o.parse()
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
		})
	}
}

func TestCatalogSourceOptions(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		check   func(t *testing.T, p parsed)
		wantErr string
	}{
		{name: "services file", args: []string{"--services-file", "/x.yaml"},
			check: func(t *testing.T, p parsed) {
				if p.kubernetes {
					t.Error("kubernetes set")
				}
			}},
		{name: "kubeconfig implies kubernetes", args: []string{"--kubeconfig", "/k"},
			check: func(t *testing.T, p parsed) {
				if !p.kubernetes || p.relaySecretNS != "edgewire" || p.relaySecretName != "edgewire-relay" {
					t.Errorf("parsed %+v", p)
				}
			}},
		{name: "both sources", args: []string{"--kubernetes", "--services-file", "/x.yaml"}, wantErr: "choose one"},
		{name: "no source", args: nil, wantErr: "--kubernetes"},
		{name: "bad relay secret", args: []string{"--kubernetes", "--relay-secret", "nope"}, wantErr: "NAMESPACE/NAME"},
		{name: "no relay secret", args: []string{"--kubernetes", "--relay-secret", ""},
			check: func(t *testing.T, p parsed) {
				if p.relaySecretName != "" {
					t.Errorf("relay secret %q", p.relaySecretName)
				}
			}},
		{name: "health IPv4", args: []string{"--kubernetes", "--health-addr", "10.0.0.1:9269"},
			check: func(t *testing.T, p parsed) {
				if p.healthAddr != "10.0.0.1:9269" {
					t.Errorf("health %q", p.healthAddr)
				}
			}},
		{name: "health unbracketed IPv6", args: []string{"--kubernetes", "--health-addr", "fd00::5:9269"},
			check: func(t *testing.T, p parsed) {
				if p.healthAddr != "[fd00::5]:9269" {
					t.Errorf("health %q", p.healthAddr)
				}
			}},
		{name: "health without port", args: []string{"--kubernetes", "--health-addr", "10.0.0.1"}, wantErr: "--health-addr"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var o upOptions
			fs := pflag.NewFlagSet("up", pflag.ContinueOnError)
			o.addFlags(fs)
			if err := fs.Parse(append([]string{"--node-name", "n1"}, tc.args...)); err != nil {
				t.Fatal(err)
			}
			p, err := o.parse()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want it to contain %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, p)
		})
	}
}
