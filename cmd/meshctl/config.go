package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/edgewire/edgewire/dns"
	"github.com/edgewire/edgewire/overlay"
	"github.com/edgewire/edgewire/overlay/forward"
	"github.com/edgewire/edgewire/overlay/netstack"
	"gopkg.in/yaml.v3"
)

// upOptions are the settings of `meshctl up`, from flags and the optional --config file.
type upOptions struct {
	NodeName       string        `yaml:"nodeName"`
	ServicesFile   string        `yaml:"servicesFile"`
	StateDir       string        `yaml:"stateDir"`
	ServiceCIDR    string        `yaml:"serviceCIDR"`
	DNSIP          string        `yaml:"dnsIP"`
	ClusterDomain  string        `yaml:"clusterDomain"`
	ControlSocket  string        `yaml:"controlSocket"`
	ResolvConf     string        `yaml:"resolvConf"`
	Upstreams      []string      `yaml:"upstreams"`
	TUNName        string        `yaml:"tunName"`
	ListenPort     int           `yaml:"listenPort"`
	OverlayPrefix  string        `yaml:"overlayPrefix"`
	WGInterface    string        `yaml:"wgInterface"`
	ForwardPort    int           `yaml:"forwardPort"`
	Relays         []string      `yaml:"relays"`
	JoinToken      string        `yaml:"joinToken"`
	JoinTokenFile  string        `yaml:"joinTokenFile"`
	MTU            int           `yaml:"mtu"`
	UDPIdleTimeout time.Duration `yaml:"udpIdleTimeout"`
	ConnectTimeout time.Duration `yaml:"connectTimeout"`
	LogLevel       string        `yaml:"logLevel"`
	LogFormat      string        `yaml:"logFormat"`

	Kubernetes      bool          `yaml:"kubernetes"`
	Kubeconfig      string        `yaml:"kubeconfig"`
	RelaySecret     string        `yaml:"relaySecret"`
	KubeSyncTimeout time.Duration `yaml:"kubeSyncTimeout"`
	HealthAddr      string        `yaml:"healthAddr"`
	Pprof           bool          `yaml:"pprof"`
	WGBuffers       int           `yaml:"wireguardBuffers"`

	MaxTCPFlows    int `yaml:"maxTCPFlows"`
	MaxUDPFlows    int `yaml:"maxUDPFlows"`
	DNSSourceRate  int `yaml:"dnsSourceRate"`
	DNSMaxForwards int `yaml:"dnsMaxForwards"`
}

// flagNames maps each config file field to its flag: the flag wins when it is set.
var flagNames = map[string]string{
	"nodeName": "node-name", "servicesFile": "services-file", "stateDir": "state-dir",
	"serviceCIDR": "service-cidr", "dnsIP": "dns-ip", "clusterDomain": "cluster-domain",
	"controlSocket": "control-socket", "resolvConf": "resolv-conf", "upstreams": "upstream",
	"tunName": "tun-name", "listenPort": "listen-port", "overlayPrefix": "overlay-prefix",
	"wgInterface": "wg-interface", "forwardPort": "forward-port", "mtu": "mtu",
	"relays": "relay", "joinToken": "join-token", "joinTokenFile": "join-token-file", "udpIdleTimeout": "udp-idle-timeout",
	"connectTimeout": "connect-timeout", "logLevel": "log-level", "logFormat": "log-format",
	"kubernetes": "kubernetes", "kubeconfig": "kubeconfig", "relaySecret": "relay-secret",
	"kubeSyncTimeout": "kube-sync-timeout", "healthAddr": "health-addr", "pprof": "pprof", "wireguardBuffers": "wireguard-buffers",
	"maxTCPFlows": "max-tcp-flows", "maxUDPFlows": "max-udp-flows", "dnsSourceRate": "dns-source-rate",
	"dnsMaxForwards": "dns-max-forwards",
}

