//go:build linux

package tun

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

var nsCounter atomic.Int32

// uniqueName returns a device name unique to this test process.
func uniqueName() string {
	return fmt.Sprintf("ewt%d-%d", os.Getpid()%100000, nsCounter.Add(1))
}

// inNetns runs fn on a thread moved into a fresh network namespace, then restores the thread's namespace
// and closes (so deletes) the new one. It needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and fails without.
func inNetns(t testing.TB, fn func(nl *netlink.Handle)) {
	t.Helper()
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Fatalf("this test needs /dev/net/tun and root: %v", err)
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("get network namespace: %v", err)
	}
	newNS, err := netns.New()
	if err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		t.Fatalf("create network namespace (this test needs root): %v", err)
	}
	defer func() {
		if err := netns.Set(orig); err != nil {
			// Leave the thread locked: the runtime discards it when the goroutine ends.
			t.Errorf("restore network namespace: %v", err)
		} else {
			runtime.UnlockOSThread()
		}
		newNS.Close()
		orig.Close()
	}()
	nl, err := netlink.NewHandle()
	if err != nil {
		t.Fatalf("netlink handle: %v", err)
	}
	defer nl.Close()
	fn(nl)
}

func TestOpenClose(t *testing.T) {
	inNetns(t, func(nl *netlink.Handle) {
		name := uniqueName()
		routes := []netip.Prefix{
			netip.MustParsePrefix("9.251.0.0/16"),
			netip.MustParsePrefix("169.254.96.16/32"),
			netip.MustParsePrefix("fd00:9251::/64"),
		}
		addr := netip.MustParsePrefix("100.64.0.1/32")
		d, err := Open(Config{Name: name, MTU: 1400, Addrs: []netip.Prefix{addr}, Routes: routes})
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		if d.Name() != name {
			t.Errorf("Name = %q, want %q", d.Name(), name)
		}
		if mtu, err := d.TUN().MTU(); err != nil || mtu != 1400 {
			t.Errorf("MTU = %d, %v; want 1400", mtu, err)
		}
		link, err := nl.LinkByName(name)
		if err != nil {
			t.Fatalf("link %s missing after Open: %v", name, err)
		}
		if link.Attrs().TxQLen != txQueueLen {
			t.Errorf("link txqueuelen = %d, want %d", link.Attrs().TxQLen, txQueueLen)
		}
		if link.Attrs().MTU != 1400 {
			t.Errorf("link MTU = %d, want 1400", link.Attrs().MTU)
		}
		if link.Attrs().Flags&net.FlagUp == 0 {
			t.Errorf("link %s not up", name)
		}
		got := linkRoutes(t, nl, link)
		for _, r := range routes {
			if !slices.Contains(got, r) {
				t.Errorf("route %v missing; routes on %s: %v", r, name, got)
			}
		}
		addrs := linkAddrs(t, nl, link)
		if !slices.Contains(addrs, addr) {
			t.Errorf("address %v missing; addresses: %v", addr, addrs)
		}
		if slices.Contains(addrs, netip.MustParsePrefix("169.254.96.16/32")) {
			t.Error("the DNS address was assigned to the kernel device; it must only be routed")
		}

		// A second device of the same name is refused with a hint.
		if d2, err := Open(Config{Name: name}); err == nil {
			d2.Close()
			t.Error("second Open of the same name succeeded")
		} else if !strings.Contains(err.Error(), "exists") {
			t.Errorf("second Open error = %v, want it to say the device exists", err)
		}

		for i := range 2 {
			if err := d.Close(); err != nil {
				t.Fatalf("Close #%d: %v", i+1, err)
			}
		}
		if _, err := nl.LinkByName(name); !errors.As(err, new(netlink.LinkNotFoundError)) {
			t.Errorf("link %s still present after Close (err %v)", name, err)
		}
		all, err := nl.RouteList(nil, netlink.FAMILY_ALL)
		if err != nil {
			t.Fatalf("list routes: %v", err)
		}
		for _, r := range all {
			if r.Dst != nil && slices.Contains(routes, prefixOf(r.Dst)) {
				t.Errorf("route %v left after Close", r.Dst)
			}
		}
	})
}

// TestOpenRollback: a route that cannot be added fails Open, which removes the device it created.
func TestOpenRollback(t *testing.T) {
	inNetns(t, func(nl *netlink.Handle) {
		route := netip.MustParsePrefix("9.251.0.0/16")
		first, err := Open(Config{Name: uniqueName(), Routes: []netip.Prefix{route}})
		if err != nil {
			t.Fatalf("Open first: %v", err)
		}
		defer first.Close()
		name := uniqueName()
		second, err := Open(Config{Name: name, Addrs: []netip.Prefix{netip.MustParsePrefix("100.64.0.2/32")}, Routes: []netip.Prefix{route}})
		if err == nil {
			second.Close()
			t.Fatal("Open with a clashing route succeeded")
		}
		if !strings.Contains(err.Error(), "add route 9.251.0.0/16") {
			t.Errorf("error = %v, want it to name the route", err)
		}
		if _, err := nl.LinkByName(name); !errors.As(err, new(netlink.LinkNotFoundError)) {
			t.Errorf("link %s left behind by a failed Open (err %v)", name, err)
		}
	})
}

func TestOpenBadConfig(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"name too long", Config{Name: "a-very-long-device-name"}, "longer than"},
		{"mtu too small", Config{Name: "ewbad0", MTU: 100}, "MTU 100"},
		{"invalid route", Config{Name: "ewbad0", Routes: []netip.Prefix{{}}}, "invalid prefix"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := Open(tc.cfg)
			if err == nil {
				d.Close()
				t.Fatal("Open succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error = %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

func linkRoutes(t *testing.T, nl *netlink.Handle, link netlink.Link) []netip.Prefix {
	t.Helper()
	rs, err := nl.RouteList(link, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatalf("list routes: %v", err)
	}
	var out []netip.Prefix
	for _, r := range rs {
		if r.Dst != nil {
			out = append(out, prefixOf(r.Dst))
		}
	}
	return out
}

func linkAddrs(t *testing.T, nl *netlink.Handle, link netlink.Link) []netip.Prefix {
	t.Helper()
	as, err := nl.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatalf("list addresses: %v", err)
	}
	var out []netip.Prefix
	for _, a := range as {
		out = append(out, prefixOf(a.IPNet))
	}
	return out
}

func prefixOf(n *net.IPNet) netip.Prefix {
	a, _ := netip.AddrFromSlice(n.IP)
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones)
}
