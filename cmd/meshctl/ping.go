package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"

	"github.com/spf13/cobra"

	"github.com/edgewire/edgewire/overlay/control"
)

func newPingCmd() *cobra.Command {
	var socket string
	var count int
	var untilDirect, asJSON bool
	cmd := &cobra.Command{
		Use:   "ping NODE",
		Short: "Probe a peer node over the current path",
		Long: `ping sends probes from this node's WireGuard socket to the peer node NODE over the path the
agent uses for it now, and prints for each probe the path kind — lan (one of the peer's LAN
addresses), direct (a hole-punched or public address) or relay (through mesh-relay) — the address
it went to and the round-trip time. Probes are authenticated with keys derived from both nodes'
WireGuard keys, so only the peer itself can answer them.

With --until-direct, ping keeps probing (and asks the relay to coordinate a hole punch) until a
probe is answered over a lan or direct path, like "tailscale ping"; it fails if none is within
--count probes (0: until interrupted).`,
		Example: `  meshctl ping edge-2
  meshctl ping --until-direct --count 30 edge-2`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if ctx == nil {
				ctx = context.Background()
			}
			ctx, stop := signal.NotifyContext(ctx, os.Interrupt)
			defer stop()
			w := cmd.OutOrStdout()
			direct := false
			err := control.NewClient(socket).Ping(ctx, args[0], count, untilDirect, func(r control.PingResult) {
				if r.Path == "lan" || r.Path == "direct" {
					direct = true
				}
				if asJSON {
					_ = printJSON(w, r)
					return
				}
				if r.Error != "" {
					fmt.Fprintf(w, "probe %d to %s: %s\n", r.Seq, r.Node, r.Error)
					return
				}
				fmt.Fprintf(w, "pong from %s via %s %s in %.2fms\n", r.Node, r.Path, r.Addr, r.RTTMs)
			})
			if err != nil {
				return err
			}
			if untilDirect && !direct {
				return errors.New("no direct path: every answered probe went through the relay")
			}
			return nil
		},
	}
	addControlSocketFlag(cmd, &socket)
	cmd.Flags().IntVarP(&count, "count", "c", 5, "number of probes (with --until-direct: the most to send; 0 = no limit)")
	cmd.Flags().BoolVar(&untilDirect, "until-direct", false, "probe until a lan or direct path answers")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object per probe")
	return cmd
}
