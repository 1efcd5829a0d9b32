package forward

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/edgewire/edgewire/discovery"
)

// DefaultDialTimeout bounds a Dial whose Dialer has no Timeout.
const DefaultDialTimeout = 5 * time.Second

// Dialer is the client side: it opens flows to endpoints on other nodes through their Listener. The
// zero Dialer is ready to use; it is safe for concurrent use and must not be copied after first use.
// A Dialer with Spares must be closed.
type Dialer struct {
	// Port is the forward port of the remote nodes; 0 means DefaultPort.
	Port uint16
	// Timeout bounds a whole Dial (connect, header and status), together with the context's
	// deadline; 0 means DefaultDialTimeout.
	Timeout time.Duration
	// Spares is how many connected TCP connections per remote node the Dialer keeps ready, so that
	// a flow's Dial only sends its header and reads the status: one round trip over the overlay
	// instead of two. Spares are dialled in the background by the Dials that use a node (none for a
	// node never dialled) and closed after SpareMaxAge unused. 0 means none.
	Spares int
	// SpareMaxAge is how long a spare waits; 0 means DefaultSpareMaxAge. Keep it below the remote
	// Listener's HeaderTimeout.
	SpareMaxAge time.Duration

	mu     sync.Mutex // guards all following fields
	closed bool
	stats  DialerStats // Spares unused
	pool   map[netip.AddrPort]*spares
	timers map[*time.Timer]struct{} // the spares' expiry timers
	ctx    context.Context          // canceled by Close: stops refills
	cancel context.CancelFunc
	wg     sync.WaitGroup // refills
}

// Dial opens a flow of proto to target, an endpoint on the node whose overlay address is node.
//
// For TCP it connects to [node]:Port, sends the header and waits for the status within the
// deadline; a non-zero status closes the connection and returns an error wrapping ErrRefused,
// ErrDialFailed, ErrBadRequest, ErrUnsupportedVersion, ErrBusy or ErrProtocol. A spare connection
// answered busy (it may have been refused when it connected) is replaced by a fresh one. The returned conn is a
// *net.TCPConn carrying the flow's payload, with no deadline set.
//
// For UDP it returns a datagram conn, connected to [node]:Port, whose Write sends one datagram
// (header and payload) per call and whose Read returns one reply datagram per call. UDP has no
// status: a refused target shows only as the absence of replies.
func (d *Dialer) Dial(ctx context.Context, proto discovery.Protocol, node netip.Addr, target netip.AddrPort) (net.Conn, error) {
	h := Header{Proto: proto, Target: target}
	if err := h.Validate(); err != nil {
		return nil, fmt.Errorf("forward dial %s %s via %s: %w", proto, target, node, err)
	}
	port := d.Port
	if port == 0 {
		port = DefaultPort
	}
	server := netip.AddrPortFrom(node, port)
	ctx, cancel := context.WithTimeout(ctx, d.timeout())
	defer cancel()

	var conn net.Conn
	var err error
	switch proto {
	case discovery.TCP:
		early := EarlyDataFrom(ctx)
		if c := d.takeSpare(server); c != nil {
			conn, err = d.exchangeTCP(ctx, c, h, early)
			if err == nil || !retryable(err) {
				d.count(func(st *DialerStats) { st.SpareDials++ })
				break
			}
			// The spare died (its Listener restarted, say): dial afresh.
			d.count(func(st *DialerStats) { st.DeadSpares++ })
		}
		d.count(func(st *DialerStats) { st.FreshDials++ })
		conn, err = d.dialTCP(ctx, server, h, early)
	default:
		conn, err = dialUDP(ctx, server, h)
	}
	if err != nil {
		return nil, fmt.Errorf("forward dial %s %s via %s: %w", proto, target, server, err)
	}
	return conn, nil
}

func (d *Dialer) count(f func(*DialerStats)) {
	d.mu.Lock()
	f(&d.stats)
	d.mu.Unlock()
}

// dialTCP connects to server, sends h (and early's bytes) and reads the status, all within ctx.
func (d *Dialer) dialTCP(ctx context.Context, server netip.AddrPort, h Header, early EarlyData) (net.Conn, error) {
	var nd net.Dialer
	c, err := nd.DialContext(ctx, "tcp", server.String())
	if err != nil {
		return nil, err
	}
	return d.exchangeTCP(ctx, c.(*net.TCPConn), h, early)
}

