package path

import (
	"context"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/edgewire/edgewire/relay"
)

// source is where a candidate came from.
type source int

const (
	srcLAN           source = iota // the peer's LAN list
	srcReflexive                   // the peer's reflexive address from the directory
	srcPeerReflexive               // the source of a valid PING from the peer
	srcPunch                       // the reflexive address a punch signal named
	srcRelay                       // a synthetic endpoint on a relay
)

func (s source) String() string {
	return [...]string{"lan", "reflexive", "peer-reflexive", "punch", "relay"}[s]
}

// candidate is one path to a peer. Guarded by Manager.mu.
type candidate struct {
	addr      netip.AddrPort
	src       source
	relay     int // srcRelay only
	alive     bool
	rtt       time.Duration
	lastPong  time.Time
	lastSent  time.Time // of the last probe
	misses    int       // consecutive missed probes
	probeTx   uint64    // outstanding probe; 0: none
	triggered time.Time // of the last triggered check
	learned   time.Time // srcPeerReflexive: when last seen
	suspect   bool      // probed at once and after every miss, with a short timeout (detect.go)
	strict    bool      // suspected because the peer left it: one miss makes it dead
	calmUntil time.Time // no new suspicion before
}

func (c *candidate) kind() Kind {
	switch c.src {
	case srcLAN:
		return KindLAN
	case srcRelay:
		return KindRelay
	}
	return KindDirect
}

// peerState is one peer. Guarded by Manager.mu.
type peerState struct {
	info        PeerInfo
	macKey      []byte
	added       time.Time
	cands       []*candidate // LAN, reflexive, peer-reflexive/punch, relay
	chosen      *candidate
	applied     netip.AddrPort // last endpoint SetEndpoint accepted
	appliedKind Kind           // and its kind then: a guess that starts answering is applied again
	checked     time.Time      // last roaming check
	// reapply: a relay session went away, and wireguard-go may have roamed onto it (a datagram the
	// peer sent through it before this node chose a path): the choice is applied again, unasked.
	reapply bool

	// hold is p's hold endpoint (hold.go), given to wireguard-go until a path answers; real is set
	// once another endpoint was applied. releaseTo and releaseAt are a delayed release of the
	// initiation held for p (zero releaseAt: none).
	hold          netip.AddrPort
	real          bool
	releaseTo     netip.AddrPort
	releaseAt     time.Time
	lastPunchReq  time.Time
	punchInFlight bool // a RequestPunch call is running
	punching      bool // an OnPunch is running
}

func (p *peerState) find(addr netip.AddrPort) *candidate {
	for _, c := range p.cands {
		if c.addr == addr {
			return c
		}
	}
	return nil
}

// relayState is the node's session with one relay. Guarded by Manager.mu.
type relayState struct {
	sess     RelaySession
	bound    bool // a BINDACK answered one of the last BINDs
	lastSent time.Time
	unacked  int
	nonces   [4]uint64 // of the last BINDs sent
	observed netip.AddrPort
}

// tx is an outstanding PING. Guarded by Manager.mu.
type tx struct {
	peer  *peerState
	addr  netip.AddrPort
	sent  time.Time
	wait  time.Duration // for the PONG; a background probe's miss after it
	probe bool          // a background probe: a timeout is a miss
	done  chan pongInfo // Ping's waiter (cap 1), or nil
}

type pongInfo struct {
	addr netip.AddrPort
	rtt  time.Duration
}

