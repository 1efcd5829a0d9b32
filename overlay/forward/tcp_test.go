package forward

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/edgewire/edgewire/discovery"
)

func TestTCPForwardEcho(t *testing.T) {
	tests := []struct {
		name           string
		listen, target netip.Addr
	}{
		{"v4 overlay, v4 target", loopback4, loopback4},
		{"v6 overlay, v4 target", loopback6, loopback4},
		{"v6 overlay, v6 target", loopback6, loopback6},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tg := startTCPTarget(t, tc.target, echoTCP)
			l := startListener(t, ListenerConfig{Addr: tc.listen, Allow: allowOnly(tg.addr())})

			conn, err := dialerFor(l).Dial(context.Background(), discovery.TCP, tc.listen, tg.addr())
			if err != nil {
				t.Fatalf("Dial: %v", err)
			}
			defer conn.Close()
			c := conn.(*net.TCPConn)

			// 4 MiB up while reading the echo; the client's half-close must reach the target (or
			// its io.Copy never ends) and the target's must come back (or ReadAll never ends).
			data := make([]byte, 4<<20)
			rand.Read(data)
			werr := make(chan error, 1)
			go func() {
				_, err := c.Write(data)
				if err == nil {
					err = c.CloseWrite()
				}
				werr <- err
			}()
			c.SetReadDeadline(time.Now().Add(20 * time.Second))
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("read echo: %v", err)
			}
			if err := <-werr; err != nil {
				t.Fatalf("write: %v", err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("echo: got %d bytes, want %d intact", len(got), len(data))
			}
			waitFor(t, "flow to end", func() bool { return l.Stats().ActiveTCP == 0 })
			st := l.Stats()
			if st.TCPAccepted != 1 || st.BytesIn != uint64(len(data)) || st.BytesOut != uint64(len(data)) {
				t.Fatalf("stats %+v: want 1 accepted, %d bytes each way", st, len(data))
			}
		})
	}
}

// TestTCPHalfClose checks that the response the target sends after the client's half-close arrives.
func TestTCPHalfClose(t *testing.T) {
	tg := startTCPTarget(t, loopback4, func(c *net.TCPConn) {
		n, err := io.Copy(io.Discard, c)
		if err != nil {
			return
		}
		c.Write([]byte("read " + strconv.FormatInt(n, 10) + " bytes"))
		c.CloseWrite()
	})
	l := startListener(t, ListenerConfig{Allow: allowOnly(tg.addr())})
	conn, err := dialerFor(l).Dial(context.Background(), discovery.TCP, loopback4, tg.addr())
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer conn.Close()
	c := conn.(*net.TCPConn)
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "read 5 bytes" {
		t.Fatalf("response %q, %v; want %q", got, err, "read 5 bytes")
	}
}

func TestTCPRefusals(t *testing.T) {
	allowed := startTCPTarget(t, loopback4, echoTCP)
	forbidden := startTCPTarget(t, loopback4, echoTCP)
	down := netip.AddrPortFrom(loopback4, freePort(t, loopback4)) // nothing listens there
	l := startListener(t, ListenerConfig{Allow: allowOnly(allowed.addr(), down)})

	tests := []struct {
		name      string
		target    netip.AddrPort
		want      error
		wantStats func(Stats) bool
	}{
		{"not allowed", forbidden.addr(), ErrRefused, func(s Stats) bool { return s.Refused == 1 }},
		{"not allowed other port", netip.AddrPortFrom(loopback4, allowed.addr().Port()+1), ErrRefused, func(s Stats) bool { return s.Refused == 2 }},
		{"target down", down, ErrDialFailed, func(s Stats) bool { return s.DialFailures == 1 }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := dialerFor(l).Dial(context.Background(), discovery.TCP, loopback4, tc.target)
			if !errors.Is(err, tc.want) {
				if c != nil {
					c.Close()
				}
				t.Fatalf("Dial = %v, want %v", err, tc.want)
			}
			if st := l.Stats(); !tc.wantStats(st) {
				t.Fatalf("stats %+v", st)
			}
		})
	}
	if n := forbidden.accepts.Load(); n != 0 {
		t.Fatalf("a refused target saw %d connections", n)
	}
	if st := l.Stats(); st.TCPAccepted != 0 || st.BadHeader != 0 {
		t.Fatalf("stats %+v: nothing should have been accepted or malformed", st)
	}
	// The listener still serves after all that.
	c, err := dialerFor(l).Dial(context.Background(), discovery.TCP, loopback4, allowed.addr())
	if err != nil {
		t.Fatalf("Dial allowed target: %v", err)
	}
	c.Close()
}

