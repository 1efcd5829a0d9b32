package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	libp2ptls "github.com/libp2p/go-libp2p/p2p/security/tls"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"
)

// ProtocolID is the libp2p protocol of a tunnel stream.
const ProtocolID protocol.ID = "/edgemeshref/tunnel/1.0.0"

const (
	headerVersion = 1
	// headerTimeout bounds how long the server waits for a stream's header, and the client for the
	// server's status beyond dialTimeout.
	headerTimeout = 5 * time.Second
	// dialTimeout bounds the server's dial of the target.
	dialTimeout = 5 * time.Second
)

// status is the server's one-byte answer to a header.
type status byte

const (
	statusOK         status = 0
	statusBadHeader  status = 1
	statusDialFailed status = 2
)

func (s status) String() string {
	switch s {
	case statusOK:
		return "connected"
	case statusBadHeader:
		return "bad header"
	case statusDialFailed:
		return "dial failed"
	}
	return fmt.Sprintf("status %d", byte(s))
}

// newHost returns a libp2p host with EdgeMesh's data path and nothing else: the TCP transport, TLS
// (the first security protocol of EdgeMesh's libp2p.DefaultSecurity, so the one two EdgeMesh
// agents negotiate) and yamux with go-libp2p's default settings (16 MiB stream window). No QUIC,
// no relay, no NAT service, no hole punching, no metrics; the resource manager's limits are
// infinite so that they never cap the benchmark. With no listen addresses the host only dials.
func newHost(priv crypto.PrivKey, listen ...ma.Multiaddr) (host.Host, error) {
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(rcmgr.InfiniteLimits))
	if err != nil {
		return nil, fmt.Errorf("resource manager: %w", err)
	}
	opts := []libp2p.Option{
		libp2p.Identity(priv),
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.Security(libp2ptls.ID, libp2ptls.New),
		libp2p.Muxer(yamux.ID, yamux.DefaultTransport),
		libp2p.ResourceManager(rm),
		libp2p.DisableRelay(),
		libp2p.DisableMetrics(),
		libp2p.Ping(false),
		libp2p.UserAgent("edgemeshref"),
	}
	if len(listen) == 0 {
		opts = append(opts, libp2p.NoListenAddrs)
	} else {
		opts = append(opts, libp2p.ListenAddrs(listen...))
	}
	h, err := libp2p.New(opts...)
	if err != nil {
		rm.Close()
		return nil, fmt.Errorf("libp2p host: %w", err)
	}
	return h, nil
}

// tcpMultiaddr is the libp2p TCP address of ap.
func tcpMultiaddr(ap netip.AddrPort) (ma.Multiaddr, error) {
	family := "ip4"
	if ap.Addr().Unmap().Is6() {
		family = "ip6"
	}
	return ma.NewMultiaddr(fmt.Sprintf("/%s/%s/tcp/%d", family, ap.Addr().Unmap(), ap.Port()))
}

// appendHeader appends the header naming target to b.
func appendHeader(b []byte, target netip.AddrPort) []byte {
	s := target.String()
	return append(append(b, headerVersion, byte(len(s))), s...)
}

// readHeader reads a header from r and returns its target.
func readHeader(r io.Reader) (netip.AddrPort, error) {
	var h [2]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return netip.AddrPort{}, fmt.Errorf("read header: %w", err)
	}
	if h[0] != headerVersion {
		return netip.AddrPort{}, fmt.Errorf("header version %d, want %d", h[0], headerVersion)
	}
	if h[1] == 0 {
		return netip.AddrPort{}, errors.New("header names no target")
	}
	b := make([]byte, h[1])
	if _, err := io.ReadFull(r, b); err != nil {
		return netip.AddrPort{}, fmt.Errorf("read header target: %w", err)
	}
	ap, err := netip.ParseAddrPort(string(b))
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("header target: %w", err)
	}
	return ap, nil
}

