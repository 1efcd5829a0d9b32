package overlay

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/curve25519"
	"golang.zx2c4.com/wireguard/conn/bindtest"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/tuntest"

	"github.com/edgewire/edgewire/overlay/identity"
)

// boundedPair is two wireguard-go devices over in-memory binds and TUNs, each with a bounded pool,
// peers of each other with overlay addresses 1.0.0.1 and 1.0.0.2 (wireguard-go's genTestPair).
type boundedPair struct {
	tuns  [2]*tuntest.ChannelTUN
	devs  [2]*device.Device
	stats [2]*bufferStats
}

func newBoundedPair(t *testing.T, maxBuffers uint32) *boundedPair {
	t.Helper()
	var priv, pub [2][32]byte
	for i := range priv {
		if _, err := rand.Read(priv[i][:]); err != nil {
			t.Fatal(err)
		}
		p, err := curve25519.X25519(priv[i][:], curve25519.Basepoint)
		if err != nil {
			t.Fatal(err)
		}
		copy(pub[i][:], p)
	}
	binds := bindtest.NewChannelBinds()
	p := &boundedPair{}
	for i := range 2 {
		p.tuns[i] = tuntest.NewChannelTUN()
		p.stats[i] = &bufferStats{}
		gate := newGatedTUN(p.tuns[i].TUN(), nil)
		dev := device.NewDevice(gate, binds[i], device.NewLogger(device.LogLevelError, fmt.Sprintf("dev%d: ", i)))
		if err := boundBuffers(dev, maxBuffers, p.stats[i]); err != nil {
			t.Fatalf("boundBuffers: %v (has wireguard-go's Device layout changed?)", err)
		}
		gate.open()
		p.devs[i] = dev
		t.Cleanup(dev.Close)
		cfg := fmt.Sprintf("private_key=%s\nlisten_port=0\nreplace_peers=true\npublic_key=%s\nprotocol_version=1\nreplace_allowed_ips=true\nallowed_ip=1.0.0.%d/32\n",
			hex.EncodeToString(priv[i][:]), hex.EncodeToString(pub[i^1][:]), 2-i)
		if err := dev.IpcSet(cfg); err != nil {
			t.Fatal(err)
		}
		if err := dev.Up(); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 2 {
		port := listenPort(t, p.devs[i^1])
		if err := p.devs[i].IpcSet(fmt.Sprintf("public_key=%s\nendpoint=127.0.0.1:%d\n", hex.EncodeToString(pub[i^1][:]), port)); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

func listenPort(t *testing.T, dev *device.Device) int {
	t.Helper()
	conf, err := dev.IpcGet()
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(conf, "\n") {
		if v, ok := strings.CutPrefix(line, "listen_port="); ok {
			var port int
			fmt.Sscan(v, &port)
			return port
		}
	}
	t.Fatal("no listen_port")
	return 0
}

// TestBoundBuffers pushes the bounded pool: a Get beyond the bound waits until a buffer comes back.
func TestBoundBuffers(t *testing.T) {
	const bound = 8
	p := newBoundedPair(t, bound)
	dev := p.devs[0]
	// The device's receivers (two, a batch of one each) and its TUN reader (a batch of one) hold
	// three buffers; take the rest.
	var held []*[device.MaxMessageSize]byte
	deadline := time.Now().Add(5 * time.Second)
	// The device's goroutines take their buffers as they start.
	Eventually(t, 5*time.Second, "the device holds its 3 buffers", func() bool { return p.stats[0].inUse() == 3 })
	for len(held) < bound-3 {
		got := make(chan *[device.MaxMessageSize]byte, 1)
		go func() { got <- dev.GetMessageBuffer() }()
		select {
		case b := <-got:
			held = append(held, b)
		case <-time.After(time.Until(deadline)):
			t.Fatalf("Get %d of %d waited: the device holds more than 3 buffers", len(held)+1, bound-3)
		}
	}
	extra := make(chan *[device.MaxMessageSize]byte, 1)
	go func() { extra <- dev.GetMessageBuffer() }()
	select {
	case <-extra:
		t.Fatalf("Get beyond the bound of %d returned at once", bound)
	case <-time.After(200 * time.Millisecond):
		// Still waiting, as it must while every buffer is out.
	}
	dev.PutMessageBuffer(held[0])
	select {
	case b := <-extra:
		held[0] = b
	case <-time.After(5 * time.Second):
		t.Fatal("Get beyond the bound still waits after a Put")
	}
	for _, b := range held {
		dev.PutMessageBuffer(b)
	}
	if n := p.stats[0].inUse(); n != 3 {
		t.Errorf("%d buffers out after all were put back, want the device's own 3", n)
	}
}

// TestBoundBuffersTraffic sends packets both ways through two devices whose pools are much smaller
// than a burst: every packet arrives (the bound slows the pipeline, it loses nothing the channels
// hold), the pools never make more than their bound, and the race detector sees the gate order the
// replacement before the devices' goroutines.
func TestBoundBuffersTraffic(t *testing.T) {
	const bound, packets = 16, 2000
	p := newBoundedPair(t, bound)
	src, dst := netip.MustParseAddr("1.0.0.1"), netip.MustParseAddr("1.0.0.2")
	for dir := range 2 {
		from, to := p.tuns[dir], p.tuns[dir^1]
		a, b := src, dst
		if dir == 1 {
			a, b = dst, src
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			for range packets {
				from.Outbound <- tuntest.Ping(b, a)
			}
		}()
		for i := range packets {
			for j, s := range p.stats {
				if n := s.inUse(); n > bound {
					t.Fatalf("device %d has %d buffers out, bound %d", j, n, bound)
				}
			}
			select {
			case pkt := <-to.Inbound:
				if len(pkt) == 0 {
					t.Fatalf("packet %d empty", i)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("direction %d: %d of %d packets arrived", dir, i, packets)
			}
		}
		<-done
	}
	for i, s := range p.stats {
		if s.made.Load() == 0 {
			t.Errorf("device %d made no buffers: the bounded pool is not the one in use", i)
		}
	}
}

// TestRelieveBuffers fills a peer's staged queue (its endpoint never answers, so no handshake
// completes) until the pool is nearly out, and checks the valve flushes it and counts it.
func TestRelieveBuffers(t *testing.T) {
	const bound = 3 + device.QueueStagedSize + 8 // the device's own, a full staged queue, a margin
	p := newBoundedPair(t, bound)
	dev := p.devs[0]
	peerKey := peerPublicKey(t, dev)
	// The peer's endpoint goes nowhere: handshakes are never answered.
	if err := dev.IpcSet(fmt.Sprintf("public_key=%s\nendpoint=127.0.0.1:9\n", hex.EncodeToString(peerKey[:]))); err != nil {
		t.Fatal(err)
	}
	for range device.QueueStagedSize {
		p.tuns[0].Outbound <- tuntest.Ping(netip.MustParseAddr("1.0.0.2"), netip.MustParseAddr("1.0.0.1"))
	}
	Eventually(t, 5*time.Second, "staged packets fill the pool", func() bool {
		return p.stats[0].inUse()+relieveMargin >= bound
	})
	m := &mesh{
		logger: slog.New(slog.DiscardHandler), dev: dev,
		peers: map[identity.Key]*peer{peerKey: {}}, done: make(chan struct{}),
	}
	m.buffers.max, m.buffers.lock, m.buffers.count = p.stats[0].max, p.stats[0].lock, p.stats[0].count
	m.wg.Add(1)
	go m.relieveBuffers()
	defer func() {
		close(m.done)
		m.wg.Wait()
	}()
	Eventually(t, 5*time.Second, "the valve flushes the staged packets", func() bool {
		return m.buffers.flushes.Load() > 0 && p.stats[0].inUse() < 3+relieveMargin/2
	})
}

func peerPublicKey(t *testing.T, dev *device.Device) identity.Key {
	t.Helper()
	conf, err := dev.IpcGet()
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(conf, "\n") {
		if v, ok := strings.CutPrefix(line, "public_key="); ok {
			b, err := hex.DecodeString(v)
			if err != nil || len(b) != 32 {
				t.Fatalf("public_key %q", v)
			}
			var k identity.Key
			copy(k[:], b)
			return k
		}
	}
	t.Fatal("no peer")
	return identity.Key{}
}

// Eventually polls cond every 10 ms until it holds or timeout passes.
func Eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true after %v", what, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