// TestTCPBadRequests sends raw bytes and expects the listener to answer with a status, close and
// count, and to keep serving.
func TestTCPBadRequests(t *testing.T) {
	tg := startTCPTarget(t, loopback4, echoTCP)
	l := startListener(t, ListenerConfig{Allow: allowOnly(tg.addr()), HeaderTimeout: 200 * time.Millisecond})
	udpHeader := MarshalHeader(nil, Header{discovery.UDP, tg.addr()})
	garbage := make([]byte, 1024)
	rand.Read(garbage)
	garbage[0] = 'X'

	tests := []struct {
		name       string
		send       []byte
		closeWrite bool
		want       Status
	}{
		{"bad magic", []byte("GET / HTTP/1.1\r\n\r\n"), false, StatusBadRequest},
		{"random garbage", garbage, false, StatusBadRequest},
		{"other version", []byte{'E', 'W', 9}, false, StatusUnsupportedVersion},
		{"udp header on tcp", udpHeader, false, StatusBadRequest},
		{"bad family", []byte{'E', 'W', 1, 6, 7, 0, 0, 80, 1, 2, 3, 4}, false, StatusBadRequest},
		{"flags set", []byte{'E', 'W', 1, 6, 4, 1, 0, 80, 1, 2, 3, 4}, false, StatusBadRequest},
		{"truncated then eof", []byte{'E', 'W', 1, 6, 4, 0, 0, 80, 127}, true, StatusBadRequest},
		{"silence", nil, false, StatusBadRequest},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(l.Addr()))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write(tc.send); err != nil {
				t.Fatal(err)
			}
			if tc.closeWrite {
				c.CloseWrite()
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			reply, err := io.ReadAll(c)
			if err != nil && !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("read reply: %v", err)
			}
			if len(reply) != 1 || Status(reply[0]) != tc.want {
				t.Fatalf("reply % x, want status %d then close", reply, tc.want)
			}
			if got := l.Stats().BadHeader; got != uint64(i+1) {
				t.Fatalf("bad headers counted %d, want %d", got, i+1)
			}
		})
	}
	if n := tg.accepts.Load(); n != 0 {
		t.Fatalf("target saw %d connections", n)
	}
	c, err := dialerFor(l).Dial(context.Background(), discovery.TCP, loopback4, tg.addr())
	if err != nil {
		t.Fatalf("Dial after bad requests: %v", err)
	}
	c.Close()
}

