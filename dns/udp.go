package dns

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	mdns "github.com/miekg/dns"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// Serving UDP. A fixed set of goroutines, whatever arrives:
//
//   - the read loop reads every datagram. It charges the datagram to its source (limit.go) and
//     drops it when the source is over its rate; it answers on the spot, and writes the reply
//     itself, everything that needs no upstream: the packed replies of the fast path
//     (fastpath.go), the other cluster answers and forwarding cache hits through the handler
//     (answerNow), a header-only FORMERR or NOTIMP to what does not parse or is not a query. It
//     hands the rest (forwarding cache misses, CNAMEs chased out of the zone) to the workers
//     through a queue of Config.QueueLen queries, dropping what does not fit: it never waits for a
//     worker.
//   - Config.Workers workers answer the queries of the queue through the handler; the forwarder
//     bounds their upstream exchanges (forward.go). A query that waited longer than maxQueueWait
//     is dropped: its client has retried or given up.
//   - one writer sends the workers' replies, from a queue of writeQueueLen replies; a reply that
//     does not fit is dropped.
//
// So at most one goroutine of the server reads the conn and two write it. In the agent the conn is
// an endpoint of the gVisor service netstack, whose link endpoint lock the output of every service
// flow takes too: a goroutine per query, thousands of them writing at once, stalled the whole node
// (issue 13). The loop writes its own replies rather than hand them to the writer: over loopback
// that answers 10% more queries per second and each 2 µs sooner (BenchmarkUDPThroughput,
// BenchmarkUDPRoundTrip), and the netstack's link endpoint drops what its queue cannot hold
// rather than make writers wait.
//
// Every drop is counted in Stats. A datagram shorter than a header, or one with the QR bit set (a
// response: answering it could start an endless exchange of errors with another server), gets
// no reply (Stats.Dropped).

const (
	// writeQueueLen bounds the replies waiting for the writer.
	writeQueueLen = 1024
	// maxQueueWait is how long a query may wait for a worker before it is dropped: about when a
	// stub resolver (5 s timeout) would have given up on an answer still needing an upstream.
	maxQueueWait = 2 * time.Second
	// keptBufSize is the largest reply buffer kept for reuse; larger ones go to the GC.
	keptBufSize = 4096
	// maxReadBackoff bounds the pause after read errors that repeat (a conn in a bad state).
	maxReadBackoff = 100 * time.Millisecond
)

// aLongTimeAgo is a deadline in the past: it unblocks reads and writes.
var aLongTimeAgo = time.Unix(1, 0)

// udpServer serves one packet conn. Its queues are bounded and every send to them is
// non-blocking.
type udpServer struct {
	s       *Server
	conn    packetConn     // read by the loop, written by the loop and the writer
	limiter *sourceLimiter // nil: no per-source limit; used by the loop alone
	work    chan slowQuery // the loop → the workers
	out     chan outReply  // the workers → the writer
	bufs    sync.Pool      // *[]byte reply buffers of the workers
	in, rep []byte         // the loop's read and reply buffers
	workers sync.WaitGroup
	closing atomic.Bool
	done    chan struct{} // closed by stop
	epoch   time.Time     // the limiter's clock counts from it
}

// slowQuery is a query for the workers.
type slowQuery struct {
	msg  *mdns.Msg
	from source
	at   time.Time // when the loop queued it, on the server's clock
}

// outReply is a reply for the writer; buf goes back to the pool once written.
type outReply struct {
	buf *[]byte
	to  source
}

// source is where a datagram came from, in the form its conn replies to.
type source struct {
	addr netip.AddrPort   // *net.UDPConn bound to one address
	na   net.Addr         // generic PacketConn (the agent's netstack socket)
	sess *mdns.SessionUDP // *net.UDPConn bound to a wildcard address
}

// packetConn is the conn a udpServer reads and writes. read returns the source's IP address too,
// unmapped, for the per-source limit.
type packetConn interface {
	read(b []byte) (n int, from source, ip netip.Addr, err error)
	write(b []byte, to source) error
	net.PacketConn
}

