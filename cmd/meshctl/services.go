package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/edgewire/edgewire/overlay/control"
)

func newServicesCmd() *cobra.Command {
	var socket string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "services",
		Short: "List the services the agent serves",
		Long: `services lists every service in the running agent's catalog: namespace, name, service
IP, ports (port/protocol→targetPort), load-balancing policy, and how many of its endpoints
are ready. Headless services have no service IP; DNS answers them with endpoint addresses.

With --json it prints every service with its endpoints, their nodes, flow counts and, for
an endpoint that failed, until when it is ejected.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			svcs, err := control.NewClient(socket).Services(cmd.Context())
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if asJSON {
				return printJSON(w, svcs)
			}
			t := newTable(w)
			fmt.Fprintln(t, "NAMESPACE\tNAME\tIP\tPORTS\tPOLICY\tENDPOINTS")
			for _, s := range svcs {
				ip := s.IP
				if s.Headless {
					ip = "None (headless)"
				}
				if ip == "" {
					ip = "-"
				}
				fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%d/%d\n", s.Namespace, s.Name, ip, portsString(s.Ports), orDash(s.Policy), s.Ready, s.Total)
			}
			return t.Flush()
		},
	}
	addControlSocketFlag(cmd, &socket)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func portsString(ports []control.Port) string {
	parts := make([]string, 0, len(ports))
	for _, p := range ports {
		s := fmt.Sprintf("%d/%s", p.Port, p.Protocol)
		if p.TargetPort != "" {
			s += "→" + p.TargetPort
		}
		if p.Name != "" {
			s = p.Name + ":" + s
		}
		parts = append(parts, s)
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ",")
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
