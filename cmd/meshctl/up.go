package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/discovery/k8s"
	"github.com/edgewire/edgewire/discovery/static"
	"github.com/edgewire/edgewire/dns"
	"github.com/edgewire/edgewire/overlay"
	"github.com/edgewire/edgewire/overlay/sysres"
)

func newUpCmd() *cobra.Command {
	var o upOptions
	var configPath string
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Run the node agent in the foreground",
		Long: `up runs the edgewire node agent in the foreground until SIGINT or SIGTERM (or
"meshctl down"), then removes everything it added to the host.

The agent creates the TUN device mesh0 (--tun-name) and routes the service range
(--service-cidr, default 9.251.0.0/16) and the DNS address (--dns-ip, default 169.254.96.16)
to it; it adds no other route and no iptables rule. Connections and UDP flows to a service
IP are terminated in a userspace network stack and spliced to a healthy endpoint chosen by
the service's load-balancing policy; DNS for the cluster domain is answered at the DNS
address, and other names are forwarded to the resolvers of --resolv-conf (or --upstream).
Point the node's /etc/resolv.conf at the DNS address to reach services by name.

The catalog comes from --services-file: a YAML file of ordinary Kubernetes Service and
discovery.k8s.io/v1 EndpointSlice objects ("kubectl get svc,endpointslices -o yaml" output
loads). The file is reloaded when it changes; an invalid file is reported in the log with
the document and field at fault, and the last good catalog stays in force.

With --kubernetes (the DaemonSet in deploy/) the catalog comes from the Kubernetes API instead:
Services, EndpointSlices and Nodes, through the in-cluster config or --kubeconfig. The agent
publishes its WireGuard key, overlay address and LAN endpoints as annotations on its own Node,
reads the relays from the Secret of --relay-secret, and keeps the last catalog in
--state-dir/catalog-k8s.json: when the API server is unreachable at start it serves that copy
after --kube-sync-timeout, and catches up when the server returns.

Every flag can also be set in a YAML file given with --config, using the camelCase field
names (nodeName, servicesFile, stateDir, serviceCIDR, dnsIP, clusterDomain, controlSocket,
resolvConf, upstreams, tunName, mtu, listenPort, overlayPrefix, wgInterface, forwardPort, relays, joinToken, joinTokenFile,
udpIdleTimeout, connectTimeout, logLevel, logFormat, kubernetes, kubeconfig, relaySecret,
kubeSyncTimeout, healthAddr, pprof, wireguardBuffers, maxTCPFlows, maxUDPFlows, dnsSourceRate,
dnsMaxForwards).
Flags given on the command line win over the file.

Between nodes the agent runs WireGuard (wireguard-go) on the overlay range (--overlay-prefix),
with its keys in --state-dir. Peers come from Node objects in the catalog and from the
directories of the mesh-relay servers given with --relay (repeatable; the node proves the join
token of --join-token-file to each). Each peer is reached over the best path that answers
probes: one of its LAN addresses, a hole-punched direct path, or the relay.

Resources: the agent sets the Go runtime's soft memory limit (GOMEMLIMIT) to 80% of the
memory limit of its cgroup (v1 or v2; a GOMEMLIMIT in the environment wins), runs with
GOGC=50 (a GOGC in the environment wins), takes GOMAXPROCS
from the cgroup's CPU quota (the Go runtime does this), raises its soft file descriptor limit
to the hard one, and logs all of them at start ("resource limits"). Flows, DNS work and UDP
state are capped within those limits; what is over a cap is refused and counted (the Limits
section of "meshctl status"; docs/limits.md lists every cap):

  --max-tcp-flows, --max-udp-flows  the flows held at once by the service stack (this node's
      applications to services) and, apart, by the forward listener (other nodes to this
      node's endpoints). A client may hold a quarter of the service stack's, a peer node half
      of the listener's. 0, the default, derives them from the file descriptor limit N:
      N/5 TCP flows (64-8192) and N/10 UDP flows (32-4096), which at their caps hold four
      fifths of N. A TCP flow over a cap is refused (a RST, or "busy" to the other node); a
      UDP datagram over a cap is dropped, unless at its client's own cap the client's least
      recently active flow has been idle long enough to be evicted for it.
  --dns-source-rate  UDP datagrams a second one source address may send to the DNS server
      (default 20000; a query forwarded upstream costs 10); beyond it they are dropped
      unread. -1 removes the limit.
  --dns-max-forwards  exchanges with the upstream resolvers in flight (default 64); a query
      that needs one more is answered SERVFAIL.
  --wireguard-buffers  WireGuard's 64 KiB packet buffers (default 768, 48 MiB at most).

--pprof serves the Go profiler under /debug/pprof/ on --health-addr, to take a heap
profile ("go tool pprof http://ADDR/debug/pprof/heap"); it is off by default.

up needs root (or CAP_NET_ADMIN) for the TUN device and its routes.`,
		Example: `  meshctl up --node-name edge-1 --services-file /etc/edgewire/services.yaml
  meshctl up --config /etc/edgewire/config.yaml
  meshctl up --kubeconfig /etc/edgewire/kubeconfig --node-name edge-1 --join-token-file /etc/edgewire/join-token`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if configPath != "" {
				if err := o.loadConfigFile(configPath, cmd.Flags()); err != nil {
					return err
				}
			}
			return runUp(cmd.Context(), &o)
		},
	}
	o.addFlags(cmd.Flags())
	cmd.Flags().StringVar(&configPath, "config", "", "YAML config file (flags win over it)")
	return cmd
}

