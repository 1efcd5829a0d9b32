package main

import (
	"fmt"
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

With --json it prints the whole status object for scripts. It exits non-zero when no
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
			pr := st.Process
			memLimit := "none"
			if pr.GoMemLimit > 0 {
				memLimit = bytesString(uint64(pr.GoMemLimit))
			}
			fmt.Fprintf(t, "Process:	RSS %s (peak %s), heap %s of GOMEMLIMIT %s; %d goroutines, GOMAXPROCS %d; %d of %d files open\n",
				bytesString(pr.RSSBytes), bytesString(pr.PeakRSSBytes), bytesString(pr.HeapBytes), memLimit,
				pr.Goroutines, pr.GOMAXPROCS, pr.OpenFiles, pr.FileLimit)
			fmt.Fprintf(t, "WireGuard buffers:\t%d of %d out (64 KiB each), nearly out %d times; memory returned to the kernel %d times\n",
				pr.WireGuardBuffers, pr.WireGuardBuffersMax, pr.WireGuardFlushes, pr.MemoryReleases)
			return t.Flush()
		},
	}
	addControlSocketFlag(cmd, &socket)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
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