func (o *upOptions) addFlags(fs *pflag.FlagSet) {
	host, _ := os.Hostname()
	fs.StringVar(&o.NodeName, "node-name", host, "this node's name (as in EndpointSlice nodeName)")
	fs.StringVar(&o.ServicesFile, "services-file", "", "static catalog: YAML of Kubernetes Service and EndpointSlice objects, reloaded on change")
	fs.StringVar(&o.StateDir, "state-dir", "/var/lib/edgewire", "directory for the node's keys and cached catalog")
	fs.StringVar(&o.ServiceCIDR, "service-cidr", "9.251.0.0/16", "range of service IPs routed to the TUN device")
	fs.StringVar(&o.DNSIP, "dns-ip", "169.254.96.16", "address the DNS server answers on (port 53)")
	fs.StringVar(&o.ClusterDomain, "cluster-domain", "cluster.local", "DNS zone of services")
	fs.StringVar(&o.ControlSocket, "control-socket", defaultControlSocket, "Unix socket the other meshctl verbs talk to")
	fs.StringVar(&o.ResolvConf, "resolv-conf", "/etc/resolv.conf", "resolv.conf whose nameservers answer names outside the cluster domain")
	fs.StringSliceVar(&o.Upstreams, "upstream", nil, "upstream resolver ip[:port] (repeatable); overrides --resolv-conf")
	fs.StringVar(&o.TUNName, "tun-name", "mesh0", "name of the TUN device")
	fs.IntVar(&o.MTU, "mtu", 1420, "MTU of the TUN device")
	fs.IntVar(&o.ListenPort, "listen-port", 51820, "UDP port of the node's WireGuard socket")
	fs.StringVar(&o.OverlayPrefix, "overlay-prefix", "fd65:7765:7769::/48", "overlay range (IPv6 ULA); node addresses are derived from WireGuard public keys")
	fs.StringVar(&o.WGInterface, "wg-interface", "", "name of the WireGuard UAPI socket /var/run/wireguard/NAME.sock for `wg show` (default: --tun-name)")
	fs.StringArrayVar(&o.Relays, "relay", nil, "mesh-relay to register with, host:port or a libp2p multiaddr with /p2p/ID (repeatable)")
	fs.StringVar(&o.JoinToken, "join-token", "", "token that admits this node to the mesh (prefer --join-token-file: flags show in ps)")
	fs.StringVar(&o.JoinTokenFile, "join-token-file", "", "file holding the join token")
	fs.IntVar(&o.ForwardPort, "forward-port", 51821, "TCP and UDP port of the agent-to-agent forward listener on the overlay address")
	fs.DurationVar(&o.UDPIdleTimeout, "udp-idle-timeout", overlay.DefaultUDPIdleTimeout, "close a UDP flow idle this long")
	fs.DurationVar(&o.ConnectTimeout, "connect-timeout", 5*time.Second, "deadline to connect to an endpoint, retries included")
	fs.BoolVar(&o.Kubernetes, "kubernetes", false, "catalog from the Kubernetes API (Services, EndpointSlices, Nodes; in-cluster config unless --kubeconfig) instead of --services-file")
	fs.StringVar(&o.Kubeconfig, "kubeconfig", "", "kubeconfig file for the Kubernetes API (implies --kubernetes)")
	fs.StringVar(&o.RelaySecret, "relay-secret", "edgewire/edgewire-relay", "with --kubernetes: NAMESPACE/NAME of the Secret mesh-relay publishes its addresses in (\"\" = none)")
	fs.DurationVar(&o.KubeSyncTimeout, "kube-sync-timeout", 10*time.Second, "with --kubernetes: how long to wait for the API before serving the cached catalog")
	fs.StringVar(&o.HealthAddr, "health-addr", "", "HOST:PORT of the HTTP health endpoint (/healthz, /readyz); empty = none")
	fs.IntVar(&o.WGBuffers, "wireguard-buffers", overlay.DefaultWireGuardBuffers, "most 64 KiB packet buffers WireGuard may hold (its queues' memory bound; beyond it the kernel's queues drop)")
	fs.BoolVar(&o.Pprof, "pprof", false, "serve the Go profiler under /debug/pprof/ on --health-addr (for debugging; off by default)")
	fs.IntVar(&o.MaxTCPFlows, "max-tcp-flows", 0, "most TCP flows held at once by the service stack, and apart by the forward listener (a quarter of it per client, half per peer); over it a flow is refused and counted (0 = a fifth of the file descriptor limit, 64-8192)")
	fs.IntVar(&o.MaxUDPFlows, "max-udp-flows", 0, "most UDP flows held at once by the service stack, and apart by the forward listener (a quarter of it per client, half per peer); over it a datagram is dropped and counted (0 = a tenth of the file descriptor limit, 32-4096)")
	fs.IntVar(&o.DNSSourceRate, "dns-source-rate", dns.DefaultSourceRate, "UDP datagrams a second one source address may send to the DNS server (a query forwarded upstream costs 10); beyond it they are dropped and counted (-1 = no limit)")
	fs.IntVar(&o.DNSMaxForwards, "dns-max-forwards", dns.DefaultMaxForwards, "most DNS exchanges with the upstream resolvers in flight; a query that needs one more is answered SERVFAIL and counted")
	fs.StringVar(&o.LogLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.StringVar(&o.LogFormat, "log-format", "text", "log format: text or json")
}

// loadConfigFile fills the fields of o whose flags were not set from the YAML file at path.
// Unknown fields are an error, so a typo does not pass silently.
func (o *upOptions) loadConfigFile(path string, fs *pflag.FlagSet) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	var raw map[string]yaml.Node
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	var fromFile upOptions
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&fromFile); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("config %s: %w", path, err)
	}
	for key := range raw {
		flag, ok := flagNames[key]
		if !ok || fs.Changed(flag) {
			continue
		}
		switch key {
		case "nodeName":
			o.NodeName = fromFile.NodeName
		case "servicesFile":
			o.ServicesFile = fromFile.ServicesFile
		case "stateDir":
			o.StateDir = fromFile.StateDir
		case "serviceCIDR":
			o.ServiceCIDR = fromFile.ServiceCIDR
		case "dnsIP":
			o.DNSIP = fromFile.DNSIP
		case "clusterDomain":
			o.ClusterDomain = fromFile.ClusterDomain
		case "controlSocket":
			o.ControlSocket = fromFile.ControlSocket
		case "resolvConf":
			o.ResolvConf = fromFile.ResolvConf
		case "upstreams":
			o.Upstreams = fromFile.Upstreams
		case "tunName":
			o.TUNName = fromFile.TUNName
		case "listenPort":
			o.ListenPort = fromFile.ListenPort
		case "overlayPrefix":
			o.OverlayPrefix = fromFile.OverlayPrefix
		case "wgInterface":
			o.WGInterface = fromFile.WGInterface
		case "forwardPort":
			o.ForwardPort = fromFile.ForwardPort
		case "relays":
			o.Relays = fromFile.Relays
		case "joinToken":
			o.JoinToken = fromFile.JoinToken
		case "joinTokenFile":
			o.JoinTokenFile = fromFile.JoinTokenFile
		case "mtu":
			o.MTU = fromFile.MTU
		case "udpIdleTimeout":
			o.UDPIdleTimeout = fromFile.UDPIdleTimeout
		case "connectTimeout":
			o.ConnectTimeout = fromFile.ConnectTimeout
		case "logLevel":
			o.LogLevel = fromFile.LogLevel
		case "logFormat":
			o.LogFormat = fromFile.LogFormat
		case "kubernetes":
			o.Kubernetes = fromFile.Kubernetes
		case "kubeconfig":
			o.Kubeconfig = fromFile.Kubeconfig
		case "relaySecret":
			o.RelaySecret = fromFile.RelaySecret
		case "kubeSyncTimeout":
			o.KubeSyncTimeout = fromFile.KubeSyncTimeout
		case "healthAddr":
			o.HealthAddr = fromFile.HealthAddr
		case "pprof":
			o.Pprof = fromFile.Pprof
		case "wireguardBuffers":
			o.WGBuffers = fromFile.WGBuffers
		case "maxTCPFlows":
			o.MaxTCPFlows = fromFile.MaxTCPFlows
		case "maxUDPFlows":
			o.MaxUDPFlows = fromFile.MaxUDPFlows
		case "dnsSourceRate":
			o.DNSSourceRate = fromFile.DNSSourceRate
		case "dnsMaxForwards":
			o.DNSMaxForwards = fromFile.DNSMaxForwards
		}
	}
	return nil
}

