//go:build linux

package tun

import (
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/edgewire/edgewire/overlay/netstack"
)

// BenchmarkServiceTCP measures the single-node data path as the agent runs it: a kernel TCP socket in a
// fresh network namespace connects to a service IP, the route sends it through a real TUN and the
// Splitter into the service netstack, which splices it to a kernel socket on loopback. "up" sends from
// the client to the upstream, "down" the other way. Profile with -cpuprofile: the kernel's side is in the
// syscalls.
func BenchmarkServiceTCP(b *testing.B) {
	for _, tc := range []struct {
		name string
		up   bool
	}{
		{"up", true},
		{"down", false},
	} {
		b.Run(tc.name, func(b *testing.B) { benchServiceTCP(b, tc.up) })
	}
}

func benchServiceTCP(b *testing.B, up bool) {
	chunk := make([]byte, 1<<20)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatalf("listen: %v", err)
	}
	var srvWG sync.WaitGroup
	srvWG.Add(1)
	go func() {
		defer srvWG.Done()
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		if up {
			io.Copy(io.Discard, c)
			return
		}
		for {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
	}()
	defer func() {
		ln.Close()
		srvWG.Wait()
	}()

	inNetns(b, func(nl *netlink.Handle) {
		dev, err := Open(Config{
			Name:   uniqueName(),
			Addrs:  []netip.Prefix{netip.MustParsePrefix("100.64.0.1/32")},
			Routes: []netip.Prefix{netip.MustParsePrefix("9.251.0.0/16")},
		})
		if err != nil {
			b.Fatalf("Open: %v", err)
		}
		stk, err := netstack.New(netstack.Config{
			Dialer:   loopDialer{target: ln.Addr().String()},
			Prefixes: []netip.Prefix{netip.MustParsePrefix("9.251.0.0/16")},
		})
		if err != nil {
			dev.Close()
			b.Fatalf("netstack.New: %v", err)
		}
		sp := NewSplitter(nil, dev.TUN())
		sp.Route(netip.MustParsePrefix("9.251.0.0/16"), stk)
		if err := stk.Start(); err != nil {
			b.Fatalf("stack Start: %v", err)
		}
		if err := sp.Start(); err != nil {
			b.Fatalf("splitter Start: %v", err)
		}
		defer func() {
			stk.Close()
			dev.Close()
			sp.Close()
		}()

		c, err := net.DialTimeout("tcp", "9.251.0.10:80", 5*time.Second)
		if err != nil {
			b.Fatalf("dial service IP: %v", err)
		}
		defer c.Close()
		b.SetBytes(int64(len(chunk)))
		b.ResetTimer()
		if up {
			for b.Loop() {
				if _, err := c.Write(chunk); err != nil {
					b.Fatalf("write: %v", err)
				}
			}
		} else {
			buf := make([]byte, len(chunk))
			for b.Loop() {
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatalf("read: %v", err)
				}
			}
		}
		b.StopTimer()
	})
}
