package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/edgewire/edgewire/overlay/control"
)

func newDownCmd() *cobra.Command {
	var socket string
	cmd := &cobra.Command{
		Use:   "down",
		Short: "Stop the running agent",
		Long: `down asks the running agent to shut down, as SIGTERM would: it closes its flows, removes
the TUN device and its routes from the host, and exits.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := control.NewClient(socket).Down(cmd.Context()); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), "agent is shutting down")
			return nil
		},
	}
	addControlSocketFlag(cmd, &socket)
	return cmd
}
