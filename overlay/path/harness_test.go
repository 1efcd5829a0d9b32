package path

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/crypto/curve25519"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/conn/bindtest"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/tuntest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// waitTimeout bounds every wait on the tunnel: generous, since CI runs with the race detector.
const waitTimeout = 10 * time.Second

// probeMagic starts every test datagram that is not WireGuard (not a byte 1..4 then three zeros).
var probeMagic = []byte("EWPROBE1")

// testNode is one wireguard-go device whose conn.Bind is a *Bind, behind a spy.
type testNode struct {
	tun  *tuntest.ChannelTUN
	dev  *device.Device
	bind *Bind
	spy  *spyBind
	ip   netip.Addr // overlay address inside the tunnel
	// seenAt returns the address from which the other node sees this node's datagrams, the address
	// the other node passes to SendTo to reach this one.
	seenAt func() netip.AddrPort
	other  *received // datagrams that reached OnPacket
}

// received records what OnPacket got.
type received struct {
	mu   sync.Mutex
	pkts []datagram
}

type datagram struct {
	pkt  []byte
	from netip.AddrPort
}

func (r *received) onPacket(pkt []byte, from netip.AddrPort) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pkts = append(r.pkts, datagram{pkt: bytes.Clone(pkt), from: from})
}

func (r *received) snapshot() []datagram {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]datagram(nil), r.pkts...)
}

// waitFor polls the received datagrams until cond holds for them or the deadline passes.
func (r *received) waitFor(tb testing.TB, what string, cond func([]datagram) bool) []datagram {
	tb.Helper()
	var got []datagram
	waitUntil(tb, what, func() bool {
		got = r.snapshot()
		return cond(got)
	})
	return got
}

// waitUntil polls cond every few milliseconds until it holds, failing tb after waitTimeout.
func waitUntil(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s", waitTimeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// spyBind sits between wireguard-go and a *Bind and records what wireguard-go is handed: the
// WireGuard message types, and any datagram that is not WireGuard (which must never happen).
type spyBind struct {
	*Bind
	types  [5]atomic.Uint64 // by WireGuard message type 1..4
	leaked atomic.Uint64    // datagrams handed to wireguard-go that are not WireGuard
}

func (s *spyBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fns, actual, err := s.Bind.Open(port)
	for i, fn := range fns {
		fns[i] = func(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
			n, err := fn(bufs, sizes, eps)
			for j := 0; err == nil && j < n; j++ {
				if sizes[j] == 0 {
					continue
				}
				pkt := bufs[j][:sizes[j]]
				if !isWireGuard(pkt) {
					s.leaked.Add(1)
					continue
				}
				s.types[pkt[0]].Add(1)
			}
			return n, err
		}
	}
	return fns, actual, err
}

// handshakes is the number of handshake messages (initiations and responses) wireguard-go received.
func (s *spyBind) handshakes() uint64 {
	return s.types[wgTypeInitiation].Load() + s.types[wgTypeResponse].Load()
}

// pairOptions varies genTestPair.
type pairOptions struct {
	// dropOther builds node i's Bind without OnPacket.
	dropOther [2]bool
}

// genTestPair builds two wireguard-go devices joined through *Bind, over loopback UDP sockets
// (realSocket) or wireguard-go's in-memory bindtest.ChannelBind, configured and up. They are
// closed when the test ends.
func genTestPair(tb testing.TB, realSocket bool) [2]*testNode {
	return genTestPairOpts(tb, realSocket, pairOptions{})
}

func genTestPairOpts(tb testing.TB, realSocket bool, opts pairOptions) [2]*testNode {
	tb.Helper()
	var inner [2]conn.Bind
	if realSocket {
		inner = [2]conn.Bind{conn.NewStdNetBind(), conn.NewStdNetBind()}
	} else {
		inner = bindtest.NewChannelBinds()
	}
	var privs, pubs [2]string
	for i := range privs {
		privs[i], pubs[i] = genKeyPair(tb)
	}
	var nodes [2]*testNode
	for i := range nodes {
		n := &testNode{
			tun:   tuntest.NewChannelTUN(),
			ip:    netip.AddrFrom4([4]byte{1, 0, 0, byte(i + 1)}),
			other: &received{},
		}
		cfg := Config{Inner: inner[i], OnPacket: n.other.onPacket}
		if opts.dropOther[i] {
			cfg.OnPacket = nil
		}
		n.bind = NewBind(cfg)
		n.spy = &spyBind{Bind: n.bind}
		if realSocket {
			n.seenAt = func() netip.AddrPort {
				return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), n.bind.Port())
			}
		} else {
			// bindtest.ChannelBind reports every datagram as coming from its own v6 target:
			// bind 1 sees bind 0 at 127.0.0.1:4, bind 0 sees bind 1 at 127.0.0.1:3.
			port := uint16(4 - i)
			n.seenAt = func() netip.AddrPort {
				return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), port)
			}
		}
		logger := &device.Logger{
			Verbosef: device.DiscardLogf,
			Errorf: func(format string, args ...any) {
				tb.Logf("dev%d: "+format, append([]any{i}, args...)...)
			},
		}
		n.dev = device.NewDevice(n.tun.TUN(), n.spy, logger)
		tb.Cleanup(n.dev.Close)
		nodes[i] = n
	}
	for i, n := range nodes {
		peer := nodes[i^1]
		uapi := uapiCfg(
			"private_key", privs[i],
			"listen_port", "0",
			"replace_peers", "true",
			"public_key", pubs[i^1],
			"replace_allowed_ips", "true",
			"allowed_ip", netip.PrefixFrom(peer.ip, 32).String(),
		)
		if err := n.dev.IpcSet(uapi); err != nil {
			tb.Fatalf("configure device %d: %v", i, err)
		}
		if err := n.dev.Up(); err != nil {
			tb.Fatalf("bring up device %d: %v", i, err)
		}
		if n.bind.Port() == 0 {
			tb.Fatalf("device %d is up but its Bind reports port 0", i)
		}
	}
	for i, n := range nodes {
		uapi := uapiCfg(
			"public_key", pubs[i^1],
			"endpoint", fmt.Sprintf("127.0.0.1:%d", nodes[i^1].bind.Port()),
		)
		if err := n.dev.IpcSet(uapi); err != nil {
			tb.Fatalf("set endpoint of device %d: %v", i, err)
		}
	}
	return nodes
}

