package main

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/edgewire/edgewire/overlay/control"
)

func newWGCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "wg",
		Short: "Inspect the agent's WireGuard device",
		Long: `wg inspects the running agent's WireGuard device (wireguard-go, in the agent's process).

The agent also serves wireguard-go's UAPI socket at /var/run/wireguard/<--wg-interface>.sock, so
Debian's own "wg show mesh0" and "wg showconf mesh0" work as well; "meshctl wg show" prints the
same, with each peer's node name beside its key.`,
	}
	cmd.AddCommand(newWGShowCmd())
	return cmd
}

func newWGShowCmd() *cobra.Command {
	var socket string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "show",
		Short: "Show the WireGuard device and its peers, like `wg show`",
		Long: `show prints the agent's WireGuard interface in the format of "wg show": public key and
listening port, then each peer with its node name, endpoint, allowed IPs, latest handshake,
transfer counters and keepalive. With --json it prints the same as an object.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			wg, err := control.NewClient(socket).WireGuard(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), wg)
			}
			printWG(cmd.OutOrStdout(), wg, time.Now())
			return nil
		},
	}
	addControlSocketFlag(cmd, &socket)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// printWG renders wg like `wg show` does: peers with the most recent handshake first.
func printWG(w io.Writer, wg control.WireGuard, now time.Time) {
	fmt.Fprintf(w, "interface: %s\n", wg.Interface)
	fmt.Fprintf(w, "  public key: %s\n", wg.PublicKey)
	fmt.Fprintf(w, "  private key: (hidden)\n")
	fmt.Fprintf(w, "  listening port: %d\n", wg.ListenPort)
	fmt.Fprintf(w, "  overlay address: %s\n", wg.Overlay)
	peers := append([]control.WGPeer(nil), wg.Peers...)
	sort.SliceStable(peers, func(i, j int) bool { return peers[i].LatestHandshake.After(peers[j].LatestHandshake) })
	for _, p := range peers {
		name := p.Node
		if name == "" {
			name = "unknown node"
		}
		fmt.Fprintf(w, "\npeer: %s (%s)\n", p.PublicKey, name)
		if p.Endpoint != "" {
			fmt.Fprintf(w, "  endpoint: %s\n", p.Endpoint)
		}
		allowed := "(none)"
		if len(p.AllowedIPs) > 0 {
			allowed = strings.Join(p.AllowedIPs, ", ")
		}
		fmt.Fprintf(w, "  allowed ips: %s\n", allowed)
		if !p.LatestHandshake.IsZero() {
			fmt.Fprintf(w, "  latest handshake: %s ago\n", now.Sub(p.LatestHandshake).Round(time.Second))
		}
		if p.RxBytes > 0 || p.TxBytes > 0 {
			fmt.Fprintf(w, "  transfer: %s received, %s sent\n", bytesString(p.RxBytes), bytesString(p.TxBytes))
		}
		if p.PersistentKeepalive > 0 {
			fmt.Fprintf(w, "  persistent keepalive: every %d seconds\n", p.PersistentKeepalive)
		}
	}
}

func bytesString(b uint64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.2f MiB", float64(b)/(1<<20))
	case b >= 1<<10:
		return fmt.Sprintf("%.2f KiB", float64(b)/(1<<10))
	}
	return fmt.Sprintf("%d B", b)
}