func runUp(ctx context.Context, o *upOptions) error {
	p, err := o.parse()
	if err != nil {
		return err
	}
	logger, err := newLogger(o.LogLevel, o.LogFormat)
	if err != nil {
		return err
	}
	res := sysres.Apply(logger, sysres.Host, 0, sysres.DefaultGCPercent)
	if need, over := flowBudgetExceeded(o.MaxTCPFlows, o.MaxUDPFlows, int(min(res.NoFile, 1<<20))); over {
		logger.Warn("--max-tcp-flows/--max-udp-flows: the flows at their caps would hold more than 4/5 of the file descriptor limit, "+
			"so flows may fail for want of descriptors instead of being refused and counted; raise the limit (LimitNOFILE, ulimit -n) or lower the caps",
			"descriptors_at_caps", need, "nofile", res.NoFile)
	}
	upstreams := p.upstreams
	if len(upstreams) == 0 && o.ResolvConf != "" {
		upstreams, err = dns.ReadResolvConf(o.ResolvConf, p.dnsIP)
		if err != nil {
			logger.Warn("no upstream resolvers: names outside the cluster domain will fail", "resolv_conf", o.ResolvConf, "err", err)
		}
	}
	var source discovery.Source
	sourceName := "file " + o.ServicesFile
	if p.kubernetes {
		source, err = k8s.New(k8s.Config{
			Kubeconfig:           o.Kubeconfig,
			Logger:               logger,
			NodeName:             o.NodeName,
			CachePath:            filepath.Join(o.StateDir, "catalog-k8s.json"),
			SyncTimeout:          o.KubeSyncTimeout,
			RelaySecretNamespace: p.relaySecretNS,
			RelaySecretName:      p.relaySecretName,
		})
		if err != nil {
			return err
		}
		sourceName = "kubernetes"
		if o.Kubeconfig != "" {
			sourceName = "kubernetes (" + o.Kubeconfig + ")"
		}
	} else {
		source = static.New(static.Config{Path: o.ServicesFile, Logger: logger})
	}
	agent, err := overlay.New(overlay.Config{
		Logger:           logger,
		NodeName:         o.NodeName,
		StateDir:         o.StateDir,
		ServiceCIDR:      p.serviceCIDR,
		DNSIP:            p.dnsIP,
		ClusterDomain:    o.ClusterDomain,
		ControlSocket:    o.ControlSocket,
		TUNName:          o.TUNName,
		ListenPort:       uint16(o.ListenPort),
		OverlayPrefix:    p.overlay,
		WGInterface:      o.WGInterface,
		ForwardPort:      uint16(o.ForwardPort),
		Relays:           o.Relays,
		JoinToken:        p.joinToken,
		MTU:              o.MTU,
		UDPIdleTimeout:   o.UDPIdleTimeout,
		ConnectTimeout:   o.ConnectTimeout,
		Upstreams:        upstreams,
		Source:           source,
		SourceName:       sourceName,
		HealthAddr:       p.healthAddr,
		Pprof:            o.Pprof,
		WireGuardBuffers: o.WGBuffers,
		MaxTCPFlows:      o.MaxTCPFlows,
		MaxUDPFlows:      o.MaxUDPFlows,
		DNSSourceRate:    o.DNSSourceRate,
		DNSMaxForwards:   o.DNSMaxForwards,
	})
	if err != nil {
		return err
	}
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := agent.Run(ctx); err != nil {
		return fmt.Errorf("up: %w", err)
	}
	return nil
}
