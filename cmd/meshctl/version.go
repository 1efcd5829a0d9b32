package main

import (
	"fmt"
	"runtime"

	"github.com/spf13/cobra"

	"github.com/edgewire/edgewire/overlay"
)

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print meshctl's version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintf(cmd.OutOrStdout(), "meshctl %s (%s)\n", overlay.Version, runtime.Version())
			return nil
		},
	}
}
