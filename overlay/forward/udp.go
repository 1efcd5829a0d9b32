package forward

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/internal/flows"
)

// maxDatagram is the largest UDP payload; buffers hold a whole datagram so none is truncated.
const maxDatagram = 1<<16 - 1

// udpKey identifies a UDP flow on the server.
type udpKey struct {
	client netip.AddrPort // the peer agent's socket
	target netip.AddrPort
}

// udpFlow is one UDP flow: a socket connected to the target, and a goroutine relaying its replies.
type udpFlow struct {
	key        udpKey
	conn       *net.UDPConn
	lastActive atomic.Int64 // UnixNano of the last datagram either way
}

// LastActive implements flows.Flow.
func (f *udpFlow) LastActive() int64 { return f.lastActive.Load() }

// readUDP reads request datagrams until the listener is closed.
func (l *Listener) readUDP(pc *net.UDPConn) {
	defer l.wg.Done()
	buf := make([]byte, maxDatagram)
	for {
		n, client, err := pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || l.ctx.Err() != nil {
				return
			}
			l.logf(slog.LevelWarn, "forward: udp read", "err", err)
			continue
		}
		l.handleDatagram(pc, client, buf[:n])
	}
}

// handleDatagram forwards one request datagram from client to the target its header names,
// opening the flow if needed.
func (l *Listener) handleDatagram(pc *net.UDPConn, client netip.AddrPort, b []byte) {
	h, hn, err := ParseHeader(b)
	if err == nil && h.Proto != discovery.UDP {
		err = fmt.Errorf("%w: protocol %s on the UDP port", ErrMalformed, h.Proto)
	}
	if err != nil {
		l.stats.badHeader.Add(1)
		l.logf(slog.LevelWarn, "forward: bad udp datagram", "peer", client, "err", err)
		return
	}
	key := udpKey{client: client, target: h.Target}
	f := l.activeFlow(key)
	if f == nil {
		if f = l.openFlow(pc, key); f == nil {
			return
		}
	}
	payload := b[hn:]
	if _, err := f.conn.Write(payload); err != nil {
		l.stats.udpDropped.Add(1)
		l.logf(slog.LevelDebug, "forward: udp send to target", "peer", client, "target", h.Target, "err", err)
		return
	}
	l.stats.bytesIn.Add(uint64(len(payload)))
}

// activeFlow returns the open flow of key, marked active now, or nil. Marking it under mu keeps
// the flow's goroutine from reaping it as idle before the datagram is sent.
func (l *Listener) activeFlow(key udpKey) *udpFlow {
	l.mu.Lock()
	defer l.mu.Unlock()
	f := l.udpFlows[key]
	if f != nil {
		f.lastActive.Store(time.Now().UnixNano())
	}
	return f
}

// openFlow checks and opens the flow of key and starts its goroutine; nil means the datagram is
// dropped (and counted). Only readUDP calls it, so no other flow of key can appear meanwhile.
func (l *Listener) openFlow(pc *net.UDPConn, key udpKey) *udpFlow {
	if !l.cfg.Allow(discovery.UDP, key.target) {
		l.stats.refused.Add(1)
		l.logf(slog.LevelWarn, "forward: target not allowed", "proto", discovery.UDP, "peer", key.client, "target", key.target)
		return nil
	}
	peer := key.client.Addr()
	if !l.acquireUDP(peer, key) {
		return nil
	}
	conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(key.target))
	if err != nil {
		l.udpTable.Release(peer)
		l.stats.dialFailures.Add(1)
		l.logf(slog.LevelInfo, "forward: target dial failed", "proto", discovery.UDP, "peer", key.client, "target", key.target, "err", err)
		return nil
	}
	f := &udpFlow{key: key, conn: conn}
	f.lastActive.Store(time.Now().UnixNano())
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		l.udpTable.Release(peer)
		conn.Close()
		return nil
	}
	l.udpTable.Attach(peer, f)
	l.udpFlows[key] = f
	l.wg.Add(1)
	l.mu.Unlock()
	l.stats.udpAccepted.Add(1)
	l.stats.activeUDP.Add(1)
	go l.relayReplies(pc, f)
	return f
}

