package main

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"gopkg.in/yaml.v3"

	"github.com/edgewire/edgewire/dns"
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
		{
			name: "limits from the file, a flag wins",
			file: "maxTCPFlows: 3000\nmaxUDPFlows: 1500\ndnsSourceRate: 500\ndnsMaxForwards: 16\n",
			args: []string{"--dns-max-forwards", "8"},
			check: func(t *testing.T, o *upOptions) {
				if o.MaxTCPFlows != 3000 || o.MaxUDPFlows != 1500 || o.DNSSourceRate != 500 || o.DNSMaxForwards != 8 {
					t.Errorf("options = %+v", o)
				}
			},
		},
		{
			name: "limit defaults",
			file: "nodeName: edge-7\n",
			check: func(t *testing.T, o *upOptions) {
				if o.MaxTCPFlows != 0 || o.MaxUDPFlows != 0 || o.DNSSourceRate != dns.DefaultSourceRate || o.DNSMaxForwards != dns.DefaultMaxForwards {
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
		{name: "flow caps", mutate: func(o *upOptions) { o.MaxTCPFlows, o.MaxUDPFlows = 100, 50 }},
		{name: "negative tcp flows", mutate: func(o *upOptions) { o.MaxTCPFlows = -1 }, wantErr: "--max-tcp-flows -1: want a number of flows, or 0"},
		{name: "negative udp flows", mutate: func(o *upOptions) { o.MaxUDPFlows = -5 }, wantErr: "--max-udp-flows -5"},
		{name: "no dns source limit", mutate: func(o *upOptions) { o.DNSSourceRate = -1 }},
		{name: "bad dns source rate", mutate: func(o *upOptions) { o.DNSSourceRate = -2 }, wantErr: "-1 for no limit"},
		{name: "negative dns forwards", mutate: func(o *upOptions) { o.DNSMaxForwards = -1 }, wantErr: "--dns-max-forwards -1"},
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

// TestConfigFileCoversEveryField checks, for every field of upOptions, that its config file key
// names a flag and that loadConfigFile copies the file's value into it.
func TestConfigFileCoversEveryField(t *testing.T) {
	typ := reflect.TypeFor[upOptions]()
	for i := range typ.NumField() {
		field := typ.Field(i)
		key := field.Tag.Get("yaml")
		t.Run(key, func(t *testing.T) {
			fs := pflag.NewFlagSet("up", pflag.ContinueOnError)
			var o upOptions
			o.addFlags(fs)
			flag, ok := flagNames[key]
			if !ok {
				t.Fatalf("config key %q has no entry in flagNames", key)
			}
			if fs.Lookup(flag) == nil {
				t.Fatalf("config key %q: flagNames names --%s, which is not a flag", key, flag)
			}
			var value any
			switch field.Type {
			case reflect.TypeFor[string]():
				value = "from-file"
			case reflect.TypeFor[int]():
				value = 4242
			case reflect.TypeFor[bool]():
				value = !reflect.ValueOf(o).Field(i).Bool()
			case reflect.TypeFor[time.Duration]():
				value = 42 * time.Second
			case reflect.TypeFor[[]string]():
				value = []string{"from-file"}
			default:
				t.Fatalf("no test value for a %s", field.Type)
			}
			data, err := yaml.Marshal(map[string]any{key: value})
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(t.TempDir(), "config.yaml")
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := o.loadConfigFile(path, fs); err != nil {
				t.Fatal(err)
			}
			if got := reflect.ValueOf(o).Field(i).Interface(); !reflect.DeepEqual(got, value) {
				t.Errorf("%s from the file = %v, want %v", key, got, value)
			}
		})
	}
}

func TestFlowBudget(t *testing.T) {
	tests := []struct {
		name         string
		tcp, udp     int
		nofile       int
		wantNeed     int
		wantExceeded bool
	}{
		{name: "default caps are not checked", nofile: 20000},
		{name: "unknown limit is not checked", tcp: 100000, nofile: 0},
		// 3 per TCP cap (1 in the netstack, 2 in the listener), 2 per UDP cap.
		{name: "within", tcp: 1000, udp: 1000, nofile: 20000, wantNeed: 5000},
		{name: "tcp set, udp derived", tcp: 4000, nofile: 20000, wantNeed: 3*4000 + 2*2000},
		{name: "at four fifths", tcp: 4000, udp: 2000, nofile: 20000, wantNeed: 16000},
		{name: "over four fifths", tcp: 4000, udp: 2001, nofile: 20000, wantNeed: 16002, wantExceeded: true},
		{name: "udp set, tcp derived past the file limit", udp: 10, nofile: 1024, wantNeed: 3*204 + 2*10},
		{name: "far over", tcp: 10000, nofile: 1024, wantNeed: 30000 + 2*102, wantExceeded: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			need, exceeded := flowBudgetExceeded(tc.tcp, tc.udp, tc.nofile)
			if need != tc.wantNeed || exceeded != tc.wantExceeded {
				t.Errorf("flowBudgetExceeded(%d, %d, %d) = %d, %v; want %d, %v", tc.tcp, tc.udp, tc.nofile,
					need, exceeded, tc.wantNeed, tc.wantExceeded)
			}
		})
	}
}
