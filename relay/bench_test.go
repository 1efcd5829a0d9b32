package relay

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/ipv4"
)

// relayBenchPayload is the payload of each DATA frame: a full-size WireGuard datagram.
const relayBenchPayload = 1400

// relayBenchWindow is how many frames the sender keeps in flight (sent, not yet received), as a
// TCP window would; relayBenchBatch how many it hands the kernel at once (wireguard-go's
// conn.IdealBatchSize).
const (
	relayBenchWindow = 4096
	relayBenchBatch  = 128
)

// BenchmarkRelayData pushes DATA frames with 1400-byte payloads from one node's UDP socket through
// a real relay on loopback to another node's socket, and reports what arrived: frames per second,
// payload Gbit/s, and the share lost. The sender keeps at most relayBenchWindow frames in flight,
// so the figure is the relay's forwarding rate, not how fast an unpaced sender overflows a socket
// buffer. The sub-benchmarks differ in how the sender sends, i.e. what the relay receives:
//
//   - single: one sendto per datagram (an agent that does not batch);
//   - batch: sendmmsg of relayBenchBatch datagrams, one datagram each;
//   - gso: sendmmsg with UDP GSO, up to 64 datagrams cut from each buffer (what wireguard-go's
//     StdNetBind does, and the agent's Bind for relay frames).
//
// The receiver reads with recvmmsg and UDP GRO, as wireguard-go does. Run it with -cpuprofile to
// see where the relay spends its time: the three goroutines share the machine's cores.
func BenchmarkRelayData(b *testing.B) {
	for _, mode := range []string{"single", "batch", "gso"} {
		b.Run(mode, func(b *testing.B) { benchRelay(b, mode) })
	}
}

func benchRelay(b *testing.B, mode string) {
	tx, _ := setupSocket(newLoopbackUDP(b))
	if mode == "gso" && !tx {
		b.Skip("no UDP GSO on this kernel")
	}
	s := startServer(b, "", 0, func(c *ServerConfig) {
		c.Limits.DataRate = 1e12
		c.Limits.DataBurst = 1 << 30
	})
	src, dst := newNode(b, "src"), newNode(b, "dst")
	src.start(b, testToken, p2pAddr(s))
	dst.start(b, testToken, p2pAddr(s))
	ss, sd := waitSession(b, src, 0), waitSession(b, dst, 0)
	us, ud := bindUDP(b, ss), bindUDP(b, sd)
	setupSocket(us)
	setupSocket(ud)

	frame := append(AppendDataHeader(nil, sd.ID), make([]byte, relayBenchPayload)...)
	frame[DataHeaderLen] = 4 // a WireGuard transport message
	send := relaySender(b, mode, us, ss.UDPAddr, frame)

	var received atomic.Int64
	type result struct {
		first, last time.Time
		err         error
	}
	done := make(chan struct{})
	got := make(chan result, 1)
	go func() {
		var r result
		pc := ipv4.NewPacketConn(ud)
		msgs := make([]ipv4.Message, relayBenchBatch)
		for i := range msgs {
			msgs[i].Buffers = [][]byte{make([]byte, 1<<16)}
			msgs[i].OOB = make([]byte, 64)
		}
		idleSince := time.Now()
		for {
			ud.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			n, err := pc.ReadBatch(msgs, 0)
			if err != nil {
				if !errors.Is(err, os.ErrDeadlineExceeded) {
					r.err = err
					break
				}
				select {
				case <-done:
					if time.Since(idleSince) > 500*time.Millisecond {
						got <- r
						return
					}
				default:
				}
				continue
			}
			now := time.Now()
			idleSince = now
			if r.first.IsZero() {
				r.first = now
			}
			r.last = now
			var frames int64
			for _, m := range msgs[:n] {
				seg := groSize(m.OOB[:m.NN])
				if seg == 0 {
					seg = m.N
				}
				frames += int64((m.N + seg - 1) / seg)
			}
			received.Add(frames)
		}
		got <- r
	}()

	b.ResetTimer()
	sent := 0
	for sent < b.N {
		// Wait for the window to open; a window that stays shut for 20 ms has lost frames.
		for wait := time.Now(); int64(sent)-received.Load() > relayBenchWindow && time.Since(wait) < 20*time.Millisecond; {
			time.Sleep(20 * time.Microsecond)
		}
		n := min(relayBenchBatch, b.N-sent)
		if err := send(n); err != nil {
			b.Fatal(err)
		}
		sent += n
	}
	// Wait for the last frames (or for the window to stay shut: those are lost).
	for wait := time.Now(); int64(sent) > received.Load() && time.Since(wait) < 100*time.Millisecond; {
		time.Sleep(100 * time.Microsecond)
	}
	b.StopTimer()
	close(done)
	r := <-got
	if r.err != nil {
		b.Fatal(r.err)
	}
	n := received.Load()
	if d := r.last.Sub(r.first); d > 0 && n > 1 {
		b.ReportMetric(float64(n)/d.Seconds(), "frames/s")
		b.ReportMetric(float64(n)*relayBenchPayload*8/d.Seconds()/1e9, "Gbit/s")
	}
	b.ReportMetric(100*float64(int64(b.N)-n)/float64(b.N), "loss-%")
}

// relaySender returns a function that sends n copies of frame from conn to the relay at to, the
// way mode says (see BenchmarkRelayData).
func relaySender(b *testing.B, mode string, conn *net.UDPConn, to netip.AddrPort, frame []byte) func(n int) error {
	b.Helper()
	dst, err := net.ResolveUDPAddr("udp4", to.String())
	if err != nil {
		b.Fatal(err)
	}
	pc := ipv4.NewPacketConn(conn)
	switch mode {
	case "single":
		return func(n int) error {
			for range n {
				if _, err := conn.WriteToUDP(frame, dst); err != nil {
					return err
				}
			}
			return nil
		}
	case "batch":
		msgs := make([]ipv4.Message, relayBenchBatch)
		for i := range msgs {
			msgs[i].Buffers = [][]byte{frame}
			msgs[i].Addr = dst
		}
		return func(n int) error { return writeAll(pc, msgs[:n]) }
	}
	// gso: as many frames per buffer as fit in one UDP datagram of 64 KiB and the kernel allows.
	perMsg := min(maxGSOSegments, (1<<16-1-20-8)/len(frame))
	buf := make([]byte, 0, perMsg*len(frame))
	for range perMsg {
		buf = append(buf, frame...)
	}
	msgs := make([]ipv4.Message, (relayBenchBatch+perMsg-1)/perMsg)
	return func(n int) error {
		k := 0
		for ; n > 0; k++ {
			segs := min(n, perMsg)
			msgs[k].Buffers = [][]byte{buf[:segs*len(frame)]}
			msgs[k].Addr = dst
			msgs[k].OOB = appendGSO(msgs[k].OOB[:0], len(frame))
			n -= segs
		}
		return writeAll(pc, msgs[:k])
	}
}

// writeAll sends msgs with as many sendmmsg calls as it takes.
func writeAll(pc *ipv4.PacketConn, msgs []ipv4.Message) error {
	for len(msgs) > 0 {
		n, err := pc.WriteBatch(msgs, 0)
		if err != nil {
			return err
		}
		msgs = msgs[n:]
	}
	return nil
}

// newLoopbackUDP opens a UDP socket on 127.0.0.1, closed when tb ends.
func newLoopbackUDP(tb testing.TB) *net.UDPConn {
	tb.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}