// parsed is upOptions checked and converted to typed values.
type parsed struct {
	joinToken   string
	overlay     netip.Prefix
	serviceCIDR netip.Prefix
	dnsIP       netip.Addr
	upstreams   []string
	kubernetes  bool
	healthAddr  string
	// relaySecret is --relay-secret split; both empty when none.
	relaySecretNS, relaySecretName string
}

func (o *upOptions) parse() (parsed, error) {
	var p parsed
	var err error
	if p.serviceCIDR, err = netip.ParsePrefix(o.ServiceCIDR); err != nil {
		return p, fmt.Errorf("--service-cidr %q: want a CIDR such as 9.251.0.0/16: %w", o.ServiceCIDR, err)
	}
	if p.serviceCIDR.Masked() != p.serviceCIDR {
		return p, fmt.Errorf("--service-cidr %q: host bits set (did you mean %s?)", o.ServiceCIDR, p.serviceCIDR.Masked())
	}
	if p.dnsIP, err = netip.ParseAddr(o.DNSIP); err != nil {
		return p, fmt.Errorf("--dns-ip %q: want an IP address such as 169.254.96.16: %w", o.DNSIP, err)
	}
	if o.NodeName == "" {
		return p, errors.New("--node-name is empty and the hostname is unknown: set --node-name")
	}
	p.kubernetes = o.Kubernetes || o.Kubeconfig != ""
	switch {
	case p.kubernetes && o.ServicesFile != "":
		return p, errors.New("--services-file and --kubernetes (or --kubeconfig) are both set: the catalog comes from one source, choose one")
	case !p.kubernetes && o.ServicesFile == "":
		return p, errors.New("no catalog: set --services-file to a YAML file of Service and EndpointSlice objects, or --kubernetes to read the Kubernetes API")
	}
	if p.kubernetes {
		if o.KubeSyncTimeout <= 0 {
			return p, fmt.Errorf("--kube-sync-timeout %s: must be positive", o.KubeSyncTimeout)
		}
		if o.RelaySecret != "" {
			ns, name, ok := strings.Cut(o.RelaySecret, "/")
			if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
				return p, fmt.Errorf("--relay-secret %q: want NAMESPACE/NAME, such as edgewire/edgewire-relay", o.RelaySecret)
			}
			p.relaySecretNS, p.relaySecretName = ns, name
		}
	}
	if strings.Trim(o.ClusterDomain, ".") == "" {
		return p, errors.New("--cluster-domain is empty")
	}
	if p.overlay, err = netip.ParsePrefix(o.OverlayPrefix); err != nil {
		return p, fmt.Errorf("--overlay-prefix %q: want an IPv6 prefix such as fd65:7765:7769::/48: %w", o.OverlayPrefix, err)
	}
	if o.ListenPort < 1 || o.ListenPort > 65535 {
		return p, fmt.Errorf("--listen-port %d: must be 1-65535", o.ListenPort)
	}
	if o.ForwardPort < 1 || o.ForwardPort > 65535 {
		return p, fmt.Errorf("--forward-port %d: must be 1-65535", o.ForwardPort)
	}
	if o.MTU < 1280 || o.MTU > 65535 {
		return p, fmt.Errorf("--mtu %d: must be 1280-65535", o.MTU)
	}
	if o.UDPIdleTimeout <= 0 {
		return p, fmt.Errorf("--udp-idle-timeout %s: must be positive", o.UDPIdleTimeout)
	}
	if o.ConnectTimeout <= 0 {
		return p, fmt.Errorf("--connect-timeout %s: must be positive", o.ConnectTimeout)
	}
	if o.MaxTCPFlows < 0 {
		return p, fmt.Errorf("--max-tcp-flows %d: want a number of flows, or 0 for the default derived from the file descriptor limit", o.MaxTCPFlows)
	}
	if o.MaxUDPFlows < 0 {
		return p, fmt.Errorf("--max-udp-flows %d: want a number of flows, or 0 for the default derived from the file descriptor limit", o.MaxUDPFlows)
	}
	if o.DNSSourceRate < -1 {
		return p, fmt.Errorf("--dns-source-rate %d: want datagrams a second, 0 for the default (%d) or -1 for no limit", o.DNSSourceRate, dns.DefaultSourceRate)
	}
	if o.DNSMaxForwards < 0 {
		return p, fmt.Errorf("--dns-max-forwards %d: want a number of exchanges, or 0 for the default (%d)", o.DNSMaxForwards, dns.DefaultMaxForwards)
	}
	if o.JoinToken != "" && o.JoinTokenFile != "" {
		return p, errors.New("--join-token and --join-token-file are both set: use one")
	}
	p.joinToken = o.JoinToken
	if o.JoinTokenFile != "" {
		tok, err := readTokenFile(o.JoinTokenFile)
		if err != nil {
			return p, err
		}
		p.joinToken = tok
	}
	if o.HealthAddr != "" {
		if p.healthAddr, err = parseHealthAddr(o.HealthAddr); err != nil {
			return p, err
		}
	}
	if o.Pprof && o.HealthAddr == "" {
		return p, errors.New("--pprof serves the profiler on the health endpoint: set --health-addr too")
	}
	if len(o.Relays) > 0 && p.joinToken == "" {
		return p, errors.New("--relay needs a join token: set --join-token-file (or --join-token)")
	}
	for _, u := range o.Upstreams {
		ap, err := parseUpstream(u)
		if err != nil {
			return p, err
		}
		p.upstreams = append(p.upstreams, ap.String())
	}
	return p, nil
}

