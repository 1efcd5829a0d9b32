package relay

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"time"
)

// readUDP serves the relay's UDP socket: BIND and DATA frames (see wire.go). It is the only
// goroutine that reads the socket, so the per-node DATA buckets need no lock.
func (s *Server) readUDP() {
	buf := make([]byte, 1<<16)
	var lastLog time.Time
	for {
		n, src, err := s.udp.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if time.Since(lastLog) > time.Second {
				lastLog = time.Now()
				s.log.Warn("udp read", "err", err)
			}
			continue
		}
		s.handleUDP(buf[:n], netip.AddrPortFrom(src.Addr().Unmap(), src.Port()))
	}
}

// handleUDP handles one datagram from src. b may be modified (DATA is forwarded in place).
func (s *Server) handleUDP(b []byte, src netip.AddrPort) {
	typ, ok := IsFrame(b)
	if !ok {
		s.metrics.in(0)
		s.metrics.drop(dropMalformed)
		return
	}
	s.metrics.in(typ)
	switch typ {
	case FrameBind:
		s.handleBind(b, src)
	case FrameData:
		s.handleData(b, src)
	default:
		s.metrics.drop(dropUnknownType)
	}
}

// handleBind records src as the reflexive address of the node whose session key MACs the frame.
func (s *Server) handleBind(b []byte, src netip.AddrPort) {
	id, nonce, err := ParseBind(b)
	if err != nil {
		s.metrics.drop(dropMalformed)
		return
	}
	s.udpMu.Lock()
	n := s.byID[id]
	if n == nil {
		s.udpMu.Unlock()
		s.metrics.drop(dropUnknownNode)
		return
	}
	if !VerifyBind(b, n.key) {
		s.udpMu.Unlock()
		s.metrics.drop(dropBadMAC)
		return
	}
	changed := n.addr != src
	if changed {
		if s.byAddr[n.addr] == n {
			delete(s.byAddr, n.addr)
		}
		// Another node bound to this address has moved away (NAT reused the mapping).
		if other := s.byAddr[src]; other != nil {
			other.addr = netip.AddrPort{}
		}
		s.byAddr[src] = n
		n.addr = src
	}
	s.udpMu.Unlock()
	if changed {
		s.markDirty()
	}
	ack := AppendBindAck(make([]byte, 0, 40), nonce, src)
	if _, err := s.udp.WriteToUDPAddrPort(ack, src); err != nil {
		s.metrics.drop(dropWriteError)
		return
	}
	s.metrics.udpOut[FrameBindAck].Add(1)
}

// handleData forwards a DATA frame from the node bound to src to the node it names, rewriting the
// ID to the sender's.
func (s *Server) handleData(b []byte, src netip.AddrPort) {
	dst, payload, err := ParseData(b)
	if err != nil {
		s.metrics.drop(dropMalformed)
		return
	}
	s.udpMu.RLock()
	from := s.byAddr[src]
	to := s.byID[dst]
	var toAddr netip.AddrPort
	if to != nil {
		toAddr = to.addr
	}
	s.udpMu.RUnlock()
	switch {
	case from == nil:
		s.metrics.drop(dropUnbound)
		return
	case to == nil || to == from:
		s.metrics.drop(dropNoDest)
		return
	case !toAddr.IsValid():
		s.metrics.drop(dropDestUnbound)
		return
	case !from.data.take(float64(len(b)), s.now()):
		s.metrics.drop(dropRateLimited)
		return
	}
	binary.BigEndian.PutUint32(b[HeaderLen:DataHeaderLen], from.id)
	if _, err := s.udp.WriteToUDPAddrPort(b, toAddr); err != nil {
		s.metrics.drop(dropWriteError)
		return
	}
	s.metrics.udpOut[FrameData].Add(1)
	s.metrics.bytesRelayed.Add(uint64(len(payload)))
}
