package dns

import (
	"bufio"
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
)

// ReadResolvConf returns the nameservers of the resolv.conf at path as upstreams for
// Config.Upstreams: "ip:53" entries ("[ipv6]:53" for IPv6, with the zone when the file gives one),
// in file order, without duplicates and without the addresses in exclude (the agent passes its own
// DNS IP so that it never forwards to itself). Local stub resolvers such as systemd-resolved's
// 127.0.0.53 are kept unless excluded; note that a stub is only reachable when the server's
// upstream sockets are host sockets. Comments (# or ;) and other directives are ignored. A
// nameserver line whose address does not parse is an error; a file without nameservers yields
// an empty list.
func ReadResolvConf(path string, exclude ...netip.Addr) ([]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("resolv.conf: %w", err)
	}
	skip := make([]netip.Addr, len(exclude))
	for i, a := range exclude {
		skip[i] = a.Unmap().WithZone("")
	}
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(data))
	for line := 1; sc.Scan(); line++ {
		text := sc.Text()
		if i := strings.IndexAny(text, "#;"); i >= 0 {
			text = text[:i]
		}
		fields := strings.Fields(text)
		if len(fields) == 0 || fields[0] != "nameserver" {
			continue
		}
		if len(fields) != 2 {
			return nil, fmt.Errorf("resolv.conf %s:%d: nameserver wants one address, got %d", path, line, len(fields)-1)
		}
		addr, err := netip.ParseAddr(fields[1])
		if err != nil {
			return nil, fmt.Errorf("resolv.conf %s:%d: nameserver: %w", path, line, err)
		}
		addr = addr.Unmap()
		if slices.Contains(skip, addr.WithZone("")) {
			continue
		}
		up := netip.AddrPortFrom(addr, 53).String()
		if !slices.Contains(out, up) {
			out = append(out, up)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("resolv.conf %s: %w", path, err)
	}
	return out, nil
}
