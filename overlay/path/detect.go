package path

import (
	"maps"
	"net/netip"
	"time"
)

// Failure detection driven by traffic (see the package doc, "Failure detection"). The Bind watches
// the endpoint applied for every peer (watch.go); the Manager reads what it saw at every step and
// turns it into probes:
//
//   - a local send error to the endpoint counts as a lost probe of its candidate at once, and
//     starts a suspicion;
//   - a suspicion (data unanswered for suspectAfter, the peer's datagrams arriving through a relay,
//     or a send error) probes the candidate at once and again after every miss, each probe with a
//     short timeout (three RTTs, at least suspectTimeout, at most pongTimeout): missesToDead
//     misses in a row make an alive path dead, one when the peer's datagrams came through a relay
//     (the peer found the path dead first, and its side of the failover is over: this side's is
//     what keeps the flows waiting), and the choice moves on in the same step. A PONG
//     ends the suspicion, and none starts again for suspectAfter, so that a one-way flow, which
//     the peer does not answer, costs one PING per suspectAfter.
//
// Idle peers cost nothing more: without data sent, no suspicion starts.

// suspectLocked reads p's watched endpoint and starts or feeds a suspicion of the chosen
// candidate. It returns when it wants the step to run again (zero: not before the next tick).
func (m *Manager) suspectLocked(p *peerState, now time.Time) time.Time {
	a := m.watched[p.applied]
	c := p.find(p.applied)
	if a == nil || c == nil {
		return time.Time{}
	}
	if n := a.sendErr.Swap(0); n > 0 {
		// Certain, not a loss with a probability: the datagram never left.
		m.stats.sendErrors.Add(uint64(n))
		m.missLocked(p, c, "send error")
		if c.alive {
			m.startSuspicionLocked(p, c, now)
		}
		a.suspect.Store(false)
		return time.Time{}
	}
	if !a.suspect.Load() {
		return time.Time{}
	}
	if !c.alive {
		// Nothing to fall back from: an unconfirmed guess or relay is probed as usual.
		a.suspect.Store(false)
		return time.Time{}
	}
	if now.Before(c.calmUntil) {
		return c.calmUntil
	}
	a.suspect.Store(false)
	if a.elsewhere.Swap(false) {
		c.strict = true
	}
	m.startSuspicionLocked(p, c, now)
	return time.Time{}
}

// startSuspicionLocked makes c suspected: probed at once, and after every miss, with the short
// timeout.
func (m *Manager) startSuspicionLocked(p *peerState, c *candidate, now time.Time) {
	if c.suspect {
		return
	}
	c.suspect = true
	m.stats.suspicions.Add(1)
	m.log.Debug("path suspected", "peer", p.info.Name, "kind", c.kind(), "addr", c.addr, "alive", c.alive)
	if t := m.txs[c.probeTx]; c.probeTx != 0 && t != nil {
		// The probe in flight is missed after the short timeout too; the next goes out then.
		t.wait = min(t.wait, m.probeTimeoutLocked(c))
		return
	}
	c.lastSent = time.Time{} // due now
}

// missLocked counts one lost probe of c; an alive candidate with missesToDead in a row is dead.
func (m *Manager) missLocked(p *peerState, c *candidate, why string) {
	c.misses++
	if c.alive && (c.misses >= missesToDead || c.suspect && c.strict) {
		c.alive, c.suspect, c.strict = false, false, false
		m.stats.pathsDead.Add(1)
		m.log.Info("path dead", "peer", p.info.Name, "kind", c.kind(), "addr", c.addr, "last", why)
	}
	if !c.alive {
		c.suspect, c.strict = false, false
	}
}

// probeTimeoutLocked is how long a probe of c waits for its PONG: the short timeout while c is
// suspected, else pongTimeout.
func (m *Manager) probeTimeoutLocked(c *candidate) time.Duration {
	if !c.suspect {
		return m.t.pongTimeout
	}
	return min(max(3*c.rtt, m.t.suspectTimeout), m.t.pongTimeout)
}

// answeredLocked ends c's suspicion after a PONG: the path works, whatever the data did.
func (m *Manager) answeredLocked(c *candidate, now time.Time) {
	if c.suspect {
		c.suspect, c.strict = false, false
		c.calmUntil = now.Add(m.t.suspectAfter)
	}
	if a := m.watched[c.addr]; a != nil {
		a.unanswered.Store(0)
	}
}

// updateWatchLocked gives the Bind the endpoints applied now, keeping the activity of those that
// stay.
func (m *Manager) updateWatchLocked() {
	next := make(map[netip.AddrPort]*activity, len(m.peers))
	watch := func(addr netip.AddrPort) {
		if a := m.watched[addr]; a != nil {
			next[addr] = a
		} else {
			next[addr] = &activity{}
		}
	}
	for _, p := range m.peers {
		if p.applied.IsValid() && p.applied != p.hold {
			watch(p.applied)
		}
		if !p.releaseAt.IsZero() {
			// A delayed release of a held initiation: heard from any of the peer's addresses?
			for _, c := range p.cands {
				watch(c.addr)
			}
		}
	}
	if m.watched != nil && maps.EqualFunc(next, m.watched, func(a, b *activity) bool { return a == b }) {
		return
	}
	m.watched = next
	m.bind.setWatch(&watchTable{byAddr: next, suspectAfter: int64(m.t.suspectAfter), wake: m.poke})
}

// replayLocked sends the datagrams kept for p's applied endpoint again on to, when p moves from
// that endpoint because it stopped answering (see replayRing).
func (m *Manager) replayLocked(p *peerState, to netip.AddrPort) {
	old := p.applied
	if !old.IsValid() || old == p.hold || old == to {
		return
	}
	if c := p.find(old); c != nil && c.alive && c.misses == 0 {
		return // an upgrade: the old path still works
	}
	a := m.watched[old]
	if a == nil {
		return
	}
	n, err := m.bind.replay(a, to)
	if err != nil {
		m.log.Debug("replay", "peer", p.info.Name, "from", old, "to", to, "err", err)
	} else if n > 0 {
		m.log.Debug("replayed on the new path", "peer", p.info.Name, "datagrams", n, "from", old, "to", to)
	}
}

// roamErrLocked handles WireGuard sends that failed with a path error to addr, an address that is
// not the endpoint this node applied for any peer: wireguard-go roamed there after a datagram
// from it. When addr is one of p's candidates, the miss is counted, what failed is sent on p's
// applied endpoint, and p's choice applied again at once, without asking wireguard-go first. It
// reports whether addr was p's.
func (m *Manager) roamErrLocked(p *peerState, addr netip.AddrPort, kept [][]byte) bool {
	c := p.find(addr)
	if c == nil || p.applied == addr || !p.real {
		return false
	}
	m.stats.sendErrors.Add(1)
	m.missLocked(p, c, "send error after roaming")
	p.reapply = true
	if len(kept) > 0 {
		if err := m.bind.sendTo(kept, p.applied); err != nil {
			m.log.Debug("replay after roaming", "peer", p.info.Name, "to", p.applied, "err", err)
		} else {
			m.bind.replayed.Add(uint64(len(kept)))
		}
	}
	m.log.Debug("wireguard-go roamed onto a refused address: choice applied again", "peer", p.info.Name,
		"refused", addr, "endpoint", p.applied, "replayed", len(kept))
	return true
}
