package netstack

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/tun/tuntest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestTCPRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name    string
		service netip.Addr
		client  netip.Addr
	}{
		{"ipv4", serviceV4, clientV4},
		{"ipv6", serviceV6, clientV6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newTCPServer(t, echoTCP)
			h := newHarness(t, Config{}, &fakeDialer{tcpTarget: srv.Addr()})
			dst := netip.AddrPortFrom(tc.service, 80)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := h.client.DialContextTCPAddrPort(ctx, dst)
			if err != nil {
				t.Fatalf("dial %v: %v", dst, err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Write([]byte("hello")); err != nil {
				t.Fatalf("write: %v", err)
			}
			got := make([]byte, 5)
			if _, err := io.ReadFull(c, got); err != nil {
				t.Fatalf("read: %v", err)
			}
			if string(got) != "hello" {
				t.Fatalf("echo = %q, want %q", got, "hello")
			}
			calls := h.dialer.Calls()
			if len(calls) != 1 {
				t.Fatalf("DialFlow called %d times, want 1", len(calls))
			}
			if calls[0].proto != discovery.TCP || calls[0].dst != dst || calls[0].src.Addr() != tc.client {
				t.Errorf("DialFlow(%v, %v, %v), want (TCP, %v:*, %v)", calls[0].proto, calls[0].src, calls[0].dst, tc.client, dst)
			}
			// BytesDown is counted once the client's Write returned: poll.
			waitFor(t, "5 bytes counted each way", 5*time.Second, func() bool {
				st := h.stack.Stats().TCP
				return st.BytesUp == 5 && st.BytesDown == 5
			})
			if st := h.stack.Stats().TCP; st.Opened != 1 || st.Active != 1 {
				t.Errorf("TCP stats = %+v, want 1 opened, 1 active", st)
			}
		})
	}
}

func TestTCPLargeTransfer(t *testing.T) {
	srv := newTCPServer(t, echoTCP)
	h := newHarness(t, Config{}, &fakeDialer{tcpTarget: srv.Addr()})
	c, err := h.client.DialTCPAddrPort(netip.AddrPortFrom(serviceV4, 80))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))

	data := make([]byte, 8<<20)
	rand.Read(data)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.CloseWrite()
		}
		werr <- err
	}()
	got, err := io.ReadAll(c) // ends at the echo server's half-close, after our own
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if err := <-werr; err != nil {
		t.Fatalf("write: %v", err)
	}
	if len(got) != len(data) || sha256.Sum256(got) != sha256.Sum256(data) {
		t.Fatalf("received %d bytes (sha256 %x), want %d (sha256 %x)", len(got), sha256.Sum256(got), len(data), sha256.Sum256(data))
	}
	waitFor(t, "flow to end", 5*time.Second, func() bool { return h.stack.Stats().TCP.Active == 0 })
	if st := h.stack.Stats().TCP; st.BytesUp != uint64(len(data)) || st.BytesDown != uint64(len(data)) {
		t.Errorf("bytes up/down = %d/%d, want %d", st.BytesUp, st.BytesDown, len(data))
	}
}

// TestTCPHalfClose: the server answers only after the client's EOF, so the response must flow through a
// half-closed flow.
func TestTCPHalfClose(t *testing.T) {
	srv := newTCPServer(t, func(c *net.TCPConn) {
		req, err := io.ReadAll(c)
		if err != nil {
			return
		}
		fmt.Fprintf(c, "got %d bytes: %s", len(req), req)
	})
	h := newHarness(t, Config{}, &fakeDialer{tcpTarget: srv.Addr()})
	c, err := h.client.DialTCPAddrPort(netip.AddrPortFrom(serviceV4, 8080))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if want := "got 4 bytes: ping"; string(got) != want {
		t.Fatalf("response = %q, want %q", got, want)
	}
}

