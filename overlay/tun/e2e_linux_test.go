//go:build linux

package tun

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/netstack"
)

// loopDialer dials a fixed TCP address. DialFlow runs on goroutines other than the test's locked one, so
// it dials in the test process's original network namespace, where the echo server listens.
type loopDialer struct{ target string }

func (d loopDialer) DialFlow(ctx context.Context, proto discovery.Protocol, src, dst netip.AddrPort) (net.Conn, error) {
	var nd net.Dialer
	return nd.DialContext(ctx, "tcp", d.target)
}

// TestEndToEnd: a kernel TCP socket in a fresh network namespace connects to a service IP; the route
// sends it through a real TUN and the Splitter into the service netstack, which splices it to an echo
// server. A kernel UDP socket queries a listener on the stack's DNS address the same way.
func TestEndToEnd(t *testing.T) {
	// The echo server listens in the original namespace (before the thread moves).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	var srvWG sync.WaitGroup
	srvWG.Add(1)
	go func() {
		defer srvWG.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			srvWG.Add(1)
			go func() {
				defer srvWG.Done()
				defer c.Close()
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	defer func() {
		ln.Close()
		srvWG.Wait()
	}()

	dnsIP := netip.MustParseAddr("169.254.96.16")
	inNetns(t, func(nl *netlink.Handle) {
		dev, err := Open(Config{
			Name:  uniqueName(),
			Addrs: []netip.Prefix{netip.MustParsePrefix("100.64.0.1/32"), netip.MustParsePrefix("fd00:64::1/128")},
			Routes: []netip.Prefix{netip.MustParsePrefix("9.251.0.0/16"), netip.PrefixFrom(dnsIP, 32),
				netip.MustParsePrefix("fd00:9251::/64")},
		})
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		stk, err := netstack.New(netstack.Config{
			Dialer:     loopDialer{target: ln.Addr().String()},
			Prefixes:   []netip.Prefix{netip.MustParsePrefix("9.251.0.0/16"), netip.MustParsePrefix("fd00:9251::/64")},
			LocalAddrs: []netip.Addr{dnsIP},
		})
		if err != nil {
			dev.Close()
			t.Fatalf("netstack.New: %v", err)
		}
		sp := NewSplitter(nil, dev.TUN())
		sp.Route(netip.MustParsePrefix("9.251.0.0/16"), stk)
		sp.Route(netip.PrefixFrom(dnsIP, 32), stk)
		sp.Route(netip.MustParsePrefix("fd00:9251::/64"), stk)
		if err := stk.Start(); err != nil {
			t.Fatalf("stack Start: %v", err)
		}
		if err := sp.Start(); err != nil {
			t.Fatalf("splitter Start: %v", err)
		}
		defer func() {
			// The documented order: close the devices, then wait for the Splitter.
			stk.Close()
			if err := dev.Close(); err != nil {
				t.Errorf("device Close: %v", err)
			}
			sp.Close()
		}()

		// No t.Run here: a subtest runs on another goroutine, outside this thread's namespace.
		for _, svc := range []string{"9.251.0.10:80", "[fd00:9251::10]:80"} { // TCP to a service IP
			c, err := net.DialTimeout("tcp", svc, 5*time.Second)
			if err != nil {
				t.Fatalf("dial service %s: %v", svc, err)
			}
			c.SetDeadline(time.Now().Add(30 * time.Second))
			data := make([]byte, 4<<20)
			rand.Read(data)
			werr := make(chan error, 1)
			go func() {
				_, err := c.Write(data)
				if err == nil {
					err = c.(*net.TCPConn).CloseWrite()
				}
				werr <- err
			}()
			got, err := io.ReadAll(c)
			c.Close()
			if err != nil {
				t.Fatalf("%s: read: %v", svc, err)
			}
			if err := <-werr; err != nil {
				t.Fatalf("%s: write: %v", svc, err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("%s: echoed %d bytes, want the %d sent", svc, len(got), len(data))
			}
		}

		func() { // UDP to the DNS IP

			pc, err := stk.ListenUDP(netip.AddrPortFrom(dnsIP, 53))
			if err != nil {
				t.Fatalf("ListenUDP: %v", err)
			}
			defer pc.Close()
			done := make(chan struct{})
			go func() {
				defer close(done)
				buf := make([]byte, 1500)
				n, from, err := pc.ReadFrom(buf)
				if err == nil {
					pc.WriteTo(append([]byte("answer to "), buf[:n]...), from)
				}
			}()
			c, err := net.Dial("udp", "169.254.96.16:53")
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Write([]byte("query")); err != nil {
				t.Fatalf("write: %v", err)
			}
			buf := make([]byte, 1500)
			n, err := c.Read(buf)
			if err != nil {
				t.Fatalf("read: %v", err)
			}
			if string(buf[:n]) != "answer to query" {
				t.Fatalf("reply = %q", buf[:n])
			}
			pc.Close()
			<-done
		}()

		st := sp.Stats()
		if st.Routes[0].Packets == 0 || st.Routes[1].Packets == 0 || st.Routes[2].Packets == 0 || st.ToKernel == 0 {
			t.Errorf("splitter stats = %+v, want packets both ways on every route", st)
		}
		// The kernel TUN has IFF_VNET_HDR (wireguard-go asks for it; every kernel since 2.6.27 has it),
		// so the 4 MiB each way travel as segmentation-offload packets, split by nobody.
		if st.SuperPacketsIn == 0 || st.SuperPacketsOut == 0 {
			t.Errorf("splitter stats = %+v, want super-packets both ways", st)
		}
		if st.DroppedMalformed != 0 || st.WriteErrors != 0 || st.ReadErrors != 0 {
			t.Errorf("splitter stats = %+v, want no drops or errors", st)
		}
	})
}