// rebuildLocked recomputes p's candidates from its info and the relay sessions, keeping the
// state of candidates whose address remains.
func (m *Manager) rebuildLocked(p *peerState) {
	var next []*candidate
	add := func(addr netip.AddrPort, src source, r int) {
		if !addr.IsValid() || addr.Port() == 0 {
			return
		}
		addr = netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())
		for _, c := range next {
			if c.addr == addr {
				return
			}
		}
		c := p.find(addr)
		if c == nil {
			c = &candidate{addr: addr}
		}
		c.src, c.relay = src, r
		next = append(next, c)
	}
	for _, a := range p.info.LAN {
		add(a, srcLAN, 0)
	}
	add(p.info.Reflexive, srcReflexive, 0)
	for _, c := range p.cands {
		if c.src == srcPeerReflexive || c.src == srcPunch {
			add(c.addr, c.src, 0)
		}
	}
	routes := slices.Clone(p.info.Relays)
	slices.SortFunc(routes, func(a, b RelayRoute) int { return a.Relay - b.Relay })
	for _, rt := range routes {
		if m.relays[rt.Relay] == nil {
			continue
		}
		if synth, ok := SyntheticEndpoint(rt.Relay, rt.ID); ok {
			add(synth, srcRelay, rt.Relay)
		}
	}
	p.cands = next
	if p.chosen != nil && p.find(p.chosen.addr) != p.chosen {
		p.chosen = nil
	}
}

// handle processes one datagram from the queue.
func (m *Manager) handle(rx *rxPacket) {
	pkt := rx.buf[:rx.n]
	typ, ok := relay.IsFrame(pkt)
	if !ok {
		m.stats.malformed.Add(1)
		return
	}
	now := time.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	switch typ {
	case relay.FrameBindAck:
		m.handleBindAckLocked(pkt, rx.from)
	case relay.FramePing, relay.FramePong:
		m.handlePingLocked(pkt, rx.from, now)
	default:
		m.stats.malformed.Add(1)
	}
}

func (m *Manager) handleBindAckLocked(pkt []byte, from netip.AddrPort) {
	nonce, observed, err := relay.ParseBindAck(pkt)
	if err != nil {
		m.stats.malformed.Add(1)
		return
	}
	for _, rs := range m.relays {
		if rs.sess.UDPAddr != from || !slices.Contains(rs.nonces[:], nonce) || nonce == 0 {
			continue
		}
		m.stats.bindAcks.Add(1)
		if !rs.bound || rs.observed != observed {
			m.log.Info("relay bound", "relay", rs.sess.Relay, "reflexive", observed)
		}
		if !rs.bound {
			m.poke() // relayed candidates rank higher, punches can be requested
		}
		rs.bound, rs.unacked, rs.observed = true, 0, observed
		m.updateReflexiveLocked()
		return
	}
	m.stats.badMAC.Add(1)
}

func (m *Manager) updateReflexiveLocked() {
	best := -1
	for r, rs := range m.relays {
		if rs.bound && rs.observed.IsValid() && (best < 0 || r < best) {
			best = r
		}
	}
	if best >= 0 {
		m.reflexive = m.relays[best].observed
	}
}

