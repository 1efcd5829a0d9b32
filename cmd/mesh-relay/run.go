package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/edgewire/edgewire/discovery/k8s"
	"github.com/edgewire/edgewire/overlay/sysres"
	"github.com/edgewire/edgewire/relay"
)

// options are the command line of mesh-relay.
type options struct {
	listen        string
	joinToken     string
	joinTokenFile string
	stateDir      string
	advertise     []string
	metricsAddr   string
	logLevel      string
	kubeSecret    string
	kubeconfig    string
	rateLimit     float64

	// What peers that have not registered may make the relay hold (relay.Limits).
	maxUnauthStreams      int
	maxUnauthStreamsPerIP int
	maxUnauthConns        int
	maxUnauthConnsPerIP   int
	maxConnsPerIP         int
	registerTimeout       time.Duration
}

func newRootCmd() *cobra.Command {
	var o options
	cmd := &cobra.Command{
		Use:   "mesh-relay",
		Short: "edgewire rendezvous and relay server",
		Long: `mesh-relay is the rendezvous and relay server of an edgewire mesh. Run it on a host every
node can reach (the cloud); several may run side by side, and nodes register with every relay
they are given ("meshctl up --relay ADDR --join-token TOKEN", --relay repeatable).

A node registers by proving it knows the cluster's join token; the relay binds the node's name
to its keys on first registration (a later node claiming that name with other keys is refused)
and gives it a node ID. Registered nodes get the node directory (name, keys, overlay address,
LAN addresses and the public address of each node's WireGuard socket), pushed on every change;
they ask the relay to coordinate simultaneous hole punches; and when no direct path works they
send their WireGuard datagrams through the relay, which forwards them between registered nodes
within a per-node rate limit (--rate-limit). Relayed traffic stays end-to-end encrypted by WireGuard.
Unregistered peers get nothing.

The relay listens on --listen (a port, or ADDR:PORT; default 4001) for libp2p over TCP and for
the UDP datagram relay on the same port number: open both in the firewall. Its libp2p identity
is kept in --state-dir (relay.key, 0600), so its peer ID stays the same across restarts, along
with the name bindings (bindings.json). At start it prints its peer ID and multiaddrs; nodes
name it either by a multiaddr with /p2p/<peer ID>, or by host:port, in which case they check
that the relay proves it knows the join token.

The join token comes from --join-token-file (preferred: a file readable only by the relay's
user) or --join-token (visible in the process list). The relay refuses to start without one.
Behind NAT or a load balancer, --advertise-addr HOST:PORT (repeatable) sets the addresses the
relay announces. --metrics-addr serves Prometheus metrics at /metrics.

In a Kubernetes cluster (deploy/relay.yaml), --kube-secret NAMESPACE/NAME makes the relay write
its multiaddrs into that existing Secret (data key: its peer ID), where the agents of
"meshctl up --kubernetes" find it: no relay list to configure on them. The relay uses its
in-cluster ServiceAccount, or --kubeconfig, and needs only get and patch on that one Secret.

Until a node has registered, its peer can make the relay hold little (package relay, "What
strangers can make the relay hold"): control frames of at most 8 KiB; control streams being
registered, at most --max-unauth-streams in all and --max-unauth-streams-per-ip from one address
(an IPv4 address or an IPv6 /64); connections on which no node is registered, at most
--max-unauth-conns in all and --max-unauth-conns-per-ip from one address; and any connection,
registered or not, at most --max-conns-per-ip from one address (nodes behind one NAT share
it). A stream or connection on which no node registers within --register-timeout is closed.
Every refusal is counted by reason in the metrics (edgewire_relay_unauth_refused_total,
edgewire_relay_libp2p_refused_total, edgewire_relay_registrations_refused_total). docs/limits.md
lists every bound.

At start the relay sets the Go runtime's soft memory limit (GOMEMLIMIT) to 80% of its cgroup's
memory limit (v1 or v2; a GOMEMLIMIT in the environment wins), runs with GOGC=50 (a GOGC in the
environment wins), raises its soft file descriptor limit to the hard one, and logs them
("resource limits").

The relay runs in the foreground until SIGINT or SIGTERM.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return run(cmd, o)
		},
	}
	o.addFlags(cmd.Flags())
	return cmd
}

func (o *options) addFlags(f *pflag.FlagSet) {
	d := relay.DefaultLimits()
	f.StringVar(&o.listen, "listen", "4001", "TCP and UDP port to listen on, or ADDR:PORT")
	f.StringVar(&o.joinToken, "join-token", "", "the cluster's join token (prefer --join-token-file)")
	f.StringVar(&o.joinTokenFile, "join-token-file", "", "file holding the join token")
	f.StringVar(&o.stateDir, "state-dir", "/var/lib/edgewire-relay", "relay identity and name bindings (created 0700)")
	f.StringArrayVar(&o.advertise, "advertise-addr", nil, "HOST:PORT (or multiaddr) to announce instead of the listen addresses; repeatable")
	f.StringVar(&o.metricsAddr, "metrics-addr", "", "HOST:PORT serving Prometheus metrics at /metrics (off when empty)")
	f.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	f.Float64Var(&o.rateLimit, "rate-limit", 10, "Gbit/s of relayed WireGuard data each node may send (burst 16 MiB); datagrams beyond it are dropped and counted")
	f.StringVar(&o.kubeSecret, "kube-secret", "", "NAMESPACE/NAME of the Kubernetes Secret to publish the relay's addresses in (off when empty)")
	f.StringVar(&o.kubeconfig, "kubeconfig", "", "with --kube-secret: kubeconfig file (default: in-cluster config)")
	f.IntVar(&o.maxUnauthStreams, "max-unauth-streams", d.MaxUnauthStreams, "most control streams being registered at once; one more is reset and counted")
	f.IntVar(&o.maxUnauthStreamsPerIP, "max-unauth-streams-per-ip", d.MaxUnauthStreamsPerIP, "most control streams being registered from one address (IPv4, or IPv6 /64)")
	f.IntVar(&o.maxUnauthConns, "max-unauth-conns", d.MaxUnauthConns, "most connections on which no node is registered; one more is closed and counted")
	f.IntVar(&o.maxUnauthConnsPerIP, "max-unauth-conns-per-ip", d.MaxUnauthConnsPerIP, "most connections with no node registered from one address; also the burst of new connections an address may open")
	f.IntVar(&o.maxConnsPerIP, "max-conns-per-ip", d.MaxConnsPerIP, "most connections from one address, registered or not (nodes behind one NAT share it)")
	f.DurationVar(&o.registerTimeout, "register-timeout", d.RegisterTimeout, "close a control stream or connection on which no node registers within this time")
}

// Bounds of --register-timeout: a node registers in a few round trips, and a stranger's
// connection is held this long.
const (
	minRegisterTimeout = time.Second
	maxRegisterTimeout = 5 * time.Minute
)

// limits checks the options that bound the relay and returns its relay.Limits.
func (o *options) limits() (relay.Limits, error) {
	if o.rateLimit <= 0 || o.rateLimit > 1000 {
		return relay.Limits{}, fmt.Errorf("--rate-limit %g: want Gbit/s in (0, 1000]", o.rateLimit)
	}
	d := relay.DefaultLimits()
	for _, c := range []struct {
		flag string
		v    int
		def  int
	}{
		{"--max-unauth-streams", o.maxUnauthStreams, d.MaxUnauthStreams},
		{"--max-unauth-streams-per-ip", o.maxUnauthStreamsPerIP, d.MaxUnauthStreamsPerIP},
		{"--max-unauth-conns", o.maxUnauthConns, d.MaxUnauthConns},
		{"--max-unauth-conns-per-ip", o.maxUnauthConnsPerIP, d.MaxUnauthConnsPerIP},
		{"--max-conns-per-ip", o.maxConnsPerIP, d.MaxConnsPerIP},
	} {
		if c.v < 1 {
			return relay.Limits{}, fmt.Errorf("%s %d: want at least 1 (default %d)", c.flag, c.v, c.def)
		}
	}
	if o.maxUnauthStreamsPerIP > o.maxUnauthStreams {
		return relay.Limits{}, fmt.Errorf("--max-unauth-streams-per-ip %d is more than --max-unauth-streams %d: lower it or raise --max-unauth-streams",
			o.maxUnauthStreamsPerIP, o.maxUnauthStreams)
	}
	if o.maxUnauthConnsPerIP > o.maxUnauthConns {
		return relay.Limits{}, fmt.Errorf("--max-unauth-conns-per-ip %d is more than --max-unauth-conns %d: lower it or raise --max-unauth-conns",
			o.maxUnauthConnsPerIP, o.maxUnauthConns)
	}
	if o.maxUnauthConnsPerIP > o.maxConnsPerIP {
		return relay.Limits{}, fmt.Errorf("--max-unauth-conns-per-ip %d is more than --max-conns-per-ip %d, which counts every connection of an address: lower it or raise --max-conns-per-ip",
			o.maxUnauthConnsPerIP, o.maxConnsPerIP)
	}
	if o.registerTimeout < minRegisterTimeout || o.registerTimeout > maxRegisterTimeout {
		return relay.Limits{}, fmt.Errorf("--register-timeout %s: want %s to %s (default %s)",
			o.registerTimeout, minRegisterTimeout, maxRegisterTimeout, d.RegisterTimeout)
	}
	return relay.Limits{
		DataRate:              o.rateLimit * 1e9 / 8,
		RegisterTimeout:       o.registerTimeout,
		MaxUnauthStreams:      o.maxUnauthStreams,
		MaxUnauthStreamsPerIP: o.maxUnauthStreamsPerIP,
		MaxUnauthConns:        o.maxUnauthConns,
		MaxUnauthConnsPerIP:   o.maxUnauthConnsPerIP,
		MaxConnsPerIP:         o.maxConnsPerIP,
	}, nil
}

// parseListen turns "4001" or "ADDR:PORT" into an address (zero = all) and a port.
func parseListen(s string) (netip.Addr, uint16, error) {
	host, port := "", s
	if h, p, err := net.SplitHostPort(s); err == nil {
		host, port = h, p
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return netip.Addr{}, 0, fmt.Errorf("--listen %q: port: %w", s, err)
	}
	if host == "" {
		return netip.Addr{}, uint16(n), nil
	}
	addr, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Addr{}, 0, fmt.Errorf("--listen %q: address: %w", s, err)
	}
	return addr, uint16(n), nil
}

func run(cmd *cobra.Command, o options) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	limits, err := o.limits()
	if err != nil {
		return err
	}
	addr, port, err := parseListen(o.listen)
	if err != nil {
		return err
	}
	var secretNS, secretName string
	if o.kubeSecret != "" {
		var ok bool
		secretNS, secretName, ok = strings.Cut(o.kubeSecret, "/")
		if !ok || secretNS == "" || secretName == "" || strings.Contains(secretName, "/") {
			return fmt.Errorf("--kube-secret %q: want NAMESPACE/NAME, such as edgewire/edgewire-relay", o.kubeSecret)
		}
	} else if o.kubeconfig != "" {
		return errors.New("--kubeconfig is only used with --kube-secret")
	}
	token, err := joinToken(o.joinToken, o.joinTokenFile, log)
	if err != nil {
		return err
	}
	sysres.Apply(log, sysres.Host, 0, sysres.DefaultGCPercent)
	srv, err := relay.NewServer(relay.ServerConfig{
		Logger:         log,
		ListenPort:     port,
		ListenAddr:     addr,
		JoinToken:      token,
		StateDir:       o.stateDir,
		AdvertiseAddrs: o.advertise,
		MetricsAddr:    o.metricsAddr,
		Limits:         limits,
	})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := srv.Start(); err != nil {
		return err
	}
	w := cmd.OutOrStdout()
	fmt.Fprintf(w, "peer ID: %s\n", srv.PeerID())
	for _, a := range srv.Multiaddrs() {
		fmt.Fprintf(w, "address: %s\n", a)
	}
	fmt.Fprintf(w, "mesh-relay ready: TCP and UDP port %d\n", srv.Port())
	published := make(chan error, 1)
	if secretName != "" {
		go func() {
			published <- k8s.PublishRelay(ctx, k8s.RelayConfig{
				Kubeconfig: o.kubeconfig,
				Logger:     log,
				Namespace:  secretNS,
				Name:       secretName,
				Key:        srv.PeerID(),
				Addrs:      srv.Multiaddrs(),
			})
		}()
	} else {
		published <- nil
	}
	<-ctx.Done()
	log.Info("shutting down")
	perr := <-published
	if errors.Is(perr, context.Canceled) {
		perr = nil
	}
	return errors.Join(perr, srv.Close())
}
