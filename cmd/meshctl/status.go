package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/edgewire/edgewire/overlay/control"
)

func newStatusCmd() *cobra.Command {
	var socket string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the running agent's state",
		Long: `status asks the running agent for its state: node name, service range, DNS address,
how many services and endpoints its catalog holds, how long it has been up, and counters
of flows and DNS queries.

The Limits section shows, one line per group, each cap the agent enforces with what it
holds now and what it refused or dropped since it started (docs/limits.md lists them all):
  flows             the service netstack: TCP and UDP flows held of the total and
                    per-client caps, refused at either, UDP flows evicted, datagrams
                    dropped from full UDP queues
  forward listener  flows other nodes bring to this node's endpoints: held of the total
                    and per-peer caps, TCP answered busy, UDP dropped at a cap, evicted
  dns               datagrams over a source's rate, queries dropped with the workers'
                    queue full or expired in it, upstream exchanges refused at the cap,
                    answers shared by identical questions, TCP connections refused, replies
                    not sent
  process           memory, goroutines and files against GOMEMLIMIT and the file limit
  wireguard buffers WireGuard's packet buffers out of their bounded pool

With --json it prints the whole status object for scripts (the Limits section is under
"limits" and "process"). It exits non-zero when no
agent answers on the control socket, so "meshctl status --json" doubles as a readiness check.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := control.NewClient(socket).Status(cmd.Context())
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if asJSON {
				return printJSON(w, st)
			}
			t := newTable(w)
			fmt.Fprintf(t, "Node:\t%s\n", st.Node)
			fmt.Fprintf(t, "Version:\t%s\n", st.Version)
			fmt.Fprintf(t, "TUN:\t%s\n", st.TUN)
			fmt.Fprintf(t, "Service CIDR:\t%s\n", st.ServiceCIDR)
			fmt.Fprintf(t, "DNS:\t%s:53 (zone %s; upstreams %s)\n", st.DNSIP, st.ClusterDomain, orNone(st.Upstreams))
			fmt.Fprintf(t, "Catalog:\t%s, updated %s ago\n", st.CatalogSource, since(st.CatalogUpdatedAt))
			fmt.Fprintf(t, "Services:\t%d\n", st.Services)
			fmt.Fprintf(t, "Endpoints:\t%d (%d ready)\n", st.Endpoints, st.ReadyEndpoints)
			fmt.Fprintf(t, "Uptime:\t%s\n", (time.Duration(st.UptimeSeconds) * time.Second).String())
			fmt.Fprintf(t, "Flows:\t%d ok, %d no service, %d no endpoints, %d dial failures, %d retries; active %d tcp, %d udp\n",
				st.Flows.OK, st.Flows.NoService, st.Flows.NoEndpoints, st.Flows.DialFailures, st.Flows.Retries,
				st.Flows.ActiveTCP, st.Flows.ActiveUDP)
			fmt.Fprintf(t, "WireGuard:\t%s, overlay %s, port %d\n", st.PublicKey, st.Overlay, st.ListenPort)
			fmt.Fprintf(t, "Forwarded to local endpoints:\t%d tcp, %d udp; refused %d, bad header %d, dial failures %d\n",
				st.Forward.TCPAccepted, st.Forward.UDPAccepted, st.Forward.Refused, st.Forward.BadHeader, st.Forward.DialFailures)
			fmt.Fprintf(t, "Forwarded to other nodes:\t%d tcp dials on a spare connection, %d connected afresh; %d sent early data\n",
				st.Forward.SpareDials, st.Forward.FreshDials, st.Forward.EarlyDials)
			if st.DroppedDatagrams > 0 {
				fmt.Fprintf(t, "Dropped datagrams:\t%d (neither WireGuard nor a path frame)\n", st.DroppedDatagrams)
			}
			if st.Reflexive != "" {
				fmt.Fprintf(t, "Reflexive:\t%s\n", st.Reflexive)
			}
			for _, r := range st.Relays {
				fmt.Fprintf(t, "Relay:\t%s\n", r)
			}
			for _, p := range st.Peers {
				hs := "never"
				if !p.LatestHandshake.IsZero() {
					hs = since(p.LatestHandshake) + " ago"
				}
				fmt.Fprintf(t, "  peer %s:\t%s via %s %s, handshake %s, rx %s, tx %s\n",
					orDash(p.Node), p.PublicKey, orDash(p.Path), orDash(p.Endpoint), hs, bytesString(p.RxBytes), bytesString(p.TxBytes))
			}
			fmt.Fprintf(t, "DNS queries:\t%d (%d cluster, %d nxdomain, %d forwarded, %d cache hits, %d formerr, %d servfail)\n",
				st.DNS.Queries, st.DNS.Cluster, st.DNS.NXDomain, st.DNS.Forwarded, st.DNS.CacheHits, st.DNS.FormErr, st.DNS.ServFail)
			writeLimits(t, st.Limits, st.Process)
			return t.Flush()
		},
	}
	addControlSocketFlag(cmd, &socket)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// writeLimits writes the Limits section: one line per group, each cap with what it holds now and
// what it refused or dropped since the agent started.
func writeLimits(w io.Writer, l control.LimitStats, pr control.ProcessStats) {
	fmt.Fprintf(w, "Limits:\t\n")
	f := l.Flows
	fmt.Fprintf(w, "  flows:\ttcp %d of %d (%d per client), refused %d per client, %d total; udp %d of %d (%d per client), refused %d per client, %d total, %d evicted, %d queue drops\n",
		f.TCP.Held, f.TCP.Max, f.TCP.MaxPerClient, f.TCP.RefusedPerClient, f.TCP.RefusedTotal,
		f.UDP.Held, f.UDP.Max, f.UDP.MaxPerClient, f.UDP.RefusedPerClient, f.UDP.RefusedTotal, f.UDP.Evicted, f.UDP.QueueDrops)
	fw := l.Forward
	fmt.Fprintf(w, "  forward listener:\ttcp %d of %d (%d per peer), busy %d per peer, %d total; udp %d of %d (%d per peer), dropped %d per peer, %d total, %d evicted\n",
		fw.TCPHeld, fw.MaxTCP, fw.MaxTCPPerPeer, fw.TCPBusyPerPeer, fw.TCPBusyTotal,
		fw.UDPHeld, fw.MaxUDP, fw.MaxUDPPerPeer, fw.UDPCapPerPeer, fw.UDPCapTotal, fw.UDPEvicted)
	d := l.DNS
	fmt.Fprintf(w, "  dns:\t%d policed before the socket, %d rate limited (%d datagrams from untracked sources), %d queue full, %d expired, %d forward refused, %d coalesced, %d tcp refused, %d replies dropped, %d dropped, %d read errors\n",
		d.Policed, d.RateLimited, d.Untracked, d.QueueFull, d.Expired, d.ForwardRefused, d.Coalesced, d.TCPRefused, d.ReplyDropped, d.Dropped, d.ReadErrors)
	memLimit := "none"
	if pr.GoMemLimit > 0 {
		memLimit = bytesString(uint64(pr.GoMemLimit))
	}
	fmt.Fprintf(w, "  process:\tRSS %s (peak %s), heap %s of GOMEMLIMIT %s; %d goroutines, GOMAXPROCS %d; %d of %d files open\n",
		bytesString(pr.RSSBytes), bytesString(pr.PeakRSSBytes), bytesString(pr.HeapBytes), memLimit,
		pr.Goroutines, pr.GOMAXPROCS, pr.OpenFiles, pr.FileLimit)
	fmt.Fprintf(w, "  wireguard buffers:\t%d of %d out (64 KiB each), nearly out %d times; memory returned to the kernel %d times\n",
		pr.WireGuardBuffers, pr.WireGuardBuffersMax, pr.WireGuardFlushes, pr.MemoryReleases)
}

func orNone(ss []string) string {
	if len(ss) == 0 {
		return "none"
	}
	return strings.Join(ss, ", ")
}

func since(t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return time.Since(t).Round(time.Second).String()
}