// acquireUDP takes a flow slot of peer for a new flow of key. At the peer's cap it evicts the peer's
// least recently active flow if that one is idle for UDPEvictIdle; it reports false, having counted
// the dropped datagram, when no slot could be had.
func (l *Listener) acquireUDP(peer netip.Addr, key udpKey) bool {
	err := l.udpTable.Acquire(peer)
	if errors.Is(err, flows.ErrClientCap) {
		if victim, ok := l.udpTable.Evict(peer, time.Now().UnixNano(), l.cfg.UDPEvictIdle); ok {
			l.mu.Lock()
			l.deleteFlowLocked(victim)
			l.mu.Unlock()
			victim.conn.Close() // its goroutine ends and counts it out of ActiveUDP
			l.stats.udpEvicted.Add(1)
			err = l.udpTable.Acquire(peer)
		}
	}
	switch {
	case err == nil:
		return true
	case errors.Is(err, flows.ErrClientCap):
		l.stats.udpCapPeer.Add(1)
	default:
		l.stats.udpCapTotal.Add(1)
	}
	l.logf(slog.LevelWarn, "forward: udp flow over the cap, datagram dropped", "peer", key.client, "target", key.target,
		"err", err, "per_peer", l.cfg.MaxUDPFlowsPerPeer, "total", l.cfg.MaxUDPFlows)
	return false
}

// relayReplies sends the target's datagrams back to the client until the flow is idle for
// UDPIdleTimeout in both directions, its socket fails, or the listener is closed.
func (l *Listener) relayReplies(pc *net.UDPConn, f *udpFlow) {
	defer l.wg.Done()
	defer l.stats.activeUDP.Add(^uint64(0))
	defer l.removeFlow(f)
	rc, err := f.conn.SyscallConn()
	if err != nil {
		return
	}
	idle := l.cfg.UDPIdleTimeout
	f.conn.SetReadDeadline(time.Unix(0, f.lastActive.Load()).Add(idle))
	for {
		err := waitDatagram(rc)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			if l.reapIfIdle(f) {
				return
			}
			f.conn.SetReadDeadline(time.Unix(0, f.lastActive.Load()).Add(idle))
			continue
		}
		if err != nil && !isTransient(err) {
			return
		}
		if err != nil {
			continue // an ICMP error from the target, already consumed
		}
		bp := l.bufs.Get()
		n, err := f.conn.Read(*bp)
		if err == nil {
			f.lastActive.Store(time.Now().UnixNano())
			if _, werr := pc.WriteToUDPAddrPort((*bp)[:n], f.key.client); werr != nil {
				l.stats.udpDropped.Add(1)
				l.logf(slog.LevelDebug, "forward: udp reply to peer", "peer", f.key.client, "target", f.key.target, "err", werr)
			} else {
				l.stats.bytesOut.Add(uint64(n))
			}
		}
		l.bufs.Put(bp)
		if err != nil && !isTransient(err) && !errors.Is(err, os.ErrDeadlineExceeded) {
			return
		}
	}
}

// waitDatagram blocks until a datagram (or a pending socket error) is waiting on rc's socket,
// honouring its read deadline, without reading the datagram. A pending error is returned, and so
// consumed.
func waitDatagram(rc syscall.RawConn) error {
	var serr error
	err := rc.Read(func(fd uintptr) bool {
		var b [1]byte
		_, _, serr = unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		return serr != unix.EAGAIN
	})
	if err != nil {
		return err
	}
	return serr
}

// isTransient reports whether err is an ICMP-induced error on a connected UDP socket (the target's
// port or host is unreachable right now), which leaves the flow usable.
func isTransient(err error) bool {
	return errors.Is(err, unix.ECONNREFUSED) || errors.Is(err, unix.EHOSTUNREACH) ||
		errors.Is(err, unix.ENETUNREACH) || errors.Is(err, unix.EMSGSIZE)
}

// reapIfIdle removes f if it has been idle for UDPIdleTimeout; it reports whether it did.
func (l *Listener) reapIfIdle(f *udpFlow) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if time.Since(time.Unix(0, f.lastActive.Load())) < l.cfg.UDPIdleTimeout {
		return false
	}
	l.deleteFlowLocked(f)
	return true
}

// removeFlow removes f from the flow table, gives back its slot (unless it was evicted, which did)
// and closes its socket.
func (l *Listener) removeFlow(f *udpFlow) {
	l.mu.Lock()
	l.deleteFlowLocked(f)
	l.mu.Unlock()
	l.udpTable.Detach(f.key.client.Addr(), f)
	f.conn.Close()
}

func (l *Listener) deleteFlowLocked(f *udpFlow) {
	if l.udpFlows[f.key] == f {
		delete(l.udpFlows, f.key)
	}
}
