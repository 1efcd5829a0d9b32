package netstack

import (
	"context"
	"errors"
	"fmt"
	"io"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/edgewire/edgewire/overlay/forward"
)

var (
	// errNoClient is Peek's error when the client's handshake failed: there is no data to come.
	errNoClient = errors.New("netstack: client connection not established")
	// errClientGone is Peek's error when the client's connection was reset or failed.
	errClientGone = errors.New("netstack: client connection reset")
)

// earlySource is the forward.EarlyData of one admitted TCP flow: the client's first bytes, which the
// Stack holds in the flow's receive buffer while DialFlow runs. The flow's endpoint is created (the
// handshake completed) while DialFlow runs, so Peek first waits for it. Its methods are for one
// caller at a time.
type earlySource struct {
	ready chan struct{} // closed by set
	ep    tcpip.Endpoint
	wq    *waiter.Queue
}

var _ forward.EarlyData = (*earlySource)(nil)

func newEarlySource() *earlySource { return &earlySource{ready: make(chan struct{})} }

// set gives the source the flow's endpoint and queue, or nil when the handshake failed.
func (e *earlySource) set(ep tcpip.Endpoint, wq *waiter.Queue) {
	e.ep, e.wq = ep, wq
	close(e.ready)
}

func (e *earlySource) Peek(ctx context.Context, off int, p []byte) (int, error) {
	select {
	case <-e.ready:
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	if e.ep == nil {
		return 0, errNoClient
	}
	entry, ch := waiter.NewChannelEntry(waiter.ReadableEvents)
	e.wq.EventRegister(&entry)
	defer e.wq.EventUnregister(&entry)
	for {
		w := peekWriter{skip: off, p: p}
		_, terr := e.ep.Read(&w, tcpip.ReadOptions{Peek: true})
		if w.n > 0 {
			return w.n, nil
		}
		switch terr.(type) {
		case nil, *tcpip.ErrWouldBlock, *tcpip.ErrBadBuffer:
			// Nothing past off: unless the client's FIN came, more may.
			ready := e.ep.Readiness(waiter.ReadableEvents)
			if ready&waiter.EventRdHUp != 0 {
				return 0, io.EOF
			}
			if ready&(waiter.EventHUp|waiter.EventErr) != 0 {
				return 0, errClientGone
			}
		case *tcpip.ErrClosedForReceive:
			return 0, io.EOF
		default:
			return 0, fmt.Errorf("netstack: peek client data: %s", terr)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

func (e *earlySource) Consume(n int) error {
	if e.ep == nil {
		return errNoClient
	}
	for n > 0 {
		w := discardWriter{left: n}
		res, terr := e.ep.Read(&w, tcpip.ReadOptions{})
		if terr != nil {
			return fmt.Errorf("netstack: consume %d client bytes: %s", n, terr)
		}
		n -= res.Count
	}
	return nil
}

// errFull stops an endpoint's Read once the writer has what it wants.
var errFull = errors.New("full")

// peekWriter drops the first skip bytes written to it and keeps the following ones in p.
type peekWriter struct {
	skip int
	p    []byte
	n    int
}

func (w *peekWriter) Write(b []byte) (int, error) {
	total := len(b)
	k := min(w.skip, len(b))
	w.skip -= k
	b = b[k:]
	c := copy(w.p[w.n:], b)
	w.n += c
	if c < len(b) {
		return total - (len(b) - c), errFull
	}
	return total, nil
}

// discardWriter takes left bytes and no more.
type discardWriter struct{ left int }

func (w *discardWriter) Write(b []byte) (int, error) {
	if len(b) > w.left {
		n := w.left
		w.left = 0
		return n, errFull
	}
	w.left -= len(b)
	return len(b), nil
}
