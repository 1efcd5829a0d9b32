// Command mesh-relay is edgewire's rendezvous and relay server: nodes register with it using the
// cluster's join token, learn each other from its directory, coordinate hole punches through it,
// and relay WireGuard datagrams through it when no direct path works. The protocol is documented in
// package relay.
package main

import (
	"fmt"
	"os"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "mesh-relay:", err)
		os.Exit(1)
	}
}
