package relay

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
)

// session is one registered node's control stream, on the relay.
type session struct {
	srv    *Server
	stream network.Stream
	peer   string
	reg    Registration
	id     uint32
	udp    *udpNode
	out    chan []byte // encoded frames for the writer (pongs, punches): at most outQueue
	// dir is the latest directory frame not yet written: a newer one replaces it, so a slow node
	// holds one directory, not one per change. dirReady wakes the writer.
	dir      atomic.Pointer[[]byte]
	dirReady chan struct{}
	done     chan struct{}
	once     sync.Once
	rtt      atomic.Int64 // last measured round trip in nanoseconds; 0 = unknown
	punch    bucket       // punch request limit; only the session's reader touches it
}

// outQueue is how many frames other than the directory may wait for a node's writer; more are
// dropped and counted.
const outQueue = 64

// writeTimeout bounds each write on a control stream.
const writeTimeout = 10 * time.Second

// close ends the session: its stream is reset, its reader and writer return.
func (ss *session) close() {
	ss.once.Do(func() {
		close(ss.done)
		ss.stream.Reset()
	})
}

// send queues an encoded frame; when the node's queue is full the frame is dropped and counted
// (the sender never waits for a node). A node that does not read at all is closed by the writer's
// deadline.
func (ss *session) send(frame []byte) {
	select {
	case ss.out <- frame:
	case <-ss.done:
	default:
		ss.srv.metrics.controlDropped[dropQueueFull].Add(1)
	}
}

// sendDirectory makes frame the node's next directory, replacing (and counting) one not yet
// written.
func (ss *session) sendDirectory(frame []byte) {
	if old := ss.dir.Swap(&frame); old != nil {
		ss.srv.metrics.dirSuperseded.Add(1)
	}
	select {
	case ss.dirReady <- struct{}{}:
	default:
	}
}

// handleStream serves one control stream: registration, then the session. Until the node has
// registered, the stream is one of the gate's: within its caps, with frames of at most
// maxPreAuthFrame, for at most RegisterTimeout.
func (s *Server) handleStream(st network.Stream) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		st.Reset()
		return
	}
	s.streams[st] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.streams, st)
		s.mu.Unlock()
		s.wg.Done()
	}()

	release, reason := s.gate.admitStream(st.Conn())
	if reason != "" {
		s.metrics.unauthRefused[reason].Add(1)
		st.Reset()
		return
	}
	sess, reason, err := s.register(st)
	if err == nil {
		// Before release: while the stream is pending, the connection's expiry waits for it.
		s.gate.authenticated(st.Conn())
	}
	release()
	if err != nil {
		s.metrics.refused[reason].Add(1)
		s.log.Info("registration refused", "peer", st.Conn().RemotePeer().String(), "reason", reason, "err", err)
		if reason != refuseTimeout {
			st.SetWriteDeadline(time.Now().Add(time.Second))
			writeFrame(st, &message{Type: msgError, Reason: truncate(err.Error(), maxReasonLen)})
			st.Close()
		}
		// An unregistered peer gets nothing more: drop its connection.
		st.Conn().Close()
		return
	}
	defer s.gate.sessionEnded(st.Conn())
	defer s.unregister(sess)
	s.wg.Go(func() { sess.writeLoop() })
	err = sess.readLoop()
	s.log.Info("node disconnected", "node", sess.reg.Name, "id", sess.id, "err", err)
}

// maxReasonLen bounds the reason of an error frame sent before registration, well within
// maxPreAuthFrame.
const maxReasonLen = 1 << 10

// truncate returns s cut to at most n bytes.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

