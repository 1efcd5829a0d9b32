package netstack

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/internal/flows"
)

// handleUDP is the UDP forwarder's handler, called on gVisor's packet-processing goroutine for the first
// datagram of a new (src, dst) pair. It takes a slot of the client (src's address) in the UDP flow table,
// evicting the client's least recently active flow if the client is at its cap and that flow is idle for
// Config.UDPEvictIdle, or drops the datagram (counted) when no slot can be had. It then creates the flow's
// endpoint at once, so the flow's next datagrams queue there (at most Config.UDPQueueBytes) instead of
// starting more flows, and dials upstream in a goroutine of its own.
func (s *Stack) handleUDP(r *udp.ForwarderRequest) {
	if !s.enter() {
		s.udpStats.droppedDatagrams.Add(1)
		return
	}
	id := r.ID()
	src := addrPort(id.RemoteAddress, id.RemotePort)
	dst := addrPort(id.LocalAddress, id.LocalPort)
	if !s.acquireUDP(src, dst) {
		s.wg.Done()
		s.udpStats.droppedDatagrams.Add(1)
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		s.udpTable.Release(src.Addr())
		s.wg.Done()
		s.udpStats.refused.Add(1)
		s.udpStats.droppedDatagrams.Add(1)
		s.logf(slog.LevelDebug, "udp flow: create endpoint failed", "src", src, "dst", dst, "err", terr.String())
		return
	}
	queue := s.reserveUDPQueue()
	ep.SocketOptions().SetReceiveBufferSize(int64(queue), false)
	client := &clientUDP{UDPConn: gonet.NewUDPConn(&wq, ep), clientEnd: newClientEnd(ep, &wq), queue: queue}
	go func() {
		defer s.wg.Done()
		s.serveUDP(client, src, dst)
	}()
}

// acquireUDP takes a UDP flow slot of src's address, evicting one of its idle flows at its cap; it
// reports false, having counted the refusal, when no slot can be had.
func (s *Stack) acquireUDP(src, dst netip.AddrPort) bool {
	c := src.Addr()
	err := s.udpTable.Acquire(c)
	if errors.Is(err, flows.ErrClientCap) {
		if victim, ok := s.udpTable.Evict(c, time.Now().UnixNano(), s.cfg.UDPEvictIdle); ok {
			victim.close() // its goroutines end and remove it
			s.udpStats.evicted.Add(1)
			err = s.udpTable.Acquire(c)
		}
	}
	if err != nil {
		s.countCap(&s.udpStats, "udp", src, dst, err)
		return false
	}
	return true
}

// clientUDP is the client side of a UDP flow: the gonet conn and its endpoint.
type clientUDP struct {
	*gonet.UDPConn
	clientEnd
	queue int // bytes of the UDP queue budget the flow holds
}

func (c *clientUDP) Close() error {
	c.endWaits()
	return c.UDPConn.Close()
}

// queueDrops returns the datagrams the endpoint dropped because its queue was full.
func (c *clientUDP) queueDrops() uint64 {
	if st, ok := c.ep.Stats().(*tcpip.TransportEndpointStats); ok {
		return st.ReceiveErrors.ReceiveBufferOverflow.Value()
	}
	return 0
}

// serveUDP dials upstream for a new UDP flow, which holds a slot of srcAP's address, and relays datagrams
// both ways until the flow is idle for Config.UDPIdleTimeout (see reapUDP), is evicted, either side fails,
// or the Stack closes.
func (s *Stack) serveUDP(client *clientUDP, srcAP, dstAP netip.AddrPort) {
	defer s.releaseUDPQueue(client.queue)
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.ConnectTimeout)
	up, err := s.cfg.Dialer.DialFlow(ctx, discovery.UDP, srcAP, dstAP)
	cancel()
	if err != nil {
		s.udpTable.Release(srcAP.Addr())
		s.udpStats.refused.Add(1)
		s.udpStats.droppedDatagrams.Add(1 + drain(client.UDPConn))
		s.logf(slog.LevelDebug, "udp flow refused", "src", srcAP, "dst", dstAP, "err", err)
		client.Close()
		return
	}

	f := &flow{client: client, upstream: up, udp: true}
	f.lastActive.Store(time.Now().UnixNano())
	if !s.addFlow(f) {
		s.udpTable.Release(srcAP.Addr())
		f.close()
		return
	}
	s.udpTable.Attach(srcAP.Addr(), f)
	s.udpStats.opened.Add(1)
	s.udpStats.active.Add(1)
	defer s.udpStats.active.Add(^uint64(0))
	defer s.udpTable.Detach(srcAP.Addr(), f)
	defer s.removeUDPFlow(f, client)
	defer f.close()

	var wg sync.WaitGroup
	wg.Add(1)
	s.wg.Add(1) // the caller holds a reference on s.wg, so Close has not begun waiting
	go func() {
		defer s.wg.Done()
		defer wg.Done()
		s.relayFromUpstream(f, client, up)
	}()
	s.relayFromClient(f, client, up)
	wg.Wait()
}

