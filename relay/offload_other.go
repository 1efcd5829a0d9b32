//go:build !linux

package relay

import "net"

// Elsewhere than on Linux the relay's socket has no UDP offloads (see offload_linux.go).

const maxGSOSegments = 1

var offloadOOBSize = 0

func setupSocket(*net.UDPConn) (tx, rx bool) { return false, false }

func groSize([]byte) int { return 0 }

func appendGSO(oob []byte, _ int) []byte { return oob }

func shouldDisableGSO(error) bool { return false }