// flowDescriptors returns the file descriptors the agent's flows hold when every flow cap is full:
// one for each TCP and UDP flow of the service netstack, two for each TCP flow of the forward
// listener and one for each of its UDP flows (overlay/internal/flows). A zero cap is the default
// derived from nofile, the soft RLIMIT_NOFILE.
func flowDescriptors(maxTCP, maxUDP, nofile int) int {
	nsTCP, fwTCP := netstack.DefaultMaxTCPFlows(nofile), forward.DefaultMaxTCPFlows(nofile)
	if maxTCP > 0 {
		nsTCP, fwTCP = maxTCP, maxTCP
	}
	nsUDP, fwUDP := netstack.DefaultMaxUDPFlows(nofile), forward.DefaultMaxUDPFlows(nofile)
	if maxUDP > 0 {
		nsUDP, fwUDP = maxUDP, maxUDP
	}
	return nsTCP + 2*fwTCP + nsUDP + fwUDP
}

// flowBudgetExceeded reports whether the flows at their caps would hold more than the four fifths
// of nofile the default caps are cut from (the last fifth is for WireGuard, the TUN, DNS and the
// rest), and how many descriptors they would hold. Only caps set by hand can exceed it.
func flowBudgetExceeded(maxTCP, maxUDP, nofile int) (need int, exceeded bool) {
	if nofile <= 0 || (maxTCP <= 0 && maxUDP <= 0) {
		return 0, false
	}
	need = flowDescriptors(maxTCP, maxUDP, nofile)
	return need, need > nofile/5*4
}

