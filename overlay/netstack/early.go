package netstack

import (
	"context"
	"errors"
	"fmt"
	"io"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/waiter"
)

// EarlyData is what the context of an admitted TCP flow's DialFlow carries (EarlyDataFrom): the
// client's first bytes, which the Stack holds in the flow's receive buffer while DialFlow runs. A
// Dialer whose far side must answer before the flow is spliced (the forward protocol's status) may
// send them ahead with its request, then Consume exactly what it sent when it returns a connection
// (the splice goes on from the next byte), or consume nothing when the attempt fails: the next
// attempt can Peek them again. Its methods are safe for one caller at a time.
type EarlyData interface {
	// Peek waits until the client has sent more than off bytes, then copies the bytes from offset
	// off on into p (as many as fit) without consuming them. It returns io.EOF when the client will
	// send no more, and ctx's error when ctx ends first.
	Peek(ctx context.Context, off int, p []byte) (int, error)
	// Consume drops the first n bytes, which Peek returned.
	Consume(n int) error
}

type earlyKey struct{}

// EarlyDataFrom returns the EarlyData of a DialFlow context, or nil (a UDP flow, a Dialer that is not
// an Admitter).
func EarlyDataFrom(ctx context.Context) EarlyData {
	e, _ := ctx.Value(earlyKey{}).(EarlyData)
	return e
}

var (
	// errNoClient is Peek's error when the client's handshake failed: there is no data to come.
	errNoClient = errors.New("netstack: client connection not established")
	// errClientGone is Peek's error when the client's connection was reset or failed.
	errClientGone = errors.New("netstack: client connection reset")
)

// earlySource is the EarlyData of one flow. The flow's endpoint is created (the handshake completed)
// while DialFlow runs, so Peek first waits for it.
type earlySource struct {
	ready chan struct{} // closed by set
	ep    tcpip.Endpoint
	wq    *waiter.Queue
}

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