// isTimeout reports whether err is a deadline passing.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// register runs the registration handshake. On failure it returns the refusal reason.
func (s *Server) register(st network.Stream) (*session, string, error) {
	if err := st.SetDeadline(time.Now().Add(s.limits.RegisterTimeout)); err != nil {
		return nil, refuseInternal, fmt.Errorf("deadline: %w", err)
	}
	nonce, err := newNonce()
	if err != nil {
		return nil, refuseInternal, err
	}
	if err := writeFrame(st, &message{Type: msgChallenge, Nonce: base64.StdEncoding.EncodeToString(nonce)}); err != nil {
		return nil, refuseInternal, err
	}
	m, err := readFrame(st, maxPreAuthFrame)
	switch {
	case errors.Is(err, errFrameTooLarge):
		return nil, refuseTooLarge, err
	case errors.Is(err, ErrControl):
		return nil, refuseMalformed, err
	case isTimeout(err):
		return nil, refuseTimeout, fmt.Errorf("no register within %v: %w", s.limits.RegisterTimeout, err)
	case err != nil:
		return nil, refuseNoRegister, fmt.Errorf("read register: %w", err)
	}
	if m.Type != msgRegister {
		return nil, refuseMalformed, fmt.Errorf("%w: %q before register", ErrControl, m.Type)
	}
	nodePeer := st.Conn().RemotePeer().String()
	if !checkProof(m.Proof, s.cfg.JoinToken, labelRegister, s.id.String(), nodePeer, nonce) {
		return nil, refuseBadProof, errors.New("bad join token proof")
	}
	nodeNonce, err := decodeNonce(m.Nonce)
	if err != nil {
		return nil, refuseMalformed, err
	}
	reg := Registration{Name: m.Name, WireGuardKey: m.WireGuardKey, Overlay: m.Overlay, LAN: m.LAN}
	if err := reg.validate(); err != nil {
		return nil, refuseMalformed, fmt.Errorf("%w: %w", ErrControl, err)
	}
	if s.cfg.ACL != nil {
		if err := s.cfg.ACL.Register(reg.Name, nodePeer); err != nil {
			return nil, refuseACL, fmt.Errorf("refused by ACL: %w", err)
		}
	}
	if s.full(reg.Name) {
		return nil, refuseFull, fmt.Errorf("relay full: %d nodes", s.limits.MaxNodes)
	}
	id, err := s.binds.bind(reg.Name, nodePeer, reg.WireGuardKey)
	if errors.Is(err, errBound) {
		return nil, refuseBound, err
	}
	if err != nil {
		return nil, refuseInternal, err
	}
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, refuseInternal, fmt.Errorf("session key: %w", err)
	}
	sess := &session{
		srv:      s,
		stream:   st,
		peer:     nodePeer,
		reg:      reg,
		id:       id,
		udp:      &udpNode{id: id, key: key, data: newBucket(s.limits.DataRate, s.limits.DataBurst, s.now())},
		out:      make(chan []byte, outQueue),
		dirReady: make(chan struct{}, 1),
		done:     make(chan struct{}),
		punch:    newBucket(s.limits.PunchRate, s.limits.PunchBurst, s.now()),
	}
	// The session is installed before the welcome leaves: the node BINDs its WireGuard socket as
	// soon as the welcome arrives, and a BIND that found no node would be dropped, leaving the node
	// unbound (no relaying to or from it, no reflexive address, no punches) until its next BIND a
	// probe interval later. Frames queued for it meanwhile (directory, punches) follow the welcome:
	// its writer starts after register returns.
	s.install(sess)
	welcome := &message{
		Type:        msgWelcome,
		ID:          id,
		SessionKey:  base64.StdEncoding.EncodeToString(key),
		UDPPort:     s.Port(),
		RelayProof:  base64.StdEncoding.EncodeToString(proof(s.cfg.JoinToken, labelRelay, s.id.String(), nodePeer, nodeNonce)),
		KeepaliveMs: s.limits.KeepAlive.Milliseconds(),
	}
	if err := writeFrame(st, welcome); err != nil {
		s.unregister(sess)
		return nil, refuseInternal, err
	}
	if err := st.SetDeadline(time.Time{}); err != nil {
		s.unregister(sess)
		return nil, refuseInternal, fmt.Errorf("deadline: %w", err)
	}
	s.metrics.registered.Add(1)
	s.log.Info("node registered", "node", reg.Name, "id", id, "peer", nodePeer)
	return sess, "", nil
}

// full reports whether a new node named name would exceed MaxNodes.
func (s *Server) full(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.sessions[name]
	return !ok && len(s.sessions) >= s.limits.MaxNodes
}

// install makes sess the node's session, replacing (and closing) an older one.
func (s *Server) install(sess *session) {
	s.mu.Lock()
	old := s.sessions[sess.reg.Name]
	s.sessions[sess.reg.Name] = sess
	s.mu.Unlock()
	if old != nil {
		old.close()
	}
	s.udpMu.Lock()
	if prev := s.byID[sess.id]; prev != nil && s.byAddr[prev.addr] == prev {
		delete(s.byAddr, prev.addr)
	}
	s.byID[sess.id] = sess.udp
	s.udpMu.Unlock()
	s.markDirty()
}

