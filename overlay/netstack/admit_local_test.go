package netstack

import (
	"errors"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// TestAdmitLocalUDP: datagrams to a local address pass AdmitLocalUDP before the stack queues them;
// the refused ones never reach the socket and are counted.
func TestAdmitLocalUDP(t *testing.T) {
	var mu sync.Mutex
	var calls int
	var seen []netip.AddrPort
	cfg := Config{AdmitLocalUDP: func(src netip.Addr, dst netip.AddrPort) bool {
		mu.Lock()
		defer mu.Unlock()
		calls++
		seen = append(seen, dst)
		if src != clientV4 {
			t.Errorf("AdmitLocalUDP source %v, want %v", src, clientV4)
		}
		return calls%2 == 1 // every other datagram
	}}
	h := newHarness(t, cfg, &fakeDialer{err: errors.New("must not be called")})
	ap := netip.AddrPortFrom(dnsIP, 53)
	pc, err := h.stack.ListenUDP(ap)
	if err != nil {
		t.Fatalf("ListenUDP: %v", err)
	}
	defer pc.Close()
	c, err := h.client.DialUDPAddrPort(netip.AddrPort{}, ap)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	const sent = 10
	for i := range sent {
		if _, err := c.Write([]byte{byte(i)}); err != nil {
			t.Fatalf("write: %v", err)
		}
	}
	waitFor(t, "every datagram policed", 5*time.Second, func() bool { return h.stack.Stats().DroppedPoliced == sent/2 })
	var got []byte
	buf := make([]byte, 64)
	for len(got) < sent/2 {
		pc.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			t.Fatalf("read after %d datagrams: %v", len(got), err)
		}
		got = append(got, buf[:n]...)
	}
	for i, b := range got {
		if int(b) != 2*i {
			t.Errorf("datagram %d is %d, want the admitted ones only (0, 2, 4, ...)", i, b)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for _, dst := range seen {
		if dst != ap {
			t.Errorf("AdmitLocalUDP destination %v, want %v", dst, ap)
		}
	}
}