func (m *Manager) handlePingLocked(pkt []byte, from netip.AddrPort, now time.Time) {
	ping, err := relay.ParsePing(pkt)
	if err != nil {
		m.stats.malformed.Add(1)
		return
	}
	p := m.peers[ping.Sender]
	if p == nil {
		m.stats.unknown.Add(1)
		return
	}
	if !relay.VerifyPing(pkt, p.macKey) {
		m.stats.badMAC.Add(1)
		return
	}
	if !ping.Pong {
		m.stats.pingsIn.Add(1)
		pong := relay.AppendPing(nil, relay.Ping{Pong: true, Sender: m.cfg.PublicKey, TxID: ping.TxID, Observed: from}, p.macKey)
		if err := m.bind.SendTo(pong, from); err != nil {
			m.log.Debug("pong", "peer", p.info.Name, "to", from, "err", err)
		}
		// A triggered check (ICE), even over a probe of ours still waiting for its PONG: that one
		// most often went out before the peer knew this node, which then ignored it (an agent
		// that starts, or learns of this one, a little later), and waiting for its timeout and the
		// next probe would keep a LAN peer off its LAN path long enough to be punched. At most one
		// per retrigger, should PONGs never come back.
		if c := m.learnLocked(p, from, now); c != nil && !c.alive && (c.probeTx == 0 || now.Sub(c.triggered) >= m.t.retrigger) {
			c.triggered = now
			m.sendProbeLocked(p, c, now, true, nil)
		}
		return
	}
	t := m.txs[ping.TxID]
	if t == nil || t.peer != p {
		m.stats.badMAC.Add(1) // a PONG for nothing we sent (or sent to another peer)
		return
	}
	m.stats.pongsIn.Add(1)
	delete(m.txs, ping.TxID)
	rtt := now.Sub(t.sent)
	if from != t.addr {
		// The peer answered from elsewhere (its NAT maps us differently): a candidate to probe.
		m.learnLocked(p, from, now)
		if t.done != nil {
			t.done <- pongInfo{addr: t.addr, rtt: rtt}
		}
		return
	}
	if c := p.find(t.addr); c != nil {
		if !c.alive {
			m.log.Debug("path alive", "peer", p.info.Name, "kind", c.kind(), "addr", c.addr, "rtt", rtt)
		}
		c.alive, c.rtt, c.lastPong, c.misses = true, rtt, now, 0
		if c.probeTx == ping.TxID {
			c.probeTx = 0
		}
		m.answeredLocked(c, now)
	}
	if t.done != nil {
		t.done <- pongInfo{addr: t.addr, rtt: rtt}
	}
	prev, prevKind := p.chosen, p.appliedKind
	m.chooseLocked(p)
	if c := p.chosen; c != prev || (c != nil && m.kindOfChoiceLocked(c) != prevKind) {
		m.poke() // step gives wireguard-go the new path now, not at the next tick
	}
}

// learnLocked makes from a peer-reflexive candidate of p unless it is one already (or a relay's
// synthetic endpoint), and returns the candidate.
func (m *Manager) learnLocked(p *peerState, from netip.AddrPort, now time.Time) *candidate {
	if c := p.find(from); c != nil {
		if c.src == srcPeerReflexive {
			c.learned = now
		}
		return c
	}
	if _, _, ok := ParseSynthetic(from); ok {
		return nil
	}
	var learned []*candidate
	for _, c := range p.cands {
		if c.src == srcPeerReflexive {
			learned = append(learned, c)
		}
	}
	if len(learned) >= maxPeerReflexive {
		oldest := learned[0]
		for _, c := range learned {
			if !c.alive && (oldest.alive || c.learned.Before(oldest.learned)) {
				oldest = c
			}
		}
		p.cands = slices.DeleteFunc(p.cands, func(c *candidate) bool { return c == oldest })
		if p.chosen == oldest {
			p.chosen = nil
		}
	}
	c := &candidate{addr: from, src: srcPeerReflexive, learned: now}
	i := slices.IndexFunc(p.cands, func(c *candidate) bool { return c.src == srcRelay })
	if i < 0 {
		i = len(p.cands)
	}
	p.cands = slices.Insert(p.cands, i, c)
	m.log.Debug("peer-reflexive candidate", "peer", p.info.Name, "addr", from)
	return c
}

// sendProbeLocked sends a PING for p to c's address and records the transaction.
func (m *Manager) sendProbeLocked(p *peerState, c *candidate, now time.Time, probe bool, done chan pongInfo) uint64 {
	m.nextTx++
	id := m.nextTx
	frame := relay.AppendPing(nil, relay.Ping{Sender: m.cfg.PublicKey, TxID: id}, p.macKey)
	if err := m.bind.SendTo(frame, c.addr); err != nil {
		m.log.Debug("probe", "peer", p.info.Name, "addr", c.addr, "err", err)
		if probe && pathError(err) {
			// The probe cannot leave (a firewall, no route, no interface): lost, now.
			c.lastSent = now
			m.stats.sendErrors.Add(1)
			m.missLocked(p, c, err.Error())
		}
		return 0
	}
	m.stats.pingsSent.Add(1)
	m.txs[id] = &tx{peer: p, addr: c.addr, sent: now, wait: m.probeTimeoutLocked(c), probe: probe, done: done}
	if probe {
		c.probeTx, c.lastSent = id, now
	}
	return id
}

