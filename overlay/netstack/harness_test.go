package netstack

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/tun"
	wgnetstack "golang.zx2c4.com/wireguard/tun/netstack"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"

	"github.com/edgewire/edgewire/discovery"
)

var (
	clientV4  = netip.MustParseAddr("10.0.0.1")
	clientV6  = netip.MustParseAddr("fd00::1")
	serviceV4 = netip.MustParseAddr("9.251.0.10")
	serviceV6 = netip.MustParseAddr("fd00:9251::10")
	dnsIP     = netip.MustParseAddr("169.254.96.16")
)

// harness is a Stack connected back to back, through its tun.Device Read and Write, to a client stack
// (wireguard-go's tun/netstack), with one pump goroutine each way.
type harness struct {
	stack  *Stack
	client *wgnetstack.Net
	dialer *fakeDialer
}

// connect opens a TCP connection from the client to dst within 5 s, failing t otherwise; it is closed
// when the test ends.
func (h *harness) connect(t *testing.T, dst netip.AddrPort) *gonet.TCPConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := h.client.DialContextTCPAddrPort(ctx, dst)
	if err != nil {
		t.Fatalf("dial %v: %v", dst, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func newHarness(tb testing.TB, cfg Config, dialer *fakeDialer) *harness {
	tb.Helper()
	if cfg.Dialer == nil {
		cfg.Dialer = dialer
	}
	if cfg.Prefixes == nil {
		cfg.Prefixes = []netip.Prefix{netip.MustParsePrefix("9.251.0.0/16"), netip.MustParsePrefix("fd00:9251::/64")}
	}
	if cfg.LocalAddrs == nil {
		cfg.LocalAddrs = []netip.Addr{dnsIP}
	}
	s, err := New(cfg)
	if err != nil {
		tb.Fatalf("New: %v", err)
	}
	if err := s.Start(); err != nil {
		tb.Fatalf("Start: %v", err)
	}
	cdev, cnet, err := wgnetstack.CreateNetTUN([]netip.Addr{clientV4, clientV6}, nil, 1420)
	if err != nil {
		tb.Fatalf("CreateNetTUN: %v", err)
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // service stack → client
		defer wg.Done()
		pump(s, cdev)
	}()
	go func() { // client → service stack
		defer wg.Done()
		pump(cdev, s)
	}()
	tb.Cleanup(func() {
		s.Close()
		cdev.Close()
		wg.Wait()
	})
	return &harness{stack: s, client: cnet, dialer: dialer}
}

// pump copies packets from src to dst until src is closed. Write errors (dst closed) are ignored: the
// pump keeps draining src so that src's stack never blocks.
func pump(src, dst tun.Device) {
	batch := src.BatchSize()
	bufs := make([][]byte, batch)
	for i := range bufs {
		bufs[i] = make([]byte, 65535)
	}
	sizes := make([]int, batch)
	out := make([][]byte, 0, batch)
	for {
		n, err := src.Read(bufs, sizes, 0)
		if err != nil {
			return
		}
		out = out[:0]
		for i := range n {
			out = append(out, bufs[i][:sizes[i]])
		}
		dst.Write(out, 0)
	}
}

// dialCall records one DialFlow call.
type dialCall struct {
	proto    discovery.Protocol
	src, dst netip.AddrPort
}

// fakeDialer implements Dialer by dialing a loopback address per protocol, or failing with err.
type fakeDialer struct {
	tcpTarget, udpTarget string
	err                  error

	mu     sync.Mutex // guards calls and conns
	calls  []dialCall
	conns  []*trackedConn
	closed atomic.Int64 // upstream connections closed
}

func (d *fakeDialer) DialFlow(ctx context.Context, proto discovery.Protocol, src, dst netip.AddrPort) (net.Conn, error) {
	d.mu.Lock()
	d.calls = append(d.calls, dialCall{proto, src, dst})
	d.mu.Unlock()
	if d.err != nil {
		return nil, d.err
	}
	var nd net.Dialer
	network, target := "tcp", d.tcpTarget
	if proto == discovery.UDP {
		network, target = "udp", d.udpTarget
	}
	c, err := nd.DialContext(ctx, network, target)
	if err != nil {
		return nil, err
	}
	tc := &trackedConn{Conn: c, d: d}
	d.mu.Lock()
	d.conns = append(d.conns, tc)
	d.mu.Unlock()
	return tc, nil
}

func (d *fakeDialer) Calls() []dialCall {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]dialCall(nil), d.calls...)
}

// trackedConn counts Close calls and keeps CloseWrite reachable.
type trackedConn struct {
	net.Conn
	d    *fakeDialer
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() { c.d.closed.Add(1) })
	return c.Conn.Close()
}

func (c *trackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("no CloseWrite")
}

// tcpServer is a loopback TCP server running handle per connection; Close waits for the handlers.
type tcpServer struct {
	ln net.Listener
	wg sync.WaitGroup
}

func newTCPServer(tb testing.TB, handle func(*net.TCPConn)) *tcpServer {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("listen: %v", err)
	}
	srv := &tcpServer{ln: ln}
	srv.wg.Add(1)
	go func() {
		defer srv.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			srv.wg.Add(1)
			go func() {
				defer srv.wg.Done()
				defer c.Close()
				handle(c.(*net.TCPConn))
			}()
		}
	}()
	tb.Cleanup(func() {
		ln.Close()
		srv.wg.Wait()
	})
	return srv
}

func (s *tcpServer) Addr() string { return s.ln.Addr().String() }

// echoTCP echoes until EOF, then half-closes.
func echoTCP(c *net.TCPConn) {
	io.Copy(c, c)
	c.CloseWrite()
}

// newUDPEcho starts a loopback UDP server echoing every datagram to its sender.
func newUDPEcho(tb testing.TB) string {
	tb.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("listen udp: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65535)
		for {
			n, addr, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], addr)
		}
	}()
	tb.Cleanup(func() {
		pc.Close()
		<-done
	})
	return pc.LocalAddr().String()
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(tb testing.TB, what string, timeout time.Duration, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
