package relay

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"time"
)

// readUDP serves the relay's UDP socket: BIND and DATA frames (see wire.go), a read batch at a time
// (udpio.go). It is the only goroutine that reads the socket, so the per-node DATA buckets need no
// lock. Frames are handled in the order they arrived and the DATA frames of a batch leave in that
// order, so relaying does not reorder a node's datagrams.
func (s *Server) readUDP() {
	r := newUDPReader(s.udpPC)
	w := newUDPWriter(s.udpPC, s.udpGSO)
	var lastLog time.Time
	for {
		n, err := r.read()
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
		c := udpBatch{now: s.now(), w: w}
		for i := range n {
			if b, seg, src, ok := r.message(i); ok {
				s.handleMessage(&c, b, seg, src)
			}
		}
		if c.dataIn > 0 {
			s.metrics.udpIn[FrameData].Add(c.dataIn)
		}
		out := w.flush()
		s.metrics.udpOut[FrameData].Add(out.frames)
		s.metrics.bytesRelayed.Add(out.payload)
		if out.failed > 0 {
			s.metrics.udpDropped[dropWriteError].Add(out.failed)
		}
		if out.gsoOff {
			s.log.Warn("udp: the kernel cannot segment (UDP GSO) on this route's device; sending datagrams one by one",
				"err", out.err)
		}
	}
}

// udpBatch is the state of one read batch: its clock, its counters and the route of the DATA
// frames of the message being handled, looked up once per message rather than per frame.
type udpBatch struct {
	now    int64 // s.now() when the batch was read: the DATA buckets' clock
	w      *udpWriter
	dataIn uint64

	route dataRoute
}

// dataRoute caches the lookups of handleData for one message: its frames share a source, and
// most often a destination.
type dataRoute struct {
	valid  bool // from is the node bound to the message's source
	from   *udpNode
	dstID  uint32
	to     *udpNode // nil: not looked up, or no such node
	toAddr netip.AddrPort
	toUA   *net.UDPAddr
}

// handleMessage handles the datagrams of one received message: b holds one datagram, or (UDP
// GRO) several of seg bytes each, the last possibly shorter, all from src. Forwarded DATA frames
// are rewritten in place and queued on the batch's writer.
func (s *Server) handleMessage(c *udpBatch, b []byte, seg int, src netip.AddrPort) {
	c.route = dataRoute{}
	if len(b) == 0 {
		s.metrics.in(0)
		s.metrics.drop(dropMalformed)
		return
	}
	for off := 0; off < len(b); off += seg {
		// The frame's capacity runs to the end of its read buffer, as udpWriter.add needs.
		frame := b[off:min(off+seg, len(b))]
		typ, ok := IsFrame(frame)
		switch {
		case !ok:
			s.metrics.in(0)
			s.metrics.drop(dropMalformed)
		case typ == FrameData:
			c.dataIn++
			s.handleData(c, frame, src)
		case typ == FrameBind:
			s.metrics.in(typ)
			s.handleBind(frame, src)
			c.route = dataRoute{} // the bindings may have changed
		default:
			s.metrics.in(typ)
			s.metrics.drop(dropUnknownType)
		}
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
			other.addr, other.ua = netip.AddrPort{}, nil
		}
		s.byAddr[src] = n
		n.addr, n.ua = src, net.UDPAddrFromAddrPort(src)
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

// handleData forwards a DATA frame from the node bound to src to the node it names: it rewrites
// the ID to the sender's and queues the frame on the batch's writer.
func (s *Server) handleData(c *udpBatch, b []byte, src netip.AddrPort) {
	dst, _, err := ParseData(b)
	if err != nil {
		s.metrics.drop(dropMalformed)
		return
	}
	rt := &c.route
	if !rt.valid || rt.to == nil || rt.dstID != dst {
		s.udpMu.RLock()
		if !rt.valid {
			rt.from, rt.valid = s.byAddr[src], true
		}
		rt.dstID, rt.to = dst, s.byID[dst]
		if rt.to != nil {
			rt.toAddr, rt.toUA = rt.to.addr, rt.to.ua
		}
		s.udpMu.RUnlock()
	}
	switch {
	case rt.from == nil:
		s.metrics.drop(dropUnbound)
		return
	case rt.to == nil || rt.to == rt.from:
		s.metrics.drop(dropNoDest)
		return
	case !rt.toAddr.IsValid():
		s.metrics.drop(dropDestUnbound)
		return
	case !rt.from.data.take(float64(len(b)), c.now):
		s.metrics.drop(dropRateLimited)
		return
	}
	binary.BigEndian.PutUint32(b[HeaderLen:DataHeaderLen], rt.from.id)
	c.w.add(b, rt.toAddr, rt.toUA)
}