// newPacketConn wraps pc. A *net.UDPConn bound to a wildcard address must reply from the address
// each query came to: it reads and writes with the destination in control messages, as miekg.
func newPacketConn(pc net.PacketConn) (packetConn, error) {
	uc, ok := pc.(*net.UDPConn)
	if !ok {
		return genericConn{pc}, nil
	}
	if la, ok := uc.LocalAddr().(*net.UDPAddr); ok && !la.IP.IsUnspecified() {
		return udpConn{uc}, nil
	}
	err6 := ipv6.NewPacketConn(uc).SetControlMessage(ipv6.FlagDst|ipv6.FlagInterface, true)
	err4 := ipv4.NewPacketConn(uc).SetControlMessage(ipv4.FlagDst|ipv4.FlagInterface, true)
	if err4 != nil && err6 != nil {
		return nil, fmt.Errorf("ask for the destination of datagrams: %w", errors.Join(err4, err6))
	}
	return sessionConn{uc}, nil
}

type genericConn struct{ net.PacketConn }

func (c genericConn) read(b []byte) (int, source, netip.Addr, error) {
	n, addr, err := c.ReadFrom(b)
	if err != nil {
		return 0, source{}, netip.Addr{}, err
	}
	var ip netip.Addr
	switch a := addr.(type) {
	case *net.UDPAddr:
		ip, _ = netip.AddrFromSlice(a.IP)
	default:
		ap, _ := netip.ParseAddrPort(addr.String())
		ip = ap.Addr()
	}
	return n, source{na: addr}, ip.Unmap(), nil
}

func (c genericConn) write(b []byte, to source) error {
	_, err := c.WriteTo(b, to.na)
	return err
}

type udpConn struct{ *net.UDPConn }

func (c udpConn) read(b []byte) (int, source, netip.Addr, error) {
	n, ap, err := c.ReadFromUDPAddrPort(b)
	return n, source{addr: ap}, ap.Addr().Unmap(), err
}

func (c udpConn) write(b []byte, to source) error {
	_, err := c.WriteToUDPAddrPort(b, to.addr)
	return err
}

type sessionConn struct{ *net.UDPConn }

func (c sessionConn) read(b []byte) (int, source, netip.Addr, error) {
	n, sess, err := mdns.ReadFromSessionUDP(c.UDPConn, b)
	if err != nil {
		return 0, source{}, netip.Addr{}, err
	}
	return n, source{sess: sess}, sess.RemoteAddr().(*net.UDPAddr).AddrPort().Addr().Unmap(), nil
}

func (c sessionConn) write(b []byte, to source) error {
	_, err := mdns.WriteToSessionUDP(c.UDPConn, b, to.sess)
	return err
}

// newUDPServer prepares the serving of pc; start starts it.
func (s *Server) newUDPServer(pc net.PacketConn) (*udpServer, error) {
	conn, err := newPacketConn(pc)
	if err != nil {
		return nil, err
	}
	u := &udpServer{
		s:     s,
		conn:  conn,
		work:  make(chan slowQuery, s.limits.queueLen),
		out:   make(chan outReply, s.limits.writeQueueLen),
		done:  make(chan struct{}),
		epoch: s.now(),
		in:    make([]byte, ednsSize),
		rep:   make([]byte, 0, 512),
	}
	u.bufs.New = func() any { b := make([]byte, 0, 512); return &b }
	if s.limits.sourceRate > 0 {
		u.limiter = newSourceLimiter(s.limits.sourceRate, s.limits.sourceBurst, s.limits.maxSources)
	}
	return u, nil
}

