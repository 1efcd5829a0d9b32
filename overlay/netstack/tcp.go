package netstack

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/forward"
	"github.com/edgewire/edgewire/overlay/internal/flows"
)

// handleTCP is the TCP forwarder's handler. gVisor's forwarder already runs it in a goroutine of its own
// per SYN (so a slow DialFlow stalls no other packet); the Stack adopts that goroutine into s.wg.
//
// With a Dialer that is an Admitter, a flow AdmitFlow refuses gets a RST at once; an admitted one has
// its handshake completed while DialFlow dials, so the client's connect does not wait for the dial (the
// data it sends meanwhile waits in the stack's receive buffer); a DialFlow error then resets the
// established connection. DialFlow's context then carries those first bytes (forward.WithEarlyData),
// which the forward Dialer sends ahead with its request. Without an Admitter, DialFlow runs first and
// the handshake is completed only once it succeeded: a refused flow is refused with a RST before the
// client ever sees it established.
//
// Before all that the flow takes a slot of its client (source address) in the TCP flow table, which
// it holds until it ends; a SYN over Config.MaxTCPFlowsPerClient or Config.MaxTCPFlows gets a RST at
// once and is counted.
func (s *Stack) handleTCP(r *tcp.ForwarderRequest) {
	if !s.enter() {
		r.Complete(true)
		return
	}
	defer s.wg.Done()

	id := r.ID()
	src := addrPort(id.RemoteAddress, id.RemotePort)
	dst := addrPort(id.LocalAddress, id.LocalPort)
	if err := s.tcpTable.Acquire(src.Addr()); err != nil {
		s.countCap(&s.tcpStats, "tcp", src, dst, err)
		r.Complete(true)
		return
	}
	defer s.tcpTable.Release(src.Addr())

	admitter, early := s.cfg.Dialer.(Admitter)
	if early {
		if err := admitter.AdmitFlow(discovery.TCP, src, dst); err != nil {
			s.refuseTCP(r, src, dst, err)
			return
		}
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.ConnectTimeout)
	defer cancel()
	var data *earlySource // early: the client's first bytes, for DialFlow
	if early {
		data = newEarlySource()
		ctx = forward.WithEarlyData(ctx, data)
	}
	dial := func() dialResult {
		up, err := s.cfg.Dialer.DialFlow(ctx, discovery.TCP, src, dst)
		return dialResult{up, err}
	}
	var res dialResult
	var dialed chan dialResult // early: where the dialling goroutine leaves its result
	if early {
		dialed = make(chan dialResult, 1)
		s.wg.Add(1) // the caller holds a reference on s.wg, so Close has not begun waiting
		go func() {
			defer s.wg.Done()
			dialed <- dial()
		}()
	} else if res = dial(); res.err != nil {
		s.refuseTCP(r, src, dst, res.err)
		return
	}

	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if early {
		if terr != nil {
			data.set(nil, nil)
			cancel()
		} else {
			data.set(ep, &wq)
		}
		res = <-dialed
	}
	if terr != nil {
		s.tcpStats.refused.Add(1)
		s.logf(slog.LevelDebug, "tcp flow: handshake with client failed", "src", src, "dst", dst, "err", terr.String())
		r.Complete(true)
		if res.up != nil {
			res.up.Close()
		}
		return
	}
	r.Complete(false)
	if res.err != nil {
		s.tcpStats.refused.Add(1)
		s.logf(slog.LevelDebug, "tcp flow refused: resetting the client's connection", "src", src, "dst", dst, "err", res.err)
		ep.Abort()
		return
	}
	client := &clientTCP{TCPConn: gonet.NewTCPConn(&wq, ep), clientEnd: newClientEnd(ep, &wq)}

	f := &flow{client: client, upstream: res.up}
	if !s.addFlow(f) {
		f.close()
		return
	}
	defer s.removeFlow(f)
	s.tcpStats.opened.Add(1)
	s.tcpStats.active.Add(1)
	defer s.tcpStats.active.Add(^uint64(0))

	s.splice(f, client, res.up)
}

// dialResult is what DialFlow returned.
type dialResult struct {
	up  net.Conn
	err error
}

// refuseTCP refuses a flow before its handshake: the client gets a RST.
func (s *Stack) refuseTCP(r *tcp.ForwarderRequest, src, dst netip.AddrPort, err error) {
	s.tcpStats.refused.Add(1)
	s.logf(slog.LevelDebug, "tcp flow refused", "src", src, "dst", dst, "err", err)
	r.Complete(true)
}

// splice copies both ways between client and up until both directions end. On EOF from one side it
// half-closes the other (CloseWrite), so a client that shuts down its sending side still receives the
// rest of the response. An error either way closes both connections. Each direction waits for data
// before it takes a buffer from s.bufs, so an idle flow holds none (an upstream that is no
// syscall.Conn is the exception: its direction holds a buffer while it waits).
func (s *Stack) splice(f *flow, client *clientTCP, up net.Conn) {
	defer f.close()
	var wg sync.WaitGroup
	wg.Add(1)
	s.wg.Add(1) // the caller holds a reference on s.wg, so Close has not begun waiting
	go func() {
		defer s.wg.Done()
		defer wg.Done()
		wait, stop := client.readWaiter()
		defer stop()
		s.copyHalf(f, up, client, wait, &s.tcpStats.bytesUp)
	}()
	s.copyHalf(f, client, up, flows.SocketWaiter(up), &s.tcpStats.bytesDown)
	wg.Wait()
}

// copyHalf copies src to dst, counting bytes; EOF half-closes dst, an error closes the whole flow.
func (s *Stack) copyHalf(f *flow, dst, src net.Conn, wait func() error, n *atomic.Uint64) {
	err := flows.Copy(dst, src, wait, &s.bufs, n)
	if err != nil && !errors.Is(err, net.ErrClosed) {
		f.close()
		return
	}
	if err != nil {
		return
	}
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		if cw.CloseWrite() == nil {
			return
		}
	}
	f.close()
}

// clientTCP is the client side of a TCP flow: the gonet conn and its endpoint.
type clientTCP struct {
	*gonet.TCPConn
	clientEnd
}

func (c *clientTCP) Close() error {
	c.endWaits()
	return c.TCPConn.Close()
}

// clientEnd is a flow's client endpoint and its queue, whose readiness the client-to-upstream
// direction waits on before it takes a buffer, and a channel that ends those waits when the flow is
// closed (a graceful close of the endpoint does not signal them).
type clientEnd struct {
	ep   tcpip.Endpoint
	wq   *waiter.Queue
	done chan struct{}
	once sync.Once
}

func newClientEnd(ep tcpip.Endpoint, wq *waiter.Queue) clientEnd {
	return clientEnd{ep: ep, wq: wq, done: make(chan struct{})}
}

// endWaits makes every wait return net.ErrClosed; it is idempotent.
func (c *clientEnd) endWaits() { c.once.Do(func() { close(c.done) }) }

// readWaiter returns a wait function for flows.Copy that blocks until the endpoint has something to
// read (data, FIN or an error state) or endWaits was called, and a function that stops it.
func (c *clientEnd) readWaiter() (wait func() error, stop func()) {
	entry, ch := waiter.NewChannelEntry(waiter.ReadableEvents)
	c.wq.EventRegister(&entry)
	wait = func() error {
		for c.ep.Readiness(waiter.ReadableEvents) == 0 {
			select {
			case <-ch:
			case <-c.done:
				return net.ErrClosed
			}
		}
		return nil
	}
	return wait, func() { c.wq.EventUnregister(&entry) }
}