// step runs the timers: expired probes, due probes and BINDs, path choice, punch requests; then
// applies changed endpoints outside the lock. It returns when it wants to run again before the
// next tick (a BIND to repeat, a punch request falling due), or zero.
func (m *Manager) step() (next time.Time) {
	now := time.Now()
	soon := func(t time.Time) {
		if !t.IsZero() && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	type apply struct {
		key   [32]byte
		name  string
		addr  netip.AddrPort
		kind  Kind
		want  bool // the choice changed (false: roaming check)
		force bool // a roaming check that applies without asking (reapply)
		hold  bool // the hold endpoint
	}
	var applies []apply
	m.mu.Lock()
	for id, t := range m.txs {
		if t.done != nil {
			continue // Ping removes its own transactions
		}
		if now.Sub(t.sent) < t.wait {
			soon(t.sent.Add(t.wait))
			continue
		}
		delete(m.txs, id)
		if !t.probe {
			continue
		}
		if c := t.peer.find(t.addr); c != nil && c.probeTx == id {
			c.probeTx = 0
			m.missLocked(t.peer, c, "timeout")
		}
	}
	for _, rs := range m.relays {
		due := rs.lastSent.Add(m.bindRetryLocked(rs))
		if now.Before(due) {
			soon(due)
			continue
		}
		if rs.unacked >= missesToDead && rs.bound {
			rs.bound = false
			m.log.Info("relay not answering BIND", "relay", rs.sess.Relay)
		}
		m.nextTx++
		nonce := m.nextTx
		frame := relay.AppendBind(nil, rs.sess.ID, nonce, rs.sess.Key)
		if err := m.bind.SendTo(frame, rs.sess.UDPAddr); err != nil {
			m.log.Debug("bind", "relay", rs.sess.Relay, "err", err)
			continue
		}
		copy(rs.nonces[1:], rs.nonces[:])
		rs.nonces[0] = nonce
		rs.lastSent = now
		rs.unacked++
		soon(now.Add(m.bindRetryLocked(rs)))
	}
	roamAddr, roamKept := m.bind.takeRoamed()
	for key, p := range m.peers {
		soon(m.suspectLocked(p, now))
		if roamAddr.IsValid() && m.roamErrLocked(p, roamAddr, roamKept) {
			roamAddr = netip.AddrPort{}
		}
		for _, c := range p.cands {
			if c.probeTx != 0 {
				continue
			}
			if (c.src == srcReflexive || c.src == srcPunch) && !c.alive {
				// A peer's public address behind a NAT is probed only in a coordinated punch, after
				// the own mapping is primed: a lone probe that reaches the peer's NAT first leaves a
				// conntrack entry there that makes the NAT move the peer's own mapping to another
				// port, and a probe every interval would keep that entry alive for good.
				continue
			}
			due := c.lastSent.Add(m.t.probe)
			switch {
			case c.suspect:
				due = c.lastSent.Add(m.t.suspectGap)
			case c.alive && c.misses > 0:
				due = c.lastSent.Add(m.t.pongTimeout)
			case c.alive:
				due = c.lastSent.Add(m.t.alive)
			}
			if !now.Before(due) {
				m.sendProbeLocked(p, c, now, true, nil)
			} else if c.suspect {
				soon(due)
			}
		}
		prev := p.chosen
		m.chooseLocked(p)
		if m.holdingLocked(p, now) {
			// No path answered yet: wireguard-go's first initiation waits in the Bind (hold.go).
			if p.applied != p.hold {
				applies = append(applies, apply{key, p.info.Name, p.hold, KindNone, true, false, true})
				p.checked, p.reapply = now, false
			}
			soon(p.added.Add(m.t.holdMax))
		} else if c := p.chosen; c != nil {
			switch {
			case c != prev || c.addr != p.applied || m.kindOfChoiceLocked(c) != p.appliedKind:
				applies = append(applies, apply{key, p.info.Name, c.addr, m.kindOfChoiceLocked(c), true, false, false})
				p.checked, p.reapply = now, false
			case p.reapply || now.Sub(p.checked) >= m.t.alive:
				applies = append(applies, apply{key, p.info.Name, c.addr, m.kindOfChoiceLocked(c), false, p.reapply, false})
				p.checked, p.reapply = now, false
			}
		}
		soon(m.releaseDueLocked(p, now))
		soon(m.maybeRequestPunchLocked(p, now, false))
	}
	m.updatePreferredLocked()
	m.mu.Unlock()

	for _, a := range applies {
		if !a.want && !a.force && m.cfg.Endpoint != nil {
			if cur, err := m.cfg.Endpoint(a.key); err == nil && cur == a.addr.String() {
				continue
			}
		}
		err := m.cfg.SetEndpoint(a.key, a.addr.String(), a.kind)
		m.mu.Lock()
		if p := m.peers[a.key]; p != nil && err == nil {
			m.replayLocked(p, a.addr)
			m.appliedLocked(p, a.addr, a.kind, time.Now())
		}
		m.mu.Unlock()
		switch {
		case err != nil:
			if m.setLog.allow(time.Now()) {
				m.log.Warn("set endpoint", "peer", a.name, "endpoint", a.addr, "err", err)
			}
		case a.hold:
			m.log.Debug("holding for a path", "peer", a.name, "endpoint", a.addr)
		case a.want:
			m.stats.pathChanges.Add(1)
			m.log.Info("path", "peer", a.name, "kind", a.kind, "endpoint", a.addr)
		}
	}
	if len(applies) > 0 {
		m.mu.Lock()
		m.updateWatchLocked()
		m.mu.Unlock()
	}
	if !next.IsZero() && next.Sub(now) >= m.t.tick {
		next = time.Time{} // the ticker comes first
	}
	return next
}

// bindRetryLocked is how long after its last BIND a relay gets the next: the keepalive interval
// while bound; while not, an eighth of a probe interval after the first unanswered BIND, doubling
// up to a probe interval (a lost BIND or BINDACK leaves the relay useless: nothing is relayed to
// or from an unbound node, and the relay does not know its reflexive address).
func (m *Manager) bindRetryLocked(rs *relayState) time.Duration {
	if rs.bound {
		return m.t.bind
	}
	d := m.t.bindRetry
	for i := 1; i < rs.unacked && d < m.t.probe; i++ {
		d *= 2
	}
	return min(d, m.t.probe)
}

// rank orders candidates for the choice: an alive LAN address, then an alive direct one, then an
// alive relay, a relay whose session is bound, any relay, and last an unconfirmed guess.
func (m *Manager) rankLocked(c *candidate) int {
	switch {
	case c.alive && c.src == srcLAN:
		return 6
	case c.alive && c.src != srcRelay:
		return 5
	case c.alive:
		return 4
	case c.src == srcRelay && m.relays[c.relay] != nil && m.relays[c.relay].bound:
		return 3
	case c.src == srcRelay:
		return 2
	}
	return 1
}

// chooseLocked sets p.chosen to the best candidate; the current choice wins ties.
func (m *Manager) chooseLocked(p *peerState) {
	var best *candidate
	bestRank := 0
	if p.chosen != nil && p.find(p.chosen.addr) == p.chosen {
		best, bestRank = p.chosen, m.rankLocked(p.chosen)
	}
	for _, c := range p.cands {
		if r := m.rankLocked(c); r > bestRank {
			best, bestRank = c, r
		}
	}
	p.chosen = best
}

// kindOfChoiceLocked is the kind Paths reports for a chosen candidate: its own when it answers or
// is a relay, none for an unconfirmed guess.
func (m *Manager) kindOfChoiceLocked(c *candidate) Kind {
	if c.alive || c.src == srcRelay {
		return c.kind()
	}
	return KindNone
}

// maybeRequestPunchLocked asks a relay to coordinate a punch with p when p has a reflexive
// address, no alive LAN or direct path and a relay both sides are on, at most every punchBackoff
// (force: Ping --until-direct, which still respects a request in flight). The first request
// waits punchFirst after p appeared, or punchFirstLAN when one of p's LAN addresses is on one of
// this node's subnets: a peer on the same LAN answers its LAN probes, sent at once, before any
// punch; a peer behind another NAT cannot, and waiting for it only delays the direct path. When
// only time holds the request back, it returns when it falls due (zero otherwise).
func (m *Manager) maybeRequestPunchLocked(p *peerState, now time.Time, force bool) time.Time {
	if m.cfg.RequestPunch == nil || p.punchInFlight || p.punching || !p.info.Reflexive.IsValid() || m.closed || !m.started {
		return time.Time{}
	}
	r := -1
	for _, c := range p.cands {
		if c.alive && c.src != srcRelay {
			return time.Time{}
		}
		if c.src == srcRelay && r < 0 && m.relays[c.relay] != nil && m.relays[c.relay].bound {
			r = c.relay
		}
	}
	if r < 0 {
		return time.Time{}
	}
	if !force {
		due := p.lastPunchReq.Add(m.t.punchBackoff)
		if p.lastPunchReq.IsZero() {
			// The first request; the interfaces are looked at for it only.
			first := m.t.punchFirst
			if m.onLink.any(now, p.info.LAN) {
				first = m.t.punchFirstLAN
			}
			due = p.added.Add(first)
		}
		if now.Before(due) {
			return due
		}
	}
	p.lastPunchReq, p.punchInFlight = now, true
	name := p.info.Name
	m.log.Info("requesting punch", "peer", name, "relay", r, "reflexive", p.info.Reflexive)
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		ctx, cancel := context.WithTimeout(m.ctx, m.t.punchBackoff)
		err := m.cfg.RequestPunch(ctx, r, name)
		cancel()
		if err != nil && m.ctx.Err() == nil {
			m.log.Info("request punch failed", "peer", name, "relay", r, "err", err)
		}
		m.mu.Lock()
		p.punchInFlight = false
		m.mu.Unlock()
	}()
	return time.Time{}
}

// updatePreferredLocked tells the Bind, for every peer whose chosen path answers, to present the
// WireGuard datagrams that peer sends through any other relay as coming from the chosen path.
// wireguard-go roams to the source of every authenticated datagram; without this it would follow
// a straggler through the relay back from a direct path, or follow a peer that chose another
// relay than this node did onto that relay, where a failure of that relay would strand it: this
// node's own choice does not change, so nothing would move it back before the next roaming check.
// A choice that has not answered yet, or missed a probe, leaves wireguard-go free to roam.
func (m *Manager) updatePreferredLocked() {
	next := make(map[netip.AddrPort]netip.AddrPort)
	for _, p := range m.peers {
		c := p.chosen
		if c == nil || !c.alive || c.misses > 0 {
			// A choice that missed a probe leaves wireguard-go free to follow the peer onto a
			// relay: the peer may have found the path dead first.
			continue
		}
		for _, rt := range p.info.Relays {
			if synth, ok := SyntheticEndpoint(rt.Relay, rt.ID); ok && synth != c.addr {
				next[synth] = c.addr
			}
		}
	}
	if cur := m.bind.preferred.Load(); cur != nil && maps.Equal(*cur, next) {
		return
	}
	m.bind.preferred.Store(&next)
}