// unregister removes sess unless a newer session replaced it.
func (s *Server) unregister(sess *session) {
	sess.close()
	s.mu.Lock()
	current := s.sessions[sess.reg.Name] == sess
	if current {
		delete(s.sessions, sess.reg.Name)
	}
	s.mu.Unlock()
	s.udpMu.Lock()
	if s.byID[sess.id] == sess.udp {
		delete(s.byID, sess.id)
	}
	if a := sess.udp.addr; s.byAddr[a] == sess.udp {
		delete(s.byAddr, a)
	}
	s.udpMu.Unlock()
	if current {
		s.markDirty()
	}
}

// readLoop handles the node's frames until the stream fails or the session is closed.
func (ss *session) readLoop() error {
	s := ss.srv
	for {
		ss.stream.SetReadDeadline(time.Now().Add(3 * s.limits.KeepAlive))
		m, err := readFrame(ss.stream, MaxControlFrame)
		if err != nil {
			if errors.Is(err, ErrControl) {
				s.metrics.streamBad.Add(1)
				ss.stream.SetWriteDeadline(time.Now().Add(time.Second))
				writeFrame(ss.stream, &message{Type: msgError, Reason: err.Error()})
			}
			return err
		}
		switch m.Type {
		case msgPong:
			if now := s.now(); m.T > 0 && m.T <= now {
				ss.rtt.Store(now - m.T)
			}
		case msgPing:
			if f, err := encodeFrame(&message{Type: msgPong, T: m.T}); err == nil {
				ss.send(f)
			}
		case msgPunch:
			s.punch(ss, m.Peer)
		default:
			// Unknown or out-of-place types are counted and ignored, so that newer nodes can talk
			// to older relays.
			s.metrics.streamBad.Add(1)
		}
	}
}

// writeLoop writes queued frames and keepalive pings until the session ends.
func (ss *session) writeLoop() {
	s := ss.srv
	tick := time.NewTicker(s.limits.KeepAlive)
	defer tick.Stop()
	write := func(frame []byte) bool {
		ss.stream.SetWriteDeadline(time.Now().Add(writeTimeout))
		if _, err := ss.stream.Write(frame); err != nil {
			if isTimeout(err) {
				s.metrics.slowStreams.Add(1)
				s.log.Warn("control stream not keeping up, closing", "node", ss.reg.Name)
			}
			ss.close()
			return false
		}
		return true
	}
	ping := func() bool {
		f, err := encodeFrame(&message{Type: msgPing, T: s.now()})
		return err == nil && write(f)
	}
	if !ping() {
		return
	}
	for {
		select {
		case <-ss.done:
			return
		case f := <-ss.out:
			if !write(f) {
				return
			}
		case <-ss.dirReady:
			if f := ss.dir.Swap(nil); f != nil && !write(*f) {
				return
			}
		case <-tick.C:
			if !ping() {
				return
			}
		}
	}
}

// punch coordinates a hole punch between the requester and the node named peer: both are told the
// other's addresses, with delays chosen so both start sending when the later message arrives.
func (s *Server) punch(from *session, peer string) {
	if !from.punch.take(1, s.now()) {
		s.metrics.punchDropped.Add(1)
		return
	}
	s.mu.Lock()
	to := s.sessions[peer]
	s.mu.Unlock()
	if to == nil || to == from {
		s.metrics.punchDropped.Add(1)
		return
	}
	rttA, rttB := time.Duration(from.rtt.Load()), time.Duration(to.rtt.Load())
	longest := max(rttA, rttB)
	send := func(ss, other *session, rtt time.Duration) {
		f, err := encodeFrame(&message{
			Type:          msgPunch,
			Peer:          other.reg.Name,
			PeerReflexive: s.reflexive(other.id),
			PeerLAN:       other.reg.LAN,
			DelayMs:       ((longest - rtt) / 2).Milliseconds(),
		})
		if err == nil {
			ss.send(f)
		}
	}
	send(from, to, rttA)
	send(to, from, rttB)
	s.metrics.punches.Add(1)
}
