package relay

import (
	"errors"
	"net"
	"os"
	"testing"
	"time"
)

// BenchmarkRelayData pushes DATA frames with 1400-byte payloads (a full WireGuard datagram) from
// one node's UDP socket through the relay to another's on loopback, and reports the payload rate
// that arrived and the share lost (the sender does not pace itself).
func BenchmarkRelayData(b *testing.B) {
	s := startServer(b, "", 0, func(c *ServerConfig) {
		c.Limits.DataRate = 1e12
		c.Limits.DataBurst = 1 << 30
	})
	src, dst := newNode(b, "src"), newNode(b, "dst")
	src.start(b, testToken, p2pAddr(s))
	dst.start(b, testToken, p2pAddr(s))
	ss, sd := waitSession(b, src, 0), waitSession(b, dst, 0)
	us, ud := bindUDP(b, ss), bindUDP(b, sd)
	ud.SetReadBuffer(8 << 20)
	s.udp.SetReadBuffer(8 << 20)

	const payload = 1400
	frame := append(AppendDataHeader(nil, sd.ID), make([]byte, payload)...)
	frame[DataHeaderLen] = 4 // a WireGuard transport message
	type result struct {
		n           int
		first, last time.Time
	}
	got := make(chan result)
	go func() {
		buf := make([]byte, 2048)
		var r result
		for {
			ud.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			if _, _, err := ud.ReadFromUDPAddrPort(buf); err != nil {
				if !errors.Is(err, os.ErrDeadlineExceeded) {
					b.Error(err)
				}
				got <- r
				return
			}
			if r.n == 0 {
				r.first = time.Now()
			}
			r.last = time.Now()
			r.n++
		}
	}()
	b.SetBytes(payload)
	b.ResetTimer()
	for range b.N {
		if _, err := us.WriteToUDPAddrPort(frame, ss.UDPAddr); err != nil {
			var ne net.Error
			if errors.As(err, &ne) {
				continue
			}
			b.Fatal(err)
		}
	}
	b.StopTimer()
	r := <-got
	if d := r.last.Sub(r.first); d > 0 {
		b.ReportMetric(float64(r.n)*payload*8/d.Seconds()/1e6, "delivered-Mbit/s")
	}
	b.ReportMetric(100*float64(b.N-r.n)/float64(b.N), "loss-%")
}