// retryable reports whether a Dial over a spare connection failed because of the connection, not
// because of the target: the flow may then be dialled again on a new connection. ErrBusy is: the
// server answers busy at accept, so a spare's status tells how full it was then, not now.
func retryable(err error) bool {
	return !errors.Is(err, ErrRefused) && !errors.Is(err, ErrDialFailed) && !errors.Is(err, ErrUnsupportedVersion) &&
		!errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded)
}

// exchangeTCP sends h on conn, and early's bytes behind it when early is not nil, and reads the
// status, within ctx; it closes conn on failure. On status 0 it consumes the early bytes it sent.
func (d *Dialer) exchangeTCP(ctx context.Context, conn *net.TCPConn, h Header, early EarlyData) (net.Conn, error) {
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	// Cancelling ctx interrupts the exchange below by moving the deadline into the past.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	var buf [HeaderLen6]byte
	var status Status
	var sent int
	var err error
	if early != nil {
		status, sent, err = exchangeEarly(ctx, conn, MarshalHeader(buf[:0], h), early)
	} else {
		status, err = exchange(conn, MarshalHeader(buf[:0], h))
	}
	if !stop() || err != nil {
		conn.Close()
		ctxErr := ctx.Err()
		if ctxErr == nil && errors.Is(err, os.ErrDeadlineExceeded) {
			// The socket deadline, which is ctx's, fired before ctx's own timer.
			ctxErr = context.DeadlineExceeded
		}
		if ctxErr != nil {
			return nil, fmt.Errorf("%w (%w)", ctxErr, err)
		}
		return nil, err
	}
	if err := status.err(); err != nil {
		conn.Close()
		return nil, err
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("clear deadline: %w", err)
	}
	if sent > 0 {
		if err := early.Consume(sent); err != nil {
			conn.Close()
			return nil, fmt.Errorf("consume the %d bytes sent early: %w", sent, err)
		}
		d.count(func(st *DialerStats) { st.EarlyDials++ })
	}
	return conn, nil
}

// exchange writes the header and reads the status.
func exchange(conn net.Conn, hdr []byte) (Status, error) {
	if _, err := conn.Write(hdr); err != nil {
		return 0, fmt.Errorf("send header: %w", err)
	}
	return readStatus(conn)
}

// dialUDP opens the flow's socket connected to server.
func dialUDP(ctx context.Context, server netip.AddrPort, h Header) (net.Conn, error) {
	var nd net.Dialer
	c, err := nd.DialContext(ctx, "udp", server.String())
	if err != nil {
		return nil, err
	}
	u := &udpClientConn{c: c.(*net.UDPConn)}
	u.buf = MarshalHeader(make([]byte, 0, HeaderLen6+1500), h)
	u.hdrLen = len(u.buf)
	return u, nil
}

// udpClientConn is the client side of a UDP flow: Write puts the header in front of each datagram.
// It has the methods of net.Conn and SyscallConn, which lets a reader wait for a reply before it
// takes a buffer (overlay/netstack does); a datagram written through the raw socket would lack the
// header and be dropped by the server.
type udpClientConn struct {
	c      *net.UDPConn
	hdrLen int

	mu  sync.Mutex // guards buf beyond hdrLen
	buf []byte     // header, then the payload being written
}

var _ net.Conn = (*udpClientConn)(nil)

// Write sends p as the payload of one datagram.
func (u *udpClientConn) Write(p []byte) (int, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.buf = append(u.buf[:u.hdrLen], p...)
	if _, err := u.c.Write(u.buf); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (u *udpClientConn) Read(p []byte) (int, error)            { return u.c.Read(p) }
func (u *udpClientConn) SyscallConn() (syscall.RawConn, error) { return u.c.SyscallConn() }
func (u *udpClientConn) Close() error                          { return u.c.Close() }
func (u *udpClientConn) LocalAddr() net.Addr                   { return u.c.LocalAddr() }
func (u *udpClientConn) RemoteAddr() net.Addr                  { return u.c.RemoteAddr() }
func (u *udpClientConn) SetDeadline(t time.Time) error         { return u.c.SetDeadline(t) }
func (u *udpClientConn) SetReadDeadline(t time.Time) error     { return u.c.SetReadDeadline(t) }
func (u *udpClientConn) SetWriteDeadline(t time.Time) error    { return u.c.SetWriteDeadline(t) }