// start runs the loop, the workers and the writer, counted in wg.
func (u *udpServer) start(wg *sync.WaitGroup) {
	wg.Add(2)
	go func() {
		defer wg.Done()
		u.writer()
	}()
	u.workers.Add(u.s.limits.workers)
	for range u.s.limits.workers {
		go u.worker()
	}
	go func() {
		defer wg.Done()
		u.loop()
		// The workers are the writer's only senders.
		close(u.work)
		u.workers.Wait()
		close(u.out)
	}()
}

// stop makes the loop return and closes the conn; the workers finish the queue (their upstream
// exchanges aborted by the server's context) and the writer what they leave.
func (u *udpServer) stop() error {
	u.closing.Store(true)
	close(u.done)
	u.conn.SetDeadline(aLongTimeAgo)
	if err := u.conn.Close(); err != nil {
		return fmt.Errorf("close udp %v: %w", u.conn.LocalAddr(), err)
	}
	return nil
}

// loop reads datagrams until stop.
func (u *udpServer) loop() {
	var backoff time.Duration
	for {
		n, from, ip, err := u.conn.read(u.in)
		if err != nil {
			if u.closing.Load() {
				return
			}
			// An error the socket reports for one datagram (ICMP, a deadline): the next read may
			// succeed. A conn that keeps failing is read more and more slowly.
			u.s.readErrors.Add(1)
			if u.s.readLog.allow(u.s.now()) {
				u.s.logger.Warn("dns read failed (rate-limited log)", "addr", u.conn.LocalAddr(), "err", err)
			}
			backoff = min(max(2*backoff, time.Millisecond), maxReadBackoff)
			select {
			case <-u.done:
				return
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		u.serve(u.in[:n], from, ip, u.s.now())
	}
}

// serve answers, queues or drops one datagram. pkt is only valid during the call.
func (u *udpServer) serve(pkt []byte, from source, ip netip.Addr, now time.Time) {
	s := u.s
	var b *bucket
	if u.limiter != nil {
		var tracked bool
		b, tracked = u.limiter.bucket(ip, int64(now.Sub(u.epoch))) // monotonic
		if !tracked {
			s.untracked.Add(1)
		}
		if !b.take(1) {
			u.rateLimited(ip, now)
			return
		}
	}
	reply := s.fastReply(pkt, u.rep)
	var slow *mdns.Msg
	if reply == nil {
		reply, slow = s.answerNow(pkt, u.rep)
	}
	if cap(reply) > cap(u.rep) && cap(reply) <= keptBufSize {
		u.rep = reply[:0] // keep the grown buffer
	}
	switch {
	case reply != nil:
		if err := u.conn.write(reply, from); err != nil {
			s.replyDropped.Add(1)
			if !u.closing.Load() {
				s.logWriteError(nil, err)
			}
		}
	case slow != nil:
		if b != nil && !b.take(slowCost-1) {
			u.rateLimited(ip, now)
			return
		}
		select {
		case u.work <- slowQuery{msg: slow, from: from, at: now}:
		default:
			s.queueFull.Add(1)
		}
	}
}

// rateLimited counts a datagram dropped for its source's rate.
func (u *udpServer) rateLimited(ip netip.Addr, now time.Time) {
	u.s.rateLimited.Add(1)
	if u.s.limitLog.allow(now) {
		u.s.logger.Warn("dns source over its rate: datagrams dropped (rate-limited log)",
			"source", ip, "rate", u.s.limits.sourceRate, "burst", u.s.limits.sourceBurst)
	}
}

// answerNow answers the query pkt when that needs no upstream: the handler's reply, written into
// out (grown if needed), or a header-only FORMERR or NOTIMP for a query that is malformed or not a
// query. It returns the unpacked query instead (slow), uncounted, when the reply needs an
// upstream, and neither when nothing is to be sent (counted). out's first bytes may be written
// either way.
func (s *Server) answerNow(pkt, out []byte) (reply []byte, slow *mdns.Msg) {
	if len(pkt) < headerLen || pkt[2]&flagQR != 0 {
		s.dropped.Add(1)
		return nil, nil
	}
	dh := mdns.Header{
		Id:      binary.BigEndian.Uint16(pkt),
		Bits:    binary.BigEndian.Uint16(pkt[2:]),
		Qdcount: binary.BigEndian.Uint16(pkt[4:]),
		Ancount: binary.BigEndian.Uint16(pkt[6:]),
		Nscount: binary.BigEndian.Uint16(pkt[8:]),
		Arcount: binary.BigEndian.Uint16(pkt[10:]),
	}
	switch s.accept(dh) { // counts the rejected ones
	case mdns.MsgReject:
		return headerReply(pkt, out, mdns.RcodeFormatError), nil
	case mdns.MsgRejectNotImplemented:
		return headerReply(pkt, out, mdns.RcodeNotImplemented), nil
	}
	var r mdns.Msg // on the stack unless handed to the workers
	if err := r.Unpack(pkt); err != nil {
		s.invalid(pkt, err)
		return headerReply(pkt, out, mdns.RcodeFormatError), nil
	}
	m, ok := s.respond(s.ctx, &r, false, false)
	if !ok {
		slow := r
		return nil, &slow
	}
	return s.packUDP(m, out), nil
}

// packUDP packs m into out (grown if needed); nil when m is nil or does not pack (logged).
func (s *Server) packUDP(m *mdns.Msg, out []byte) []byte {
	if m == nil {
		return nil
	}
	b, err := m.PackBuffer(out[:cap(out)])
	if err != nil {
		s.logWriteError(nil, fmt.Errorf("pack: %w", err))
		return nil
	}
	return b
}

// headerReply writes into out a reply to pkt (at least a header) made of a header alone: pkt's ID,
// opcode (NOTIMP) or QUERY (FORMERR, as miekg), RD and CD bits, and rcode.
func headerReply(pkt, out []byte, rcode int) []byte {
	out = append(out[:0], make([]byte, headerLen)...)
	copy(out, pkt[:2])
	out[2] = flagQR | pkt[2]&flagRD
	if rcode == mdns.RcodeNotImplemented {
		out[2] |= pkt[2] & flagOpcode
	}
	out[3] = pkt[3]&flagCD | byte(rcode)
	return out
}

// worker answers queued queries until the loop closes the queue.
func (u *udpServer) worker() {
	defer u.workers.Done()
	s := u.s
	for q := range u.work {
		if s.now().Sub(q.at) > maxQueueWait {
			s.expired.Add(1)
			continue
		}
		m := s.reply(s.ctx, q.msg, false)
		buf := u.bufs.Get().(*[]byte)
		if b := s.packUDP(m, *buf); b != nil {
			u.send(buf, b, q.from)
		} else {
			u.putBuf(buf)
		}
	}
}

// send queues a worker's reply, written into buf's array, for the writer, or drops it when the queue
// is full.
func (u *udpServer) send(buf *[]byte, reply []byte, to source) {
	*buf = reply // its array is buf's or a grown one
	select {
	case u.out <- outReply{buf: buf, to: to}:
	default:
		u.s.replyDropped.Add(1)
		u.putBuf(buf)
	}
}

// putBuf returns buf to the pool unless it grew too large.
func (u *udpServer) putBuf(buf *[]byte) {
	if cap(*buf) > keptBufSize {
		return
	}
	*buf = (*buf)[:0]
	u.bufs.Put(buf)
}

// writer writes the queued replies until the loop closes the queue.
func (u *udpServer) writer() {
	for r := range u.out {
		if err := u.conn.write(*r.buf, r.to); err != nil {
			u.s.replyDropped.Add(1)
			if !u.closing.Load() {
				u.s.logWriteError(nil, err)
			}
		}
		u.putBuf(r.buf)
	}
}

// logWriteError logs a reply that could not be sent, at most once per logInterval.
func (s *Server) logWriteError(remote net.Addr, err error) {
	if s.writeLog.allow(s.now()) {
		s.logger.Warn("dns reply not written (rate-limited log)", "remote", remote, "err", err)
	}
}