// parseHealthAddr accepts HOST:PORT, [IPv6]:PORT and, because the DaemonSet builds the address from
// the node's IP ($(HOST_IP):9269), an unbracketed IPv6 address followed by :PORT.
func parseHealthAddr(s string) (string, error) {
	if _, _, err := net.SplitHostPort(s); err == nil {
		return s, nil
	}
	if i := strings.LastIndexByte(s, ':'); i > 0 {
		if ap, err := netip.ParseAddrPort("[" + s[:i] + "]" + s[i:]); err == nil {
			return ap.String(), nil
		}
	}
	return "", fmt.Errorf("--health-addr %q: want HOST:PORT, such as 127.0.0.1:9269", s)
}

func parseUpstream(s string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap, nil
	}
	addr, err := netip.ParseAddr(strings.Trim(s, "[]"))
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("--upstream %q: want ip or ip:port", s)
	}
	return netip.AddrPortFrom(addr, 53), nil
}

func newLogger(level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	default:
		return nil, fmt.Errorf("--log-format %q: want text or json", format)
	}
}

// readTokenFile reads a join token: the file's content without surrounding white space.
func readTokenFile(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("--join-token-file: %w", err)
	}
	tok := strings.TrimSpace(string(data))
	if tok == "" {
		return "", fmt.Errorf("--join-token-file %s: file is empty", path)
	}
	return tok, nil
}
