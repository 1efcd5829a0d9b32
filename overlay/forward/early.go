package forward

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
)

// MaxEarly is how many bytes of a TCP flow's EarlyData a Dial sends before the status; more waits
// for it. A request that fits (an HTTP request, a TLS ClientHello) then reaches the endpoint one
// round trip over the overlay sooner.
const MaxEarly = 32 << 10

// EarlyData is the first bytes of a TCP flow from its client, still held by the caller. A Dial whose
// context carries one (WithEarlyData) sends them right behind the header, as they arrive, instead of
// waiting for the status first; the wire format allows it and the Listener relays them once the
// target is connected. They stay the caller's until the status is known: on status 0 the Dial
// consumes what it sent (Consume) before it returns, so the caller's splice goes on from the next
// byte; on any other outcome it consumes nothing, and the next attempt (another endpoint) sends them
// again.
type EarlyData interface {
	// Peek waits until the client has sent more than off bytes, then copies the bytes from offset
	// off on into p (as many as fit) without consuming them. It returns io.EOF when the client will
	// send no more, and ctx's error when ctx ends first.
	Peek(ctx context.Context, off int, p []byte) (int, error)
	// Consume drops the first n bytes, which Peek returned.
	Consume(n int) error
}

type earlyKey struct{}

// WithEarlyData returns a context carrying e, for Dial. The service netstack attaches its flows' early
// data this way; a proxy between the two passes the context on.
func WithEarlyData(ctx context.Context, e EarlyData) context.Context {
	return context.WithValue(ctx, earlyKey{}, e)
}

// EarlyDataFrom returns the EarlyData ctx carries, or nil.
func EarlyDataFrom(ctx context.Context) EarlyData {
	e, _ := ctx.Value(earlyKey{}).(EarlyData)
	return e
}

// exchangeEarly writes the header, then early's bytes as they arrive (up to MaxEarly) until the
// status comes, which it returns with the count of early bytes sent. A write that fails stops the
// early bytes; the status read then tells what happened to the connection.
func exchangeEarly(ctx context.Context, conn net.Conn, hdr []byte, early EarlyData) (Status, int, error) {
	if _, err := conn.Write(hdr); err != nil {
		return 0, 0, fmt.Errorf("send header: %w", err)
	}
	type result struct {
		st  Status
		err error
	}
	got := make(chan result, 1)
	pctx, stopPeek := context.WithCancel(ctx)
	defer stopPeek()
	go func() {
		st, err := readStatus(conn)
		stopPeek()
		got <- result{st, err}
	}()
	var buf [4 << 10]byte
	sent := 0
	for sent < MaxEarly {
		n, err := early.Peek(pctx, sent, buf[:min(len(buf), MaxEarly-sent)])
		if err != nil {
			break
		}
		if _, err := conn.Write(buf[:n]); err != nil {
			break
		}
		sent += n
	}
	r := <-got
	return r.st, sent, r.err
}

// readStatus reads the status byte.
func readStatus(conn net.Conn) (Status, error) {
	var st [1]byte
	if _, err := io.ReadFull(conn, st[:]); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, fmt.Errorf("read status: %w", err)
	}
	return Status(st[0]), nil
}
