package forward

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/internal/flows"
)

// acceptTCP accepts TCP requests until the listener is closed.
func (l *Listener) acceptTCP(ln *net.TCPListener) {
	defer l.wg.Done()
	var backoff time.Duration
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || l.ctx.Err() != nil {
				return
			}
			// Out of file descriptors and the like: wait a little rather than spin.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.logf(slog.LevelWarn, "forward: tcp accept", "err", err, "retry_in", backoff)
			t := time.NewTimer(backoff)
			select {
			case <-l.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		backoff = 0
		peer := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr()
		if err := l.tcpTable.Acquire(peer); err != nil {
			l.refuseBusy(c, peer, err)
			continue
		}
		l.wg.Add(1)
		go l.serveTCP(c, peer)
	}
}

// refuseBusy answers a connection over a cap with status 5 (busy) and closes it, without reading
// anything: the status goes out at once into the empty send buffer, so the accept loop never waits.
func (l *Listener) refuseBusy(c *net.TCPConn, peer netip.Addr, err error) {
	if errors.Is(err, flows.ErrClientCap) {
		l.stats.tcpBusyPeer.Add(1)
	} else {
		l.stats.tcpBusyTotal.Add(1)
	}
	l.logf(slog.LevelWarn, "forward: tcp connection over the cap, answered busy", "peer", peer, "err", err,
		"per_peer", l.cfg.MaxTCPFlowsPerPeer, "total", l.cfg.MaxTCPFlows)
	c.SetWriteDeadline(time.Now().Add(busyWriteTimeout))
	c.Write([]byte{byte(StatusBusy)})
	c.Close()
}

// busyWriteTimeout bounds the write of a busy status (which does not block in practice).
const busyWriteTimeout = 100 * time.Millisecond

// serveTCP serves one TCP request, holding a slot of peer: header, checks, dial, status, copy.
func (l *Listener) serveTCP(c *net.TCPConn, peerAddr netip.Addr) {
	defer l.wg.Done()
	defer l.tcpTable.Release(peerAddr)
	if !l.track(c) {
		return
	}
	defer l.untrack(c)
	peer := c.RemoteAddr()

	c.SetReadDeadline(time.Now().Add(l.cfg.HeaderTimeout))
	h, st, err := readHeader(c)
	if err == nil && h.Proto != discovery.TCP {
		st, err = StatusBadRequest, fmt.Errorf("%w: protocol %s on the TCP port", ErrMalformed, h.Proto)
	}
	if errors.Is(err, io.EOF) {
		// Closed before the first byte: a spare connection the client did not need (Dialer.Spares).
		l.stats.unused.Add(1)
		return
	}
	if err != nil {
		l.stats.badHeader.Add(1)
		l.logf(slog.LevelWarn, "forward: bad tcp request", "peer", peer, "err", err)
		l.reply(c, st)
		return
	}
	c.SetReadDeadline(time.Time{})

	if !l.cfg.Allow(discovery.TCP, h.Target) {
		l.stats.refused.Add(1)
		l.logf(slog.LevelWarn, "forward: target not allowed", "proto", h.Proto, "peer", peer, "target", h.Target)
		l.reply(c, StatusNotAllowed)
		return
	}

	var d net.Dialer
	d.Timeout = l.cfg.DialTimeout
	tc, err := d.DialContext(l.ctx, "tcp", h.Target.String())
	if err != nil {
		l.stats.dialFailures.Add(1)
		l.logf(slog.LevelInfo, "forward: target dial failed", "proto", h.Proto, "peer", peer, "target", h.Target, "err", err)
		l.reply(c, StatusDialFailed)
		return
	}
	t := tc.(*net.TCPConn)
	if !l.track(t) {
		return
	}
	defer l.untrack(t)
	if !l.reply(c, StatusOK) {
		return
	}
	l.stats.tcpAccepted.Add(1)
	l.stats.activeTCP.Add(1)
	defer l.stats.activeTCP.Add(^uint64(0))
	l.copyBoth(c, t)
}

// readHeader reads exactly one header from r, first the magic and version (so another version is
// answered even if its header is shorter), then the rest. The status is the answer to an error.
func readHeader(r io.Reader) (Header, Status, error) {
	var buf [HeaderLen6]byte
	if _, err := io.ReadFull(r, buf[:3]); err != nil {
		return Header{}, StatusBadRequest, fmt.Errorf("%w: read: %w", ErrMalformed, err)
	}
	if err := checkVersion(buf[:3]); err != nil {
		if errors.Is(err, ErrUnsupportedVersion) {
			return Header{}, StatusUnsupportedVersion, err
		}
		return Header{}, StatusBadRequest, err
	}
	if _, err := io.ReadFull(r, buf[3:headerFixedLen]); err != nil {
		return Header{}, StatusBadRequest, fmt.Errorf("%w: read: %w", ErrMalformed, err)
	}
	n, err := checkFixed(buf[:headerFixedLen])
	if err != nil {
		return Header{}, StatusBadRequest, err
	}
	if _, err := io.ReadFull(r, buf[headerFixedLen:n]); err != nil {
		return Header{}, StatusBadRequest, fmt.Errorf("%w: read target address: %w", ErrMalformed, err)
	}
	h, _, err := ParseHeader(buf[:n])
	if err != nil {
		return Header{}, StatusBadRequest, err
	}
	return h, StatusOK, nil
}

// reply writes status st to c within HeaderTimeout; it reports whether it was sent.
func (l *Listener) reply(c *net.TCPConn, st Status) bool {
	c.SetWriteDeadline(time.Now().Add(l.cfg.HeaderTimeout))
	if _, err := c.Write([]byte{byte(st)}); err != nil {
		l.logf(slog.LevelDebug, "forward: send status", "peer", c.RemoteAddr(), "status", st, "err", err)
		return false
	}
	c.SetWriteDeadline(time.Time{})
	return true
}

// copyBoth copies both ways between the peer c and the target t until both directions end. EOF one
// way half-closes the other side (CloseWrite), so a peer that shuts down its sending side still gets
// the rest of the response; an error either way closes both.
func (l *Listener) copyBoth(c, t *net.TCPConn) {
	var wg sync.WaitGroup
	wg.Add(1)
	l.wg.Add(1) // the caller holds a count on l.wg, so Close has not begun waiting
	go func() {
		defer l.wg.Done()
		defer wg.Done()
		l.copyHalf(t, c, &l.stats.bytesIn)
	}()
	l.copyHalf(c, t, &l.stats.bytesOut)
	wg.Wait()
}

// copyHalf copies src to dst, counting bytes, then passes src's EOF on as dst's half-close; an error
// closes both. It waits for src to be readable before it takes a buffer, so an idle direction holds
// none; and it copies through user space, not with splice(2), whose pipes Go keeps for as long as a
// flow waits and caches after it (see overlay/internal/flows).
func (l *Listener) copyHalf(dst, src *net.TCPConn, bytes *atomic.Uint64) {
	err := flows.Copy(dst, src, flows.SocketWaiter(src), &l.bufs, bytes)
	if err == nil && dst.CloseWrite() == nil {
		return
	}
	src.Close()
	dst.Close()
}
