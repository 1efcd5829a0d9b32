package netstack

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/forward"
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
func (s *Stack) handleTCP(r *tcp.ForwarderRequest) {
	if !s.enter() {
		r.Complete(true)
		return
	}
	defer s.wg.Done()

	id := r.ID()
	src := addrPort(id.RemoteAddress, id.RemotePort)
	dst := addrPort(id.LocalAddress, id.LocalPort)

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
	client := gonet.NewTCPConn(&wq, ep)

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
// rest of the response. An error either way closes both connections.
func (s *Stack) splice(f *flow, client *gonet.TCPConn, up net.Conn) {
	defer f.close()
	var wg sync.WaitGroup
	wg.Add(1)
	s.wg.Add(1) // the caller holds a reference on s.wg, so Close has not begun waiting
	go func() {
		defer s.wg.Done()
		defer wg.Done()
		s.copyHalf(f, up, client, &s.tcpStats.bytesUp)
	}()
	s.copyHalf(f, client, up, &s.tcpStats.bytesDown)
	wg.Wait()
}

// copyHalf copies src to dst, counting bytes; EOF half-closes dst, an error closes the whole flow.
func (s *Stack) copyHalf(f *flow, dst, src net.Conn, n *atomic.Uint64) {
	buf := s.copyBufs.Get().(*[]byte)
	_, err := io.CopyBuffer(countingWriter{dst, n}, onlyReader{src}, *buf)
	s.copyBufs.Put(buf)
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

type countingWriter struct {
	w io.Writer
	n *atomic.Uint64
}

func (c countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(uint64(n))
	return n, err
}

// onlyReader hides src's WriterTo so io.CopyBuffer uses our buffer and counting writer.
type onlyReader struct{ r io.Reader }

func (o onlyReader) Read(p []byte) (int, error) { return o.r.Read(p) }
