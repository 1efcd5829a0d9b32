package relay

import (
	"net"
	"net/netip"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// Batched I/O on the relay's UDP socket, the way wireguard-go's conn.StdNetBind does it: recvmmsg
// and sendmmsg (golang.org/x/net's ReadBatch and WriteBatch; one datagram per call elsewhere than
// on Linux) and, where the kernel has them, UDP GRO on receive and UDP GSO on send (offload_*.go).
// A read batch is handled whole (udp.go), the DATA frames it forwards are collected in a udpWriter,
// and sent together before the next read. With GRO a node's burst arrives as one buffer of
// equal-sized frames; the relay rewrites each frame's ID in place and sends the run on as one GSO
// buffer, so a relayed burst crosses the relay's stack twice, not twice per datagram.

const (
	// udpReadBatch is how many messages (datagrams, or GRO buffers of up to 64 KiB) one recvmmsg
	// may return.
	udpReadBatch = 64
	// udpBufSize is the size of each read buffer: the largest UDP datagram, or GRO buffer.
	udpBufSize = 1 << 16
	// maxGSOBytes is the most a GSO send may carry: the largest UDP payload over IPv4.
	maxGSOBytes = 1<<16 - 1 - 20 - 8
)

// batchConn is what the relay needs of an ipv4.PacketConn or ipv6.PacketConn (their Message
// types are the same type).
type batchConn interface {
	ReadBatch(ms []ipv4.Message, flags int) (int, error)
	WriteBatch(ms []ipv4.Message, flags int) (int, error)
}

// newBatchConn wraps conn for its address family.
func newBatchConn(conn *net.UDPConn) batchConn {
	if a, ok := conn.LocalAddr().(*net.UDPAddr); ok && a.IP.To4() != nil {
		return ipv4.NewPacketConn(conn)
	}
	return ipv6.NewPacketConn(conn)
}

// udpReader owns the read batch: the messages and their buffers, reused for every batch.
type udpReader struct {
	pc   batchConn
	msgs []ipv4.Message
}

func newUDPReader(pc batchConn) *udpReader {
	r := &udpReader{pc: pc, msgs: make([]ipv4.Message, udpReadBatch)}
	bufs := make([]byte, udpReadBatch*udpBufSize)
	oobs := make([]byte, udpReadBatch*offloadOOBSize)
	for i := range r.msgs {
		r.msgs[i].Buffers = [][]byte{bufs[i*udpBufSize : (i+1)*udpBufSize : (i+1)*udpBufSize]}
		r.msgs[i].OOB = oobs[i*offloadOOBSize : (i+1)*offloadOOBSize : (i+1)*offloadOOBSize]
	}
	return r
}

// read blocks until at least one datagram arrives and returns how many messages it filled.
func (r *udpReader) read() (int, error) {
	for i := range r.msgs {
		r.msgs[i].OOB = r.msgs[i].OOB[:cap(r.msgs[i].OOB)]
	}
	return r.pc.ReadBatch(r.msgs, 0)
}

// message returns received message i: its bytes, the size of each datagram in them (the GRO
// segment size; len(b) for a single datagram) and its source.
func (r *udpReader) message(i int) (b []byte, seg int, src netip.AddrPort, ok bool) {
	m := &r.msgs[i]
	ua, isUDP := m.Addr.(*net.UDPAddr)
	if !isUDP || m.N <= 0 {
		return nil, 0, netip.AddrPort{}, false
	}
	ap := ua.AddrPort()
	b = m.Buffers[0][:m.N]
	if seg = groSize(m.OOB[:m.NN]); seg <= 0 || seg > m.N {
		seg = m.N
	}
	return b, seg, netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
}

// outMeta describes one message of a udpWriter's batch.
type outMeta struct {
	to     netip.AddrPort
	seg    int  // size of each datagram of the message (the last may be shorter)
	frames int  // datagrams in the message
	closed bool // a shorter datagram ended the message: nothing may be added
}

// udpWriter collects the datagrams the relay sends while it handles one read batch and sends
// them with sendmmsg. Consecutive datagrams of one size (the last may be shorter) to one address
// are coalesced into one message that the kernel cuts with UDP GSO.
//
// Coalescing appends a datagram to the last message's buffer, which is a read buffer: the
// datagram is then copied to the bytes just after the message, in the read buffer the message
// started in. The caller hands datagrams over in the order they were read, each a slice of its
// read buffer that extends to the buffer's end (its capacity), and the copy only ever overwrites
// bytes it has already handled: the rest of the message's own buffer after the message (read
// earlier, handled, and either part of this message — then it is a copy onto itself — or
// dropped, or consumed as a BIND), or a buffer's unused tail.
type udpWriter struct {
	pc   batchConn
	gso  bool // UDP GSO works: coalesce
	msgs []ipv4.Message
	meta []outMeta
	oobs [][]byte // a control buffer per message slot
}

func newUDPWriter(pc batchConn, gso bool) *udpWriter {
	return &udpWriter{pc: pc, gso: gso}
}

// add queues the DATA frame for to (ua is the same address as a *net.UDPAddr, which sendmmsg
// needs).
func (w *udpWriter) add(frame []byte, to netip.AddrPort, ua *net.UDPAddr) {
	if k := len(w.msgs) - 1; w.gso && k >= 0 {
		m, mt := &w.msgs[k], &w.meta[k]
		b := m.Buffers[0]
		if mt.to == to && !mt.closed && len(frame) <= mt.seg && mt.frames < maxGSOSegments &&
			len(b)+len(frame) <= maxGSOBytes && cap(b)-len(b) >= len(frame) {
			if &b[:len(b)+1][len(b)] == &frame[0] {
				m.Buffers[0] = b[:len(b)+len(frame)] // already in place (a GRO run): no copy
			} else {
				m.Buffers[0] = append(b, frame...)
			}
			mt.frames++
			mt.closed = len(frame) < mt.seg
			return
		}
	}
	k := len(w.msgs)
	if k == cap(w.msgs) {
		w.grow()
	}
	w.msgs = w.msgs[:k+1]
	w.meta = w.meta[:k+1]
	w.msgs[k].Buffers = append(w.msgs[k].Buffers[:0], frame)
	w.msgs[k].Addr = ua
	w.meta[k] = outMeta{to: to, seg: len(frame), frames: 1}
}

// grow doubles the message slots (once per size a batch ever reaches).
func (w *udpWriter) grow() {
	n := max(2*cap(w.msgs), udpReadBatch)
	msgs := make([]ipv4.Message, len(w.msgs), n)
	copy(msgs, w.msgs)
	for i := len(w.msgs); i < n; i++ {
		msgs[:n][i].Buffers = make([][]byte, 0, 1)
	}
	meta := make([]outMeta, len(w.meta), n)
	copy(meta, w.meta)
	oobs := make([][]byte, n)
	copy(oobs, w.oobs)
	for i := len(w.oobs); i < n; i++ {
		oobs[i] = make([]byte, 0, offloadOOBSize)
	}
	w.msgs, w.meta, w.oobs = msgs, meta, oobs
}

// sent is what a flush sent and failed to send, in DATA frames and their payload bytes.
type sent struct {
	frames, payload, failed uint64
	err                     error // the last send error
	gsoOff                  bool  // GSO failed for want of checksum offload and is now off
}

// flush sends the queued messages and empties the batch. A message that fails is dropped, the
// rest are still sent; a coalesced one that fails is retried as single datagrams (so a route
// whose MTU is smaller than the segments, or a device that cannot checksum them, loses nothing),
// and GSO is turned off for good when the kernel says the device cannot do it.
func (w *udpWriter) flush() sent {
	var r sent
	for k := range w.msgs {
		w.msgs[k].OOB = w.oobs[k][:0]
		if mt := &w.meta[k]; mt.frames > 1 {
			w.msgs[k].OOB = appendGSO(w.msgs[k].OOB, mt.seg)
		}
	}
	for start := 0; start < len(w.msgs); {
		n, err := w.pc.WriteBatch(w.msgs[start:], 0)
		if err != nil {
			n = 0 // x/net passes on sendmmsg's -1
		}
		for k := start; k < start+n; k++ {
			r.frames += uint64(w.meta[k].frames)
			r.payload += uint64(len(w.msgs[k].Buffers[0]) - w.meta[k].frames*DataHeaderLen)
		}
		start += n
		if err == nil || start >= len(w.msgs) {
			continue
		}
		// msgs[start] failed.
		r.err = err
		if w.meta[start].frames > 1 {
			if shouldDisableGSO(err) && w.gso {
				w.gso = false
				r.gsoOff = true
			}
			w.sendSingly(start, &r)
		} else {
			r.failed++
		}
		start++ // the rest go on
	}
	for k := range w.msgs {
		w.msgs[k].Buffers[0] = nil
		w.msgs[k].Addr = nil
	}
	w.msgs, w.meta = w.msgs[:0], w.meta[:0]
	return r
}

// sendSingly sends the datagrams of coalesced message k one by one.
func (w *udpWriter) sendSingly(k int, r *sent) {
	m, mt := &w.msgs[k], &w.meta[k]
	b := m.Buffers[0]
	single := []ipv4.Message{{Buffers: [][]byte{nil}, Addr: m.Addr}}
	for off := 0; off < len(b); off += mt.seg {
		single[0].Buffers[0] = b[off:min(off+mt.seg, len(b))]
		if _, err := w.pc.WriteBatch(single, 0); err != nil {
			r.failed++
			r.err = err
			continue
		}
		r.frames++
		r.payload += uint64(len(single[0].Buffers[0]) - DataHeaderLen)
	}
}
