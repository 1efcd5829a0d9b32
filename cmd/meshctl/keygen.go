package main

import (
	"encoding/base64"
	"fmt"
	"net/netip"

	"github.com/spf13/cobra"

	"github.com/edgewire/edgewire/overlay/identity"
)

// keygenResult is what `meshctl keygen --json` prints.
type keygenResult struct {
	WireGuardPublicKey string `json:"wireguardPublicKey"`
	OverlayAddress     string `json:"overlayAddress"`
	Libp2pPublicKey    string `json:"libp2pPublicKey"`
	Created            bool   `json:"created"`
}

func newKeygenCmd() *cobra.Command {
	var stateDir, prefix string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "keygen",
		Short: "Create the node's keys if missing and print its public key",
		Long: `keygen creates the node's keys in the state directory, as "meshctl up" does on first
start, and prints the node's WireGuard public key, one line, the way "wg genkey | wg pubkey"
would. Run it again and it prints the same key: existing keys are reused, never replaced.

The state directory (--state-dir, default /var/lib/edgewire) gets wireguard.key, the
WireGuard private key in wg's base64 format, and libp2p.key, the node's Ed25519 libp2p key;
both are created 0600 and refused if group or other can read them. Publish the public key on
the node (the edgewire.io/wireguard-public-key annotation) so other nodes accept it as a peer.

With --json it also prints the node's overlay address, derived from the WireGuard public key
inside --overlay-prefix (default ` + identity.DefaultOverlayPrefix.String() + `; it must match the
agents' setting), the base64 of the raw libp2p Ed25519 public key, and whether the keys were
just created. keygen needs no running agent.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, err := netip.ParsePrefix(prefix)
			if err != nil {
				return fmt.Errorf("--overlay-prefix: %w", err)
			}
			if err := identity.CheckOverlayPrefix(p); err != nil {
				return fmt.Errorf("--overlay-prefix: %w", err)
			}
			id, created, err := identity.LoadOrCreate(stateDir)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if !asJSON {
				_, err := fmt.Fprintln(w, id.WireGuardPublic)
				return err
			}
			addr, err := identity.OverlayAddr(p, id.WireGuardPublic)
			if err != nil {
				return fmt.Errorf("overlay address: %w", err)
			}
			return printJSON(w, keygenResult{
				WireGuardPublicKey: id.WireGuardPublic.String(),
				OverlayAddress:     addr.String(),
				Libp2pPublicKey:    base64.StdEncoding.EncodeToString(id.Libp2pPublic()),
				Created:            created,
			})
		},
	}
	cmd.Flags().StringVar(&stateDir, "state-dir", "/var/lib/edgewire", "directory holding the node's keys")
	cmd.Flags().StringVar(&prefix, "overlay-prefix", identity.DefaultOverlayPrefix.String(), "IPv6 overlay range (/48 to /96) for --json's overlay address")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
