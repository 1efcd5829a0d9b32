package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/edgewire/edgewire/overlay/control"
)

func newResolveCmd() *cobra.Command {
	var socket, qtype string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "resolve NAME",
		Short: "Resolve a name through the agent's DNS server",
		Long: `resolve asks the running agent's DNS server for NAME, exactly as an application on the
node would through the DNS address, and prints the response code and records. Names in the
cluster domain (web.default.svc.cluster.local) are answered from the catalog; other names
are forwarded to the upstream resolvers. For --type PTR, NAME may be an IP address.

Examples:
  meshctl resolve web.default.svc.cluster.local
  meshctl resolve --type SRV _http._tcp.web.default.svc.cluster.local
  meshctl resolve --type PTR 9.251.0.10`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			res, err := control.NewClient(socket).Resolve(cmd.Context(), args[0], qtype)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if asJSON {
				return printJSON(w, res)
			}
			fmt.Fprintf(w, "%s %s: %s\n", res.Name, res.Type, res.Rcode)
			for _, rr := range res.Answer {
				fmt.Fprintln(w, rr)
			}
			for _, rr := range res.Authority {
				fmt.Fprintln(w, "authority:", rr)
			}
			for _, rr := range res.Additional {
				fmt.Fprintln(w, "additional:", rr)
			}
			return nil
		},
	}
	addControlSocketFlag(cmd, &socket)
	cmd.Flags().StringVarP(&qtype, "type", "t", "A", "query type: A, AAAA, SRV, PTR, CNAME, ...")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