func TestTCPRefused(t *testing.T) {
	h := newHarness(t, Config{}, &fakeDialer{err: errors.New("no endpoint")})
	for _, tc := range []struct {
		name string
		dst  netip.AddrPort
	}{
		{"ipv4", netip.AddrPortFrom(serviceV4, 80)},
		{"ipv6", netip.AddrPortFrom(serviceV6, 80)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			start := time.Now()
			c, err := h.client.DialContextTCPAddrPort(ctx, tc.dst)
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded, want connection refused")
			}
			if !strings.Contains(err.Error(), "refused") {
				t.Fatalf("dial error = %v, want connection refused", err)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("refusal took %v, want it at once", d)
			}
		})
	}
	if st := h.stack.Stats().TCP; st.Refused != 2 || st.Opened != 0 {
		t.Errorf("TCP stats = %+v, want 2 refused, 0 opened", st)
	}
}

func TestUDPDatagramBoundaries(t *testing.T) {
	for _, tc := range []struct {
		name    string
		service netip.Addr
	}{
		{"ipv4", serviceV4},
		{"ipv6", serviceV6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, Config{}, &fakeDialer{udpTarget: newUDPEcho(t)})
			dst := netip.AddrPortFrom(tc.service, 53)
			c, err := h.client.DialUDPAddrPort(netip.AddrPort{}, dst)
			if err != nil {
				t.Fatalf("dial udp: %v", err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			sizes := []int{1, 100, 1000, 1200}
			for _, n := range sizes {
				if _, err := c.Write(bytes.Repeat([]byte{byte(n)}, n)); err != nil {
					t.Fatalf("write %d bytes: %v", n, err)
				}
			}
			buf := make([]byte, 65535)
			for _, want := range sizes {
				n, err := c.Read(buf)
				if err != nil {
					t.Fatalf("read: %v", err)
				}
				if !bytes.Equal(buf[:n], bytes.Repeat([]byte{byte(want)}, want)) {
					t.Fatalf("datagram of %d bytes, want %d bytes of %d", n, want, want)
				}
			}
			calls := h.dialer.Calls()
			if len(calls) != 1 || calls[0].proto != discovery.UDP || calls[0].dst != dst {
				t.Fatalf("DialFlow calls = %+v, want one UDP call to %v", calls, dst)
			}
		})
	}
}

