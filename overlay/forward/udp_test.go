package forward

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/edgewire/edgewire/discovery"
)

// readDatagram reads one datagram within 5 s.
func readDatagram(t *testing.T, c net.Conn) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, maxDatagram)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("read datagram: %v", err)
	}
	return buf[:n]
}

func TestUDPDatagramBoundaries(t *testing.T) {
	tests := []struct {
		name           string
		listen, target netip.Addr
	}{
		{"v4 overlay, v4 target", loopback4, loopback4},
		{"v6 overlay, v6 target", loopback6, loopback6},
	}
	sizes := []int{1, 100, 0, 1400, 8000, 60000, 7}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// The target answers each datagram with two: the datagram and its size, so replies
			// keep their boundaries even when they follow each other closely.
			tg := startUDPTarget(t, tc.target, func(p []byte) [][]byte {
				return [][]byte{append([]byte(nil), p...), fmt.Appendf(nil, "size %d", len(p))}
			})
			l := startListener(t, ListenerConfig{Addr: tc.listen, Allow: allowOnly(tg.addr())})
			c, err := dialerFor(l).Dial(context.Background(), discovery.UDP, tc.listen, tg.addr())
			if err != nil {
				t.Fatalf("Dial: %v", err)
			}
			defer c.Close()

			var sent [][]byte
			for i, n := range sizes {
				p := bytes.Repeat([]byte{byte('a' + i)}, n)
				if w, err := c.Write(p); err != nil || w != n {
					t.Fatalf("write %d bytes: %d, %v", n, w, err)
				}
				sent = append(sent, p)
			}
			for _, p := range sent {
				if got := readDatagram(t, c); !bytes.Equal(got, p) {
					t.Fatalf("echo of a %d-byte datagram: got %d bytes", len(p), len(got))
				}
				if got, want := string(readDatagram(t, c)), fmt.Sprintf("size %d", len(p)); got != want {
					t.Fatalf("target saw %q, want %q", got, want)
				}
			}
			st := l.Stats()
			if st.UDPAccepted != 1 || st.ActiveUDP != 1 || tg.datagrams.Load() != int64(len(sizes)) {
				t.Fatalf("stats %+v, target saw %d datagrams: want one flow, %d datagrams", st, tg.datagrams.Load(), len(sizes))
			}
		})
	}
}