// removeUDPFlow removes f, whose client side is client, from the flows Close closes, and counts its
// queue's drops in the same critical section, so Stats (which adds those of open flows) counts them
// once.
func (s *Stack) removeUDPFlow(f *flow, client *clientUDP) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.udpStats.queueDrops.Add(client.queueDrops())
	delete(s.flows, f)
}

// relayFromClient sends the client's datagrams upstream, one Read to one Write, until the client's side
// fails or closes; then it closes the flow. It waits for the endpoint to be readable before it takes a
// buffer, and gives the buffer back once the queue is empty. A failed Write drops (and counts) that
// datagram only.
func (s *Stack) relayFromClient(f *flow, client *clientUDP, up net.Conn) {
	defer f.close()
	wait, stop := client.readWaiter()
	defer stop()
	for {
		if err := wait(); err != nil {
			return
		}
		bp := s.bufs.Get()
		err := s.sendQueued(f, client, up, *bp)
		s.bufs.Put(bp)
		if err != nil {
			return
		}
	}
}

// sendQueued sends the datagrams queued on the client's endpoint upstream through buf, until the queue
// is empty (nil) or the flow fails.
func (s *Stack) sendQueued(f *flow, client *clientUDP, up net.Conn, buf []byte) error {
	for client.ep.Readiness(waiter.ReadableEvents) != 0 {
		n, err := client.Read(buf)
		if err != nil {
			return err
		}
		f.lastActive.Store(time.Now().UnixNano())
		if _, err := up.Write(buf[:n]); err != nil {
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			s.udpStats.droppedDatagrams.Add(1)
			s.logf(slog.LevelDebug, "udp flow: dropped datagram", "err", err)
			continue
		}
		s.udpStats.bytesUp.Add(uint64(n))
	}
	return nil
}

// relayFromUpstream sends the upstream's datagrams to the client, one Read to one Write, until the
// upstream fails or closes; then it closes the flow. When up is a syscall.Conn (kernel sockets and the
// forward Dialer's UDP conns are) it waits for a datagram before it takes a buffer; otherwise it holds
// one for the life of the flow. A failed Write drops (and counts) that datagram only.
func (s *Stack) relayFromUpstream(f *flow, client *clientUDP, up net.Conn) {
	defer f.close()
	wait := flows.SocketWaiter(up)
	var held *[]byte
	if wait == nil {
		held = s.bufs.Get()
		defer s.bufs.Put(held)
	}
	for {
		if wait != nil {
			if err := wait(); err != nil {
				return
			}
		}
		bp := held
		if bp == nil {
			bp = s.bufs.Get()
		}
		err := s.sendReply(f, client, up, *bp)
		if held == nil {
			s.bufs.Put(bp)
		}
		if err != nil {
			return
		}
	}
}

// sendReply reads one datagram from up and writes it to the client through buf.
func (s *Stack) sendReply(f *flow, client *clientUDP, up net.Conn, buf []byte) error {
	n, err := up.Read(buf)
	if err != nil {
		return err
	}
	f.lastActive.Store(time.Now().UnixNano())
	if _, err := client.Write(buf[:n]); err != nil {
		if errors.Is(err, net.ErrClosed) {
			return err
		}
		s.udpStats.droppedDatagrams.Add(1)
		s.logf(slog.LevelDebug, "udp flow: dropped datagram", "err", err)
		return nil
	}
	s.udpStats.bytesDown.Add(uint64(n))
	return nil
}

// drain reads and counts the datagrams already queued on c without blocking.
func drain(c *gonet.UDPConn) uint64 {
	var n uint64
	if err := c.SetReadDeadline(time.Now()); err != nil {
		return 0
	}
	buf := make([]byte, flows.BufferSize)
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
