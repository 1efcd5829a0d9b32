package netstack

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/edgewire/edgewire/discovery"
)

// maxDatagram is the largest UDP payload; relay buffers hold one whole datagram so none is truncated.
const maxDatagram = 1<<16 - 1

// handleUDP is the UDP forwarder's handler, called on gVisor's packet-processing goroutine for the first
// datagram of a new (src, dst) pair. It creates the flow's endpoint at once, so the flow's next datagrams
// queue there instead of starting more flows, and dials upstream in a goroutine of its own.
func (s *Stack) handleUDP(r *udp.ForwarderRequest) {
	if !s.enter() {
		s.udpStats.droppedDatagrams.Add(1)
		return
	}
	id := r.ID()
	src := addrPort(id.RemoteAddress, id.RemotePort)
	dst := addrPort(id.LocalAddress, id.LocalPort)
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		s.wg.Done()
		s.udpStats.refused.Add(1)
		s.udpStats.droppedDatagrams.Add(1)
		s.logf(slog.LevelDebug, "udp flow: create endpoint failed", "src", src, "dst", dst, "err", terr.String())
		return
	}
	client := gonet.NewUDPConn(&wq, ep)
	go func() {
		defer s.wg.Done()
		s.serveUDP(client, src, dst)
	}()
}

// serveUDP dials upstream for a new UDP flow and relays datagrams both ways until the flow is idle for
// Config.UDPIdleTimeout (see reapUDP), either side fails, or the Stack closes.
func (s *Stack) serveUDP(client *gonet.UDPConn, srcAP, dstAP netip.AddrPort) {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.ConnectTimeout)
	up, err := s.cfg.Dialer.DialFlow(ctx, discovery.UDP, srcAP, dstAP)
	cancel()
	if err != nil {
		s.udpStats.refused.Add(1)
		s.udpStats.droppedDatagrams.Add(1 + drain(client))
		s.logf(slog.LevelDebug, "udp flow refused", "src", srcAP, "dst", dstAP, "err", err)
		client.Close()
		return
	}

	f := &flow{client: client, upstream: up, udp: true}
	f.lastActive.Store(time.Now().UnixNano())
	if !s.addFlow(f) {
		f.close()
		return
	}
	s.udpStats.opened.Add(1)
	s.udpStats.active.Add(1)
	defer s.udpStats.active.Add(^uint64(0))
	defer s.removeFlow(f)
	defer f.close()

	var wg sync.WaitGroup
	wg.Add(1)
	s.wg.Add(1) // the caller holds a reference on s.wg, so Close has not begun waiting
	go func() {
		defer s.wg.Done()
		defer wg.Done()
		s.relayDatagrams(f, up, client, &s.udpStats.bytesUp)
	}()
	s.relayDatagrams(f, client, up, &s.udpStats.bytesDown)
	wg.Wait()
}

// relayDatagrams copies datagrams from src to dst, one Read to one Write, until src fails or closes;
// then it closes the flow. A failed Write drops (and counts) that datagram only.
func (s *Stack) relayDatagrams(f *flow, dst, src net.Conn, bytes *atomic.Uint64) {
	defer f.close()
	buf := make([]byte, maxDatagram)
	for {
		n, err := src.Read(buf)
		if err != nil {
			return
		}
		f.lastActive.Store(time.Now().UnixNano())
		if _, err := dst.Write(buf[:n]); err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			s.udpStats.droppedDatagrams.Add(1)
			s.logf(slog.LevelDebug, "udp flow: dropped datagram", "err", err)
			continue
		}
		bytes.Add(uint64(n))
	}
}

// drain reads and counts the datagrams already queued on c without blocking.
func drain(c *gonet.UDPConn) uint64 {
	var n uint64
	if err := c.SetReadDeadline(time.Now()); err != nil {
		return 0
	}
	buf := make([]byte, maxDatagram)
	for {
		if _, err := c.Read(buf); err != nil {
			return n
		}
		n++
	}
}

// reapUDP closes UDP flows idle in both directions for Config.UDPIdleTimeout. It runs from Start to Close.
func (s *Stack) reapUDP() {
	defer s.wg.Done()
	every := s.cfg.UDPIdleTimeout / 4
	every = min(max(every, 10*time.Millisecond), 5*time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	var idle []*flow
	for {
		select {
		case <-s.ctx.Done():
			return
		case now := <-t.C:
			deadline := now.Add(-s.cfg.UDPIdleTimeout).UnixNano()
			idle = idle[:0]
			s.mu.Lock()
			for f := range s.flows {
				if f.udp && f.lastActive.Load() <= deadline {
					idle = append(idle, f)
				}
			}
			s.mu.Unlock()
			for _, f := range idle {
				f.close()
			}
			clear(idle)
		}
	}
}
