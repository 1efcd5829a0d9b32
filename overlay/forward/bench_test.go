package forward

import (
	"context"
	"io"
	"net"
	"testing"

	"github.com/edgewire/edgewire/discovery"
)

// BenchmarkTCPForward measures one-way throughput through the listener to a discarding target.
func BenchmarkTCPForward(b *testing.B) {
	benchTCP(b, true)
}

// BenchmarkTCPDirect is the baseline: the same transfer straight to the target.
func BenchmarkTCPDirect(b *testing.B) { benchTCP(b, false) }

func benchTCP(b *testing.B, forwarded bool) {
	tg := startTCPTarget(b, loopback4, func(c *net.TCPConn) {
		io.Copy(io.Discard, c)
		c.CloseWrite()
	})
	var c net.Conn
	var err error
	if forwarded {
		l := startListener(b, ListenerConfig{Allow: allowOnly(tg.addr())})
		c, err = dialerFor(l).Dial(context.Background(), discovery.TCP, loopback4, tg.addr())
	} else {
		c, err = net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(tg.addr()))
	}
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 1<<20)
	b.SetBytes(int64(len(buf)))
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	c.(*net.TCPConn).CloseWrite()
	io.Copy(io.Discard, c)
}

// BenchmarkUDPRoundTrip measures request/reply latency of one UDP flow through the listener.
func BenchmarkUDPRoundTrip(b *testing.B) {
	tg := startUDPTarget(b, loopback4, echoUDP)
	l := startListener(b, ListenerConfig{Allow: allowOnly(tg.addr())})
	c, err := dialerFor(l).Dial(context.Background(), discovery.UDP, loopback4, tg.addr())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	msg := make([]byte, 1200)
	buf := make([]byte, 2048)
	b.SetBytes(int64(len(msg)))
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := c.Read(buf); err != nil {
			b.Fatal(err)
		}
	}
}