// TestDialerStatuses runs the Dialer against fake servers that answer in every way a server can.
func TestDialerStatuses(t *testing.T) {
	target := netip.MustParseAddrPort("10.0.0.1:80")
	tests := []struct {
		name   string
		answer []byte // nil: say nothing until the client gives up
		close  bool   // close after answering
		want   error
	}{
		{"ok", []byte{0}, false, nil},
		{"not allowed", []byte{1}, true, ErrRefused},
		{"dial failed", []byte{2}, true, ErrDialFailed},
		{"bad request", []byte{3}, true, ErrBadRequest},
		{"unsupported version", []byte{4}, true, ErrUnsupportedVersion},
		{"unknown status", []byte{77}, true, ErrProtocol},
		{"close without status", []byte{}, true, io.ErrUnexpectedEOF},
		{"silent server", nil, false, context.DeadlineExceeded},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			gotHeader := make(chan Header, 1)
			srv := startTCPTarget(t, loopback4, func(c *net.TCPConn) {
				h, _, err := readHeader(c)
				if err != nil {
					return
				}
				gotHeader <- h
				if tc.answer == nil {
					io.Copy(io.Discard, c) // until the client closes
					return
				}
				c.Write(tc.answer)
				if !tc.close {
					c.Write([]byte("payload"))
					io.Copy(io.Discard, c)
				}
			})
			d := &Dialer{Port: srv.addr().Port(), Timeout: 300 * time.Millisecond}
			c, err := d.Dial(context.Background(), discovery.TCP, loopback4, target)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Dial: %v", err)
				}
				defer c.Close()
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				buf := make([]byte, 7)
				if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "payload" {
					t.Fatalf("payload after status: %q, %v", buf, err)
				}
			} else if !errors.Is(err, tc.want) {
				if c != nil {
					c.Close()
				}
				t.Fatalf("Dial = %v, want %v", err, tc.want)
			}
			if h := <-gotHeader; h != (Header{discovery.TCP, target}) {
				t.Fatalf("server read header %+v", h)
			}
		})
	}
}

func TestDialerRejectsBadHeader(t *testing.T) {
	var d Dialer
	tests := []struct {
		name   string
		proto  discovery.Protocol
		target netip.AddrPort
	}{
		{"sctp", discovery.SCTP, netip.MustParseAddrPort("10.0.0.1:80")},
		{"port 0", discovery.TCP, netip.MustParseAddrPort("10.0.0.1:0")},
		{"no target", discovery.UDP, netip.AddrPort{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := d.Dial(context.Background(), tc.proto, loopback4, tc.target); !errors.Is(err, ErrMalformed) {
				t.Fatalf("Dial = %v, want ErrMalformed", err)
			}
		})
	}
}

// TestBindToDevice proves SO_BINDTODEVICE is applied to both sockets, and that a device that does
// not exist fails Start.
func TestBindToDevice(t *testing.T) {
	t.Run("lo", func(t *testing.T) {
		tg := startTCPTarget(t, loopback4, echoTCP)
		l := startListener(t, ListenerConfig{Device: "lo", Allow: allowOnly(tg.addr())})
		for name, sc := range map[string]syscall.Conn{"tcp": l.tcpLn, "udp": l.udpConn} {
			if dev := boundDevice(t, sc); dev != "lo" {
				t.Fatalf("%s socket bound to device %q, want lo", name, dev)
			}
		}
		c, err := dialerFor(l).Dial(context.Background(), discovery.TCP, loopback4, tg.addr())
		if err != nil {
			t.Fatalf("Dial through a device-bound listener: %v", err)
		}
		c.Close()
	})
	t.Run("unbound", func(t *testing.T) {
		l := startListener(t, ListenerConfig{Allow: allowOnly()})
		if dev := boundDevice(t, l.tcpLn); dev != "" {
			t.Fatalf("socket bound to device %q, want none", dev)
		}
	})
	t.Run("missing device", func(t *testing.T) {
		l, err := NewListener(ListenerConfig{Addr: loopback4, Port: freePort(t, loopback4), Device: "ewtest-none0", Allow: allowOnly()})
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		if err := l.Start(); !errors.Is(err, unix.ENODEV) {
			t.Fatalf("Start = %v, want ENODEV", err)
		}
	})
}

func boundDevice(t *testing.T, sc syscall.Conn) string {
	t.Helper()
	rc, err := sc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var dev string
	var serr error
	if err := rc.Control(func(fd uintptr) {
		dev, serr = unix.GetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE)
	}); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatalf("getsockopt SO_BINDTODEVICE: %v", serr)
	}
	return dev
}
