package path

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
)

// TestPrimeRawNetns sends primed datagrams across a real routed hop: sender namespace → router
// namespace (forwarding) → receiver namespace. A TTL of 2 passes the router and arrives with TTL
// 1 from the route's source address and the WireGuard socket's port, with a valid UDP checksum
// (a UDP socket receives it); a TTL of 1 dies at the router.
func TestPrimeRawNetns(t *testing.T) {
	ns := netnsTopology(t)
	const dstPort = 9999
	dst := netip.MustParseAddrPort(fmt.Sprintf("10.77.2.2:%d", dstPort))

	var wgSock *net.UDPConn
	inNetns(t, ns.sender, func() {
		var err error
		wgSock, err = net.ListenUDP("udp4", &net.UDPAddr{})
		if err != nil {
			t.Fatalf("listen: %v", err)
		}
	})
	defer wgSock.Close()
	srcPort := uint16(wgSock.LocalAddr().(*net.UDPAddr).Port)

	var raw *ipv4.RawConn
	var udp *net.UDPConn
	inNetns(t, ns.receiver, func() {
		pc, err := net.ListenPacket("ip4:udp", "0.0.0.0")
		if err != nil {
			t.Fatalf("raw listen: %v", err)
		}
		raw, err = ipv4.NewRawConn(pc)
		if err != nil {
			t.Fatalf("raw conn: %v", err)
		}
		udp, err = net.ListenUDP("udp4", &net.UDPAddr{Port: dstPort})
		if err != nil {
			t.Fatalf("udp listen: %v", err)
		}
	})
	defer raw.Close()
	defer udp.Close()

	tests := []struct {
		name   string
		ttl    int
		arrive bool
	}{
		{"ttl 1 dies at the router", 1, false},
		{"ttl 2 passes one router", 2, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			payload := []byte(fmt.Sprintf("prime-ttl-%d", tc.ttl))
			marker := []byte(fmt.Sprintf("marker-after-ttl-%d", tc.ttl))
			inNetns(t, ns.sender, func() {
				if err := primeRaw(srcPort, dst, tc.ttl, payload); err != nil {
					t.Fatalf("primeRaw: %v", err)
				}
				// A full-TTL marker on the same path: when it arrives, anything sent before it has.
				if err := primeRaw(srcPort, dst, 64, marker); err != nil {
					t.Fatalf("primeRaw marker: %v", err)
				}
			})
			var primed int
			deadline := time.Now().Add(waitTimeout)
			buf := make([]byte, 1500)
			for {
				raw.SetReadDeadline(deadline)
				h, p, _, err := raw.ReadFrom(buf)
				if err != nil {
					t.Fatalf("raw read (primed %d): %v", primed, err)
				}
				if len(p) < 8 || binary.BigEndian.Uint16(p[2:]) != dstPort {
					continue
				}
				if got := binary.BigEndian.Uint16(p[0:]); got != srcPort || !h.Src.Equal(net.IPv4(10, 77, 1, 2)) {
					t.Errorf("datagram from %v:%d, want 10.77.1.2:%d", h.Src, got, srcPort)
				}
				if bytes.Equal(p[8:], marker) {
					break
				}
				if bytes.Equal(p[8:], payload) {
					primed++
					if h.TTL != tc.ttl-1 {
						t.Errorf("primed datagram arrived with TTL %d, want %d", h.TTL, tc.ttl-1)
					}
				}
			}
			if want := map[bool]int{true: primeCount, false: 0}[tc.arrive]; primed != want {
				t.Errorf("%d primed datagrams arrived, want %d", primed, want)
			}
			if tc.arrive {
				// Earlier markers may come first (primeRaw sends each datagram primeCount times).
				for {
					udp.SetReadDeadline(time.Now().Add(waitTimeout))
					n, from, err := udp.ReadFromUDPAddrPort(buf)
					if err != nil {
						t.Fatalf("UDP socket got no primed datagram (bad checksum?): %v", err)
					}
					if bytes.Equal(buf[:n], payload) {
						if from.Port() != srcPort {
							t.Errorf("UDP socket got the primed datagram from %v, want port %d", from, srcPort)
						}
						break
					}
				}
			}
		})
	}
}

type netnsLab struct{ sender, router, receiver string }

// netnsTopology builds sender — router — receiver namespaces, removed when the test ends.
func netnsTopology(t *testing.T) netnsLab {
	t.Helper()
	p := fmt.Sprintf("ewpath%d", os.Getpid()%100000)
	ns := netnsLab{sender: p + "s", router: p + "r", receiver: p + "d"}
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	for _, n := range []string{ns.sender, ns.router, ns.receiver} {
		run("netns", "add", n)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", n).Run() })
		run("-n", n, "link", "set", "lo", "up")
	}
	run("link", "add", p+"a", "netns", ns.sender, "type", "veth", "peer", "name", p+"b", "netns", ns.router)
	run("link", "add", p+"c", "netns", ns.router, "type", "veth", "peer", "name", p+"e", "netns", ns.receiver)
	run("-n", ns.sender, "addr", "add", "10.77.1.2/24", "dev", p+"a")
	run("-n", ns.router, "addr", "add", "10.77.1.1/24", "dev", p+"b")
	run("-n", ns.router, "addr", "add", "10.77.2.1/24", "dev", p+"c")
	run("-n", ns.receiver, "addr", "add", "10.77.2.2/24", "dev", p+"e")
	for _, l := range [][2]string{{ns.sender, p + "a"}, {ns.router, p + "b"}, {ns.router, p + "c"}, {ns.receiver, p + "e"}} {
		run("-n", l[0], "link", "set", l[1], "up")
	}
	run("-n", ns.sender, "route", "add", "default", "via", "10.77.1.1")
	run("-n", ns.receiver, "route", "add", "default", "via", "10.77.2.1")
	if out, err := exec.Command("ip", "netns", "exec", ns.router, "sysctl", "-qw", "net.ipv4.ip_forward=1").CombinedOutput(); err != nil {
		t.Fatalf("enable forwarding: %v: %s", err, out)
	}
	return ns
}

// inNetns runs f on an OS thread inside namespace name; sockets f creates stay in it.
func inNetns(t *testing.T, name string, f func()) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("own netns: %v", err)
	}
	defer orig.Close()
	target, err := os.Open("/run/netns/" + name)
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("netns %s: %v", name, err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("enter netns %s: %v", name, err)
	}
	defer func() {
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: it dies with its goroutine instead of serving others.
			t.Errorf("leave netns %s: %v", name, err)
			return
		}
		runtime.UnlockOSThread()
	}()
	f()
}