// ping writes an ICMP echo for to.ip into from's TUN and waits for it to come out of to's TUN.
func ping(tb testing.TB, from, to *testNode) {
	tb.Helper()
	msg := tuntest.Ping(to.ip, from.ip)
	from.tun.Outbound <- msg
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	select {
	case got := <-to.tun.Inbound:
		if !bytes.Equal(got, msg) {
			tb.Fatalf("ping %v → %v: came out as %x, sent %x", from.ip, to.ip, got, msg)
		}
	case <-timer.C:
		tb.Fatalf("ping %v → %v did not transit within %v", from.ip, to.ip, waitTimeout)
	}
}

// pingBothWays pings in each direction.
func pingBothWays(tb testing.TB, nodes [2]*testNode) {
	tb.Helper()
	ping(tb, nodes[0], nodes[1])
	ping(tb, nodes[1], nodes[0])
}

// genKeyPair returns a fresh Curve25519 private key and its public key, hex-encoded for IpcSet.
func genKeyPair(tb testing.TB) (priv, pub string) {
	tb.Helper()
	var k [32]byte
	if _, err := rand.Read(k[:]); err != nil {
		tb.Fatalf("generate private key: %v", err)
	}
	k[0] &= 248
	k[31] = (k[31] & 127) | 64
	p, err := curve25519.X25519(k[:], curve25519.Basepoint)
	if err != nil {
		tb.Fatalf("derive public key: %v", err)
	}
	return hex.EncodeToString(k[:]), hex.EncodeToString(p)
}

// uapiCfg formats alternating keys and values for IpcSet (wireguard-go device_test.go).
func uapiCfg(kv ...string) string {
	var b strings.Builder
	for i := 0; i+1 < len(kv); i += 2 {
		fmt.Fprintf(&b, "%s=%s\n", kv[i], kv[i+1])
	}
	return b.String()
}
