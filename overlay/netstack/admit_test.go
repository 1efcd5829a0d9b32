package netstack

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/forward"
)

// admittingDialer is a fakeDialer that is an Admitter: it admits unless admitErr is set, and its
// DialFlow waits for gate to close first.
type admittingDialer struct {
	*fakeDialer
	admitErr error
	gate     chan struct{}
	admitted chan netip.AddrPort
}

func (d *admittingDialer) AdmitFlow(proto discovery.Protocol, src, dst netip.AddrPort) error {
	if d.admitErr != nil {
		return d.admitErr
	}
	d.admitted <- dst
	return nil
}

func (d *admittingDialer) DialFlow(ctx context.Context, proto discovery.Protocol, src, dst netip.AddrPort) (net.Conn, error) {
	select {
	case <-d.gate:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return d.fakeDialer.DialFlow(ctx, proto, src, dst)
}

func newAdmitting(t *testing.T, fd *fakeDialer, admitErr error) (*harness, *admittingDialer) {
	d := &admittingDialer{fakeDialer: fd, admitErr: admitErr, gate: make(chan struct{}), admitted: make(chan netip.AddrPort, 8)}
	return newHarness(t, Config{Dialer: d}, fd), d
}

func TestTCPHandshakeWhileDialing(t *testing.T) {
	srv := newTCPServer(t, echoTCP)
	h, d := newAdmitting(t, &fakeDialer{tcpTarget: srv.Addr()}, nil)

	// The client's connect completes while DialFlow is still held at the gate.
	c := h.connect(t, netip.AddrPortFrom(serviceV4, 80))
	if dst := <-d.admitted; dst != netip.AddrPortFrom(serviceV4, 80) {
		t.Fatalf("AdmitFlow saw %v", dst)
	}
	// What the client sends meanwhile waits in the stack and reaches the upstream once it is dialled.
	if _, err := c.Write([]byte("early bytes")); err != nil {
		t.Fatalf("write before the upstream exists: %v", err)
	}
	if st := h.stack.Stats().TCP; st.Opened != 0 {
		t.Fatalf("TCP stats %+v before the dial completed, want nothing opened", st)
	}
	close(d.gate)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, len("early bytes"))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "early bytes" {
		t.Fatalf("echo: %q, %v", buf, err)
	}
	waitFor(t, "the flow to be counted", 5*time.Second, func() bool { return h.stack.Stats().TCP.Opened == 1 })
}

func TestTCPAdmitRefuses(t *testing.T) {
	h, d := newAdmitting(t, &fakeDialer{}, errors.New("no endpoints"))
	close(d.gate)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	c, err := h.client.DialContextTCPAddrPort(ctx, netip.AddrPortFrom(serviceV4, 80))
	if err == nil {
		c.Close()
		t.Fatal("dial succeeded, want connection refused")
	}
	if !strings.Contains(err.Error(), "refused") {
		t.Fatalf("dial error = %v, want connection refused", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("refusal took %v, want it at once", took)
	}
	if calls := d.Calls(); len(calls) != 0 {
		t.Errorf("DialFlow called %d times for a flow AdmitFlow refused", len(calls))
	}
	if st := h.stack.Stats().TCP; st.Refused != 1 || st.Opened != 0 {
		t.Errorf("TCP stats = %+v, want 1 refused", st)
	}
}

func TestTCPDialFailsAfterHandshake(t *testing.T) {
	h, d := newAdmitting(t, &fakeDialer{err: errors.New("every endpoint refused")}, nil)
	// The handshake completes while DialFlow dials.
	c := h.connect(t, netip.AddrPortFrom(serviceV4, 80))
	close(d.gate)
	// DialFlow fails: the established connection is reset.
	c.SetDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 1))
	if err == nil || errors.Is(err, io.EOF) || strings.Contains(err.Error(), "timeout") {
		t.Fatalf("read after the upstream dial failed: %d, %v; want a connection reset", n, err)
	}
	waitFor(t, "the refusal to be counted", 5*time.Second, func() bool { return h.stack.Stats().TCP.Refused == 1 })
	if st := h.stack.Stats().TCP; st.Opened != 0 {
		t.Errorf("TCP stats = %+v, want nothing opened", st)
	}
}

// earlyDialer is an Admitter whose DialFlow does what the forward Dialer does with EarlyData: it
// peeks the client's first bytes, "fails" a first attempt without consuming them, peeks them again,
// sends them to the upstream itself and consumes them.
type earlyDialer struct {
	*fakeDialer
	take     int
	peekErrs chan error // what a Peek past the client's FIN returned
}

func (d *earlyDialer) AdmitFlow(discovery.Protocol, netip.AddrPort, netip.AddrPort) error { return nil }

func (d *earlyDialer) DialFlow(ctx context.Context, proto discovery.Protocol, src, dst netip.AddrPort) (net.Conn, error) {
	early := forward.EarlyDataFrom(ctx)
	if early == nil {
		return nil, errors.New("no early data in the DialFlow context")
	}
	peek := func() ([]byte, error) {
		got := make([]byte, 0, d.take)
		buf := make([]byte, 3) // small, so that Peek is called at several offsets
		for len(got) < d.take {
			n, err := early.Peek(ctx, len(got), buf[:min(len(buf), d.take-len(got))])
			if err != nil {
				return got, err
			}
			got = append(got, buf[:n]...)
		}
		return got, nil
	}
	first, err := peek()
	if err != nil {
		return nil, err
	}
	again, err := peek() // the first attempt failed: nothing was consumed
	if err != nil || string(again) != string(first) {
		return nil, errors.New("second peek saw other bytes")
	}
	_, err = early.Peek(ctx, d.take, make([]byte, 1))
	d.peekErrs <- err
	up, err := d.fakeDialer.DialFlow(ctx, proto, src, dst)
	if err != nil {
		return nil, err
	}
	if _, err := up.Write(first); err != nil {
		up.Close()
		return nil, err
	}
	if err := early.Consume(len(first)); err != nil {
		up.Close()
		return nil, err
	}
	return up, nil
}

func TestTCPEarlyData(t *testing.T) {
	for _, tc := range []struct {
		name    string
		fin     bool // the client half-closes after "hello world"
		wantErr error
	}{
		{"client keeps sending", false, nil},
		{"client half-closes", true, io.EOF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newTCPServer(t, echoTCP)
			fd := &fakeDialer{tcpTarget: srv.Addr()}
			d := &earlyDialer{fakeDialer: fd, take: 11, peekErrs: make(chan error, 1)}
			h := newHarness(t, Config{Dialer: d}, fd)
			c := h.connect(t, netip.AddrPortFrom(serviceV4, 80))
			if _, err := c.Write([]byte("hello world")); err != nil {
				t.Fatalf("write: %v", err)
			}
			// A Peek past the client's bytes waits for more (which the client then sends) or,
			// after the FIN, returns io.EOF.
			want := "hello world"
			if tc.fin {
				c.CloseWrite()
			} else {
				if _, err := c.Write([]byte(", more")); err != nil {
					t.Fatalf("write: %v", err)
				}
				want += ", more"
			}
			if err := <-d.peekErrs; !errors.Is(err, tc.wantErr) {
				t.Fatalf("Peek past the client's bytes = %v, want %v", err, tc.wantErr)
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			got := make([]byte, len(want))
			if _, err := io.ReadFull(c, got); err != nil || string(got) != want {
				t.Fatalf("echo %q, %v; want %q: each byte once, in order", got, err, want)
			}
		})
	}
}
