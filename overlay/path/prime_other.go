//go:build !linux

package path

import (
	"errors"
	"net/netip"
)

// primeRaw is Linux-only: elsewhere punches go without priming.
func primeRaw(uint16, netip.AddrPort, int, []byte) error {
	return errors.New("priming the NAT mapping needs Linux")
}