func TestUDPManyFlows(t *testing.T) {
	const flows = 200
	h := newHarness(t, Config{}, &fakeDialer{udpTarget: newUDPEcho(t)})
	var wg sync.WaitGroup
	errs := make(chan error, flows)
	for i := range flows {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dst := netip.AddrPortFrom(serviceV4, uint16(1000+i%10))
			c, err := h.client.DialUDPAddrPort(netip.AddrPort{}, dst)
			if err != nil {
				errs <- fmt.Errorf("flow %d: dial: %w", i, err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			msg := fmt.Appendf(nil, "flow %d", i)
			buf := make([]byte, 1500)
			// Resend until answered: the client stack may drop a datagram under load.
			for {
				if _, err := c.Write(msg); err != nil {
					errs <- fmt.Errorf("flow %d: write: %w", i, err)
					return
				}
				c.SetReadDeadline(time.Now().Add(time.Second))
				n, err := c.Read(buf)
				if errors.Is(err, os.ErrDeadlineExceeded) || isTimeout(err) {
					continue
				}
				if err != nil {
					errs <- fmt.Errorf("flow %d: read: %w", i, err)
					return
				}
				if !bytes.Equal(buf[:n], msg) {
					errs <- fmt.Errorf("flow %d: got %q, want %q", i, buf[:n], msg)
				}
				return
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if st := h.stack.Stats().UDP; st.Opened != flows {
		t.Errorf("UDP flows opened = %d, want %d", st.Opened, flows)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestUDPIdleTimeout(t *testing.T) {
	d := &fakeDialer{udpTarget: newUDPEcho(t)}
	h := newHarness(t, Config{UDPIdleTimeout: 200 * time.Millisecond}, d)
	c, err := h.client.DialUDPAddrPort(netip.AddrPort{}, netip.AddrPortFrom(serviceV4, 53))
	if err != nil {
		t.Fatalf("dial udp: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatalf("write: %v", err)
	}
	if _, err := c.Read(make([]byte, 10)); err != nil {
		t.Fatalf("read: %v", err)
	}
	if st := h.stack.Stats().UDP; st.Active != 1 {
		t.Fatalf("active UDP flows = %d, want 1", st.Active)
	}
	waitFor(t, "idle UDP flow to close", 5*time.Second, func() bool { return h.stack.Stats().UDP.Active == 0 })
	if n := d.closed.Load(); n != 1 {
		t.Errorf("upstream connections closed = %d, want 1", n)
	}
	// The next datagram starts a new flow.
	if _, err := c.Write([]byte("y")); err != nil {
		t.Fatalf("write: %v", err)
	}
	if _, err := c.Read(make([]byte, 10)); err != nil {
		t.Fatalf("read after idle close: %v", err)
	}
	if n := len(d.Calls()); n != 2 {
		t.Errorf("DialFlow calls = %d, want 2", n)
	}
}

func TestUDPRefused(t *testing.T) {
	h := newHarness(t, Config{}, &fakeDialer{err: errors.New("no endpoint")})
	c, err := h.client.DialUDPAddrPort(netip.AddrPort{}, netip.AddrPortFrom(serviceV4, 53))
	if err != nil {
		t.Fatalf("dial udp: %v", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatalf("write: %v", err)
	}
	waitFor(t, "refused UDP flow", 5*time.Second, func() bool {
		st := h.stack.Stats().UDP
		return st.Refused == 1 && st.DroppedDatagrams >= 1
	})
	if st := h.stack.Stats().UDP; st.Opened != 0 || st.Active != 0 {
		t.Errorf("UDP stats = %+v, want nothing opened", st)
	}
}

func TestListenLocal(t *testing.T) {
	h := newHarness(t, Config{}, &fakeDialer{err: errors.New("must not be called")})
	ap := netip.AddrPortFrom(dnsIP, 53)

	t.Run("udp", func(t *testing.T) {
		pc, err := h.stack.ListenUDP(ap)
		if err != nil {
			t.Fatalf("ListenUDP: %v", err)
		}
		defer pc.Close()
		done := make(chan error, 1)
		go func() {
			buf := make([]byte, 1500)
			n, from, err := pc.ReadFrom(buf)
			if err == nil {
				_, err = pc.WriteTo(append([]byte("re: "), buf[:n]...), from)
			}
			done <- err
		}()
		c, err := h.client.DialUDPAddrPort(netip.AddrPort{}, ap)
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte("query"))
		buf := make([]byte, 1500)
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		if string(buf[:n]) != "re: query" {
			t.Fatalf("reply = %q", buf[:n])
		}
		if err := <-done; err != nil {
			t.Fatalf("server: %v", err)
		}
	})
	t.Run("tcp", func(t *testing.T) {
		ln, err := h.stack.ListenTCP(ap)
		if err != nil {
			t.Fatalf("ListenTCP: %v", err)
		}
		defer ln.Close()
		done := make(chan error, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				done <- err
				return
			}
			defer c.Close()
			_, err = io.Copy(c, c)
			done <- err
		}()
		c, err := h.client.DialTCPAddrPort(ap)
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte("axfr"))
		c.CloseWrite()
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || string(got) != "axfr" {
			t.Fatalf("echo = %q, %v", got, err)
		}
		if err := <-done; err != nil {
			t.Fatalf("server: %v", err)
		}
	})
	t.Run("tcp port nobody listens on", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := h.client.DialContextTCPAddrPort(ctx, netip.AddrPortFrom(dnsIP, 54))
		if err == nil {
			c.Close()
			t.Fatal("dial succeeded, want connection refused")
		}
		if !strings.Contains(err.Error(), "refused") {
			t.Fatalf("dial error = %v, want connection refused", err)
		}
	})
	t.Run("not a local address", func(t *testing.T) {
		if _, err := h.stack.ListenTCP(netip.AddrPortFrom(serviceV4, 53)); err == nil {
			t.Error("ListenTCP on a service address succeeded")
		}
		if _, err := h.stack.ListenUDP(netip.AddrPortFrom(clientV4, 53)); err == nil {
			t.Error("ListenUDP on a foreign address succeeded")
		}
	})
	if n := len(h.dialer.Calls()); n != 0 {
		t.Errorf("DialFlow called %d times for local addresses, want 0", n)
	}
}

// TestWriteDrops writes packets straight into the device: each must be dropped and counted, and none may
// crash the stack or reach the Dialer.
func TestWriteDrops(t *testing.T) {
	src := netip.AddrPortFrom(clientV4, 4000)
	good := tuntest.UDPPacket(src, netip.AddrPortFrom(serviceV4, 53), []byte("payload"))
	truncatedTotal := append([]byte(nil), good...)
	truncatedTotal[2], truncatedTotal[3] = 0xff, 0xff
	badIHL := append([]byte(nil), good...)
	badIHL[0] = 0x41
	v6 := tuntest.UDPPacket(netip.AddrPortFrom(clientV6, 4000), netip.AddrPortFrom(serviceV6, 53), []byte("payload"))
	v6Short := append([]byte(nil), v6...)
	v6Short[4], v6Short[5] = 0x10, 0x00

	for _, tc := range []struct {
		name          string
		pkt           []byte
		malformed     uint64
		notServed     uint64
		offsetOverrun bool
	}{
		{name: "empty", pkt: []byte{}, malformed: 1},
		{name: "ipv4 truncated header", pkt: good[:12], malformed: 1},
		{name: "ipv4 total length past end", pkt: truncatedTotal, malformed: 1},
		{name: "ipv4 header length below minimum", pkt: badIHL, malformed: 1},
		{name: "ipv6 truncated header", pkt: v6[:30], malformed: 1},
		{name: "ipv6 payload length past end", pkt: v6Short, malformed: 1},
		{name: "unknown version", pkt: append([]byte{0x50}, good[1:]...), malformed: 1},
		{name: "garbage", pkt: []byte("GET / HTTP/1.1\r\n\r\n"), malformed: 1},
		{name: "ipv4 outside prefixes", pkt: tuntest.UDPPacket(src, netip.MustParseAddrPort("10.9.9.9:53"), []byte("x")), notServed: 1},
		{name: "ipv6 outside prefixes", pkt: tuntest.UDPPacket(netip.AddrPortFrom(clientV6, 1), netip.MustParseAddrPort("[fd00:1::1]:53"), []byte("x")), notServed: 1},
		{name: "shorter than offset", pkt: nil, malformed: 1, offsetOverrun: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &fakeDialer{err: errors.New("must not be called")}
			s, err := New(Config{Dialer: d, Prefixes: []netip.Prefix{netip.MustParsePrefix("9.251.0.0/16"), netip.MustParsePrefix("fd00:9251::/64")}})
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			defer s.Close()
			offset := 4
			buf := append(make([]byte, offset), tc.pkt...)
			if tc.offsetOverrun {
				buf = buf[:2]
			}
			n, err := s.Write([][]byte{buf}, offset)
			if n != 1 || err != nil {
				t.Fatalf("Write = %d, %v; want 1, nil", n, err)
			}
			st := s.Stats()
			if st.DroppedMalformed != tc.malformed || st.DroppedNotServed != tc.notServed || st.PacketsIn != 0 {
				t.Errorf("stats = %+v, want malformed %d, not served %d, none in", st, tc.malformed, tc.notServed)
			}
			if len(d.Calls()) != 0 {
				t.Error("DialFlow was called")
			}
		})
	}
}

// TestWriteRandom feeds random bytes behind valid-looking IP headers to a service address: whatever
// gVisor makes of them, nothing may crash.
func TestWriteRandom(t *testing.T) {
	d := &fakeDialer{err: errors.New("refused")}
	s, err := New(Config{Dialer: d, Prefixes: []netip.Prefix{netip.MustParsePrefix("9.251.0.0/16"), netip.MustParsePrefix("fd00:9251::/64")}})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := s.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	done := make(chan struct{})
	go func() { // drain whatever the stack answers
		defer close(done)
		bufs, sizes := [][]byte{make([]byte, 65535)}, []int{0}
		for {
			if _, err := s.Read(bufs, sizes, 0); err != nil {
				return
			}
		}
	}()
	v4 := tuntest.UDPPacket(netip.AddrPortFrom(clientV4, 1), netip.AddrPortFrom(serviceV4, 53), make([]byte, 64))
	v6 := tuntest.UDPPacket(netip.AddrPortFrom(clientV6, 1), netip.AddrPortFrom(serviceV6, 53), make([]byte, 64))
	for i := range 2000 {
		// Randomize everything but the version and the destination address.
		var pkt []byte
		if i%2 == 0 {
			pkt = append([]byte(nil), v4...)
			rand.Read(pkt[:16])
			rand.Read(pkt[20:])
			pkt[0] = 0x40 | pkt[0]&0x0f
		} else {
			pkt = append([]byte(nil), v6...)
			rand.Read(pkt[:24])
			rand.Read(pkt[40:])
			pkt[0] = 0x60 | pkt[0]&0x0f
		}
		s.Write([][]byte{pkt}, 0)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	<-done
}

func TestClose(t *testing.T) {
	s, err := New(Config{Dialer: &fakeDialer{}})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := s.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	readErr := make(chan error, 1)
	go func() {
		_, err := s.Read([][]byte{make([]byte, 1500)}, []int{0}, 0)
		readErr <- err
	}()
	for i := range 2 {
		if err := s.Close(); err != nil {
			t.Fatalf("Close #%d: %v", i+1, err)
		}
	}
	if err := <-readErr; !errors.Is(err, os.ErrClosed) {
		t.Errorf("blocked Read after Close = %v, want os.ErrClosed", err)
	}
	if _, err := s.Write([][]byte{make([]byte, 40)}, 0); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Write after Close = %v, want os.ErrClosed", err)
	}
	if err := s.Start(); err == nil {
		t.Error("Start after Close succeeded")
	}
	if _, ok := <-s.Events(); ok {
		// EventUp is buffered; the channel must be closed after it.
		if _, ok := <-s.Events(); ok {
			t.Error("Events not closed after Close")
		}
	}
}

func TestNewErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no dialer", Config{}, "Dialer is required"},
		{"mtu too small", Config{Dialer: &fakeDialer{}, MTU: 500}, "MTU 500"},
		{"invalid prefix", Config{Dialer: &fakeDialer{}, Prefixes: []netip.Prefix{{}}}, "invalid service prefix"},
		{"invalid local address", Config{Dialer: &fakeDialer{}, LocalAddrs: []netip.Addr{{}}}, "invalid local address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := New(tc.cfg)
			if err == nil {
				s.Close()
				t.Fatal("New succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error = %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

func BenchmarkTCPThroughput(b *testing.B) {
	srv := newTCPServer(b, func(c *net.TCPConn) {
		io.Copy(io.Discard, c)
		c.CloseWrite()
	})
	h := newHarness(b, Config{}, &fakeDialer{tcpTarget: srv.Addr()})
	c, err := h.client.DialTCPAddrPort(netip.AddrPortFrom(serviceV4, 80))
	if err != nil {
		b.Fatalf("dial: %v", err)
	}
	defer c.Close()
	chunk := make([]byte, 1<<20)
	b.SetBytes(int64(len(chunk)))
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.Write(chunk); err != nil {
			b.Fatalf("write: %v", err)
		}
	}
	// Wait until everything has reached the server: its half-close answers ours.
	c.CloseWrite()
	if _, err := io.Copy(io.Discard, c); err != nil {
		b.Fatalf("drain: %v", err)
	}
	b.StopTimer()
}
