// Command meshctl is edgewire's node agent (`meshctl up`) and the operator's CLI for it: every other
// verb is a thin client of the running agent's control socket.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

const defaultControlSocket = "/run/edgewire/meshctl.sock"

func main() {
	if err := newRootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "meshctl:", err)
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "meshctl",
		Short: "edgewire node agent and CLI",
		Long: `meshctl runs the edgewire node agent and talks to it.

edgewire gives edge and cloud nodes one Kubernetes-style service network. On each node,
"meshctl up" runs the agent: it owns the TUN device mesh0, routes the service range
(default 9.251.0.0/16) and the DNS address (default 169.254.96.16) to it, terminates flows
to service IPs in a userspace network stack and balances them across healthy endpoints,
and answers DNS for the cluster domain.

The other verbs ask the running agent over its control socket (--control-socket, default
` + defaultControlSocket + `): status, services, resolve, down. Read verbs take --json.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newUpCmd(), newStatusCmd(), newServicesCmd(), newResolveCmd(), newDownCmd(), newKeygenCmd(), newWGCmd(), newPingCmd(), newVersionCmd())
	return root
}

// addControlSocketFlag adds --control-socket to a client verb.
func addControlSocketFlag(cmd *cobra.Command, p *string) {
	cmd.Flags().StringVar(p, "control-socket", defaultControlSocket, "the agent's control socket")
}