func TestUDPConcurrentFlows(t *testing.T) {
	const flows, perFlow = 100, 10
	tg := startUDPTarget(t, loopback4, echoUDP)
	l := startListener(t, ListenerConfig{Allow: allowOnly(tg.addr())})
	d := dialerFor(l)

	var wg sync.WaitGroup
	errs := make(chan error, flows)
	conns := make(chan net.Conn, flows)
	for i := range flows {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := d.Dial(context.Background(), discovery.UDP, loopback4, tg.addr())
			if err != nil {
				errs <- err
				return
			}
			conns <- c
			buf := make([]byte, 128)
			for j := range perFlow {
				msg := fmt.Appendf(nil, "flow %d datagram %d", i, j)
				// Loopback does not lose datagrams, but a retry keeps a full socket buffer from
				// failing the test.
				var got []byte
				for attempt := 0; attempt < 3 && !bytes.Equal(got, msg); attempt++ {
					if _, err := c.Write(msg); err != nil {
						errs <- err
						return
					}
					c.SetReadDeadline(time.Now().Add(2 * time.Second))
					n, err := c.Read(buf)
					if err != nil {
						continue
					}
					got = buf[:n]
				}
				if !bytes.Equal(got, msg) {
					errs <- fmt.Errorf("flow %d: got %q, want %q", i, got, msg)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	close(conns)
	for c := range conns {
		defer c.Close()
	}
	for err := range errs {
		t.Error(err)
	}
	if st := l.Stats(); st.UDPAccepted != flows || st.ActiveUDP != flows {
		t.Fatalf("stats %+v: want %d flows open", st, flows)
	}
}

func TestUDPDrops(t *testing.T) {
	allowed := startUDPTarget(t, loopback4, echoUDP)
	forbidden := startUDPTarget(t, loopback4, echoUDP)
	l := startListener(t, ListenerConfig{Allow: allowOnly(allowed.addr())})

	raw, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(l.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	tests := []struct {
		name      string
		datagram  []byte
		wantStats func(Stats) bool
	}{
		{"not allowed", MarshalHeader(nil, Header{discovery.UDP, forbidden.addr()}), func(s Stats) bool { return s.Refused == 1 }},
		{"not allowed again", append(MarshalHeader(nil, Header{discovery.UDP, forbidden.addr()}), "x"...), func(s Stats) bool { return s.Refused == 2 }},
		{"empty", []byte{}, func(s Stats) bool { return s.BadHeader == 1 }},
		{"garbage", []byte("hello there"), func(s Stats) bool { return s.BadHeader == 2 }},
		{"other version", []byte{'E', 'W', 2, 17, 4, 0, 0, 53, 127, 0, 0, 1}, func(s Stats) bool { return s.BadHeader == 3 }},
		{"truncated", MarshalHeader(nil, Header{discovery.UDP, allowed.addr()})[:10], func(s Stats) bool { return s.BadHeader == 4 }},
		{"tcp header on udp", MarshalHeader(nil, Header{discovery.TCP, allowed.addr()}), func(s Stats) bool { return s.BadHeader == 5 }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := raw.Write(tc.datagram); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the drop to be counted", func() bool { return tc.wantStats(l.Stats()) })
		})
	}
	if n := forbidden.datagrams.Load(); n != 0 {
		t.Fatalf("refused target saw %d datagrams", n)
	}
	if n := allowed.datagrams.Load(); n != 0 {
		t.Fatalf("target saw %d datagrams from malformed requests", n)
	}
	if st := l.Stats(); st.UDPAccepted != 0 || st.ActiveUDP != 0 {
		t.Fatalf("stats %+v: no flow should have opened", st)
	}
	// Still serving.
	if _, err := raw.Write(append(MarshalHeader(nil, Header{discovery.UDP, allowed.addr()}), "ping"...)); err != nil {
		t.Fatal(err)
	}
	if got := readDatagram(t, raw); string(got) != "ping" {
		t.Fatalf("reply %q, want ping", got)
	}
}

func TestUDPFlowLimit(t *testing.T) {
	tg := startUDPTarget(t, loopback4, echoUDP)
	l := startListener(t, ListenerConfig{Allow: allowOnly(tg.addr()), MaxUDPFlows: 2, MaxUDPFlowsPerPeer: 2})
	d := dialerFor(l)
	var conns []net.Conn
	for i := range 3 {
		c, err := d.Dial(context.Background(), discovery.UDP, loopback4, tg.addr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
		if _, err := c.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		if i < 2 {
			readDatagram(t, c)
		}
	}
	waitFor(t, "the third flow to be dropped", func() bool { return l.Stats().UDPCapPeer == 1 })
	if st := l.Stats(); st.ActiveUDP != 2 || st.UDPAccepted != 2 || tg.datagrams.Load() != 2 {
		t.Fatalf("stats %+v, target saw %d: want 2 flows", st, tg.datagrams.Load())
	}
	// The first two flows keep working.
	for _, c := range conns[:2] {
		if _, err := c.Write([]byte("again")); err != nil {
			t.Fatal(err)
		}
		if got := readDatagram(t, c); string(got) != "again" {
			t.Fatalf("reply %q", got)
		}
	}
}

func TestUDPIdleTimeout(t *testing.T) {
	tg := startUDPTarget(t, loopback4, echoUDP)
	const idle = 200 * time.Millisecond
	l := startListener(t, ListenerConfig{Allow: allowOnly(tg.addr()), UDPIdleTimeout: idle})
	c, err := dialerFor(l).Dial(context.Background(), discovery.UDP, loopback4, tg.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	exchange := func(msg string) {
		t.Helper()
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		if got := readDatagram(t, c); string(got) != msg {
			t.Fatalf("reply %q, want %q", got, msg)
		}
	}

	// A flow kept busy for several idle timeouts stays open: one flow only.
	for end := time.Now().Add(3 * idle); time.Now().Before(end); {
		exchange("busy")
		time.Sleep(idle / 4) // the traffic pattern under test, not a wait for a condition
	}
	if st := l.Stats(); st.UDPAccepted != 1 || st.ActiveUDP != 1 {
		t.Fatalf("busy flow: stats %+v, want one open flow", st)
	}

	// Left alone, it is reaped.
	waitFor(t, "the idle flow to be reaped", func() bool { return l.Stats().ActiveUDP == 0 })
	l.mu.Lock()
	n := len(l.udpFlows)
	l.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d flows left in the table", n)
	}

	// The next datagram opens a new flow.
	exchange("after")
	if st := l.Stats(); st.UDPAccepted != 2 || st.ActiveUDP != 1 {
		t.Fatalf("stats %+v, want a second flow", st)
	}
}