// server is the remote end: it dials the target each stream names.
type server struct {
	log *slog.Logger
}

// handle serves one tunnel stream; libp2p calls it in a goroutine of its own.
func (s *server) handle(st network.Stream) {
	if err := st.SetReadDeadline(time.Now().Add(headerTimeout)); err != nil {
		st.Reset()
		return
	}
	target, err := readHeader(st)
	if err != nil {
		s.refuse(st, statusBadHeader, err)
		return
	}
	st.SetReadDeadline(time.Time{})
	c, err := net.DialTimeout("tcp", target.String(), dialTimeout)
	if err != nil {
		s.refuse(st, statusDialFailed, err)
		return
	}
	if _, err := st.Write([]byte{byte(statusOK)}); err != nil {
		c.Close()
		st.Reset()
		return
	}
	pipe(c.(*net.TCPConn), st)
}

// refuse answers st with code and closes it (gracefully, so that the status arrives).
func (s *server) refuse(st network.Stream, code status, err error) {
	s.log.Warn("tunnel refused", "peer", st.Conn().RemotePeer(), "status", code, "err", err)
	st.SetWriteDeadline(time.Now().Add(headerTimeout))
	if _, werr := st.Write([]byte{byte(code)}); werr != nil {
		st.Reset()
		return
	}
	st.Close()
}

// openTunnel opens a stream to p, names target and waits for the server's answer. The stream it
// returns is connected to target.
func openTunnel(ctx context.Context, h host.Host, p peer.ID, target netip.AddrPort) (network.Stream, error) {
	st, err := h.NewStream(ctx, p, ProtocolID)
	if err != nil {
		return nil, fmt.Errorf("new stream to %s: %w", p, err)
	}
	if _, err := st.Write(appendHeader(nil, target)); err != nil {
		st.Reset()
		return nil, fmt.Errorf("tunnel to %s: write header: %w", target, err)
	}
	st.SetReadDeadline(time.Now().Add(dialTimeout + headerTimeout))
	var b [1]byte
	if _, err := io.ReadFull(st, b[:]); err != nil {
		st.Reset()
		return nil, fmt.Errorf("tunnel to %s: read status: %w", target, err)
	}
	if code := status(b[0]); code != statusOK {
		st.Reset()
		return nil, fmt.Errorf("tunnel to %s: server refused: %s", target, code)
	}
	st.SetReadDeadline(time.Time{})
	return st, nil
}

// client is the local end: every TCP connection a listener accepts becomes one stream to peer.
type client struct {
	log  *slog.Logger
	host host.Host
	peer peer.ID

	wg sync.WaitGroup // counts the connections being tunnelled
}

// serve tunnels every connection ln accepts to target until ln is closed.
func (c *client) serve(ctx context.Context, ln net.Listener, target netip.AddrPort) error {
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
		}
		c.wg.Go(func() {
			tc := conn.(*net.TCPConn)
			st, err := openTunnel(ctx, c.host, c.peer, target)
			if err != nil {
				c.log.Warn("tunnel failed", "from", conn.RemoteAddr(), "err", err)
				tc.Close()
				return
			}
			pipe(tc, st)
		})
	}
}

// pipe copies between c and st both ways until both directions have ended, then closes both. The
// end of one direction is passed on as a half-close (CloseWrite); an error in either direction
// aborts both (the stream is reset, the connection closed).
func pipe(c *net.TCPConn, st network.Stream) {
	var abortOnce sync.Once
	abort := func() {
		abortOnce.Do(func() {
			st.Reset()
			c.Close()
		})
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		if _, err := io.Copy(st, c); err != nil {
			abort()
			return
		}
		st.CloseWrite()
	})
	wg.Go(func() {
		if _, err := io.Copy(c, st); err != nil {
			abort()
			return
		}
		c.CloseWrite()
	})
	wg.Wait()
	st.Close()
	c.Close()
}
