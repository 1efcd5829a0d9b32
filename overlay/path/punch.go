package path

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/edgewire/edgewire/relay"
)

// OnPunch carries out a punch a relay signalled: after p.Delay it opens the own NAT mapping
// towards p.PeerReflexive with a few datagrams whose TTL (PunchTTL) only passes the own router,
// sent from the WireGuard socket's port through a raw socket, waits primeLead so that the peer's
// own prime has surely left too, then sends full-TTL PINGs to the peer's reflexive and LAN
// addresses every 75ms for about a probe interval (at least 1.5s). It returns at once; a punch for
// a peer that is already punching is ignored.
func (m *Manager) OnPunch(relayIndex int, p Punch) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ps := m.byName[p.Peer]
	if ps == nil || !m.started || m.closed || ps.punching {
		m.log.Debug("punch ignored", "peer", p.Peer, "relay", relayIndex, "known", ps != nil)
		return
	}
	ps.punching = true
	m.log.Info("punching", "peer", p.Peer, "relay", relayIndex, "reflexive", p.PeerReflexive, "lan", p.PeerLAN, "delay", p.Delay)
	var targets []netip.AddrPort
	if a := p.PeerReflexive; a.IsValid() {
		a = netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
		if ps.find(a) == nil {
			m.insertLocked(ps, &candidate{addr: a, src: srcPunch, learned: time.Now()})
		}
		targets = append(targets, a)
	}
	for _, a := range p.PeerLAN {
		a = netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
		if !a.IsValid() {
			continue
		}
		if ps.find(a) == nil {
			m.insertLocked(ps, &candidate{addr: a, src: srcLAN})
		}
		targets = append(targets, a)
	}
	m.stats.punches.Add(1)
	m.wg.Add(1)
	go m.punch(ps, p.PeerReflexive, p.Delay, targets)
}

// insertLocked adds c to p's candidates before the relays.
func (m *Manager) insertLocked(p *peerState, c *candidate) {
	i := len(p.cands)
	for j, o := range p.cands {
		if o.src == srcRelay {
			i = j
			break
		}
	}
	p.cands = append(p.cands[:i], append([]*candidate{c}, p.cands[i:]...)...)
}

// punch is one punch's goroutine (see OnPunch).
func (m *Manager) punch(p *peerState, reflexive netip.AddrPort, delay time.Duration, targets []netip.AddrPort) {
	defer m.wg.Done()
	defer func() {
		m.mu.Lock()
		p.punching = false
		m.mu.Unlock()
	}()
	if !sleepCtx(m.ctx, delay) {
		return
	}
	if reflexive.IsValid() && reflexive.Addr().Unmap().Is4() && m.prime != nil {
		m.mu.Lock()
		frame := relay.AppendPing(nil, relay.Ping{Sender: m.cfg.PublicKey}, p.macKey)
		m.mu.Unlock()
		// Both sides prime at the signalled moment, but the relay's timing is only as good as its
		// RTT estimates and the scheduling of both agents: a full-TTL PING sent right after the
		// own prime can reach the peer's NAT before the peer's prime has left, and the peer's
		// mapping is then moved (measured in the NAT lab: a1's PING reached natB 0.27ms before
		// b1's prime left). Waiting primeLead lets the peer's prime go out first.
		port := m.bind.Port()
		if err := m.prime(port, reflexive, m.cfg.PunchTTL, frame); err != nil {
			m.log.Debug("prime own mapping", "peer", p.info.Name, "err", err)
		} else if !sleepCtx(m.ctx, m.t.primeLead) {
			return
		}
	}
	ticker := time.NewTicker(punchEvery)
	defer ticker.Stop()
	deadline := time.Now().Add(m.t.punchFor)
	for {
		now := time.Now()
		m.mu.Lock()
		done := m.peers[p.info.Key] != p
		for _, a := range targets {
			c := p.find(a)
			if done || c == nil {
				continue
			}
			if c.alive {
				done = true // a path answered: the background probes keep it
				break
			}
			m.sendProbeLocked(p, c, now, false, nil)
		}
		m.mu.Unlock()
		if done || now.After(deadline) {
			return
		}
		select {
		case <-m.ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

// sleepCtx waits d or until ctx ends; it reports whether d passed.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// Ping sends count PINGs to peer over its current path (through the relay when relayed), one
// after the other, and reports each to each: the path's kind and address and the RTT, or Err when
// no PONG came within a probe interval. With untilDirect it goes on until a PONG arrives over a
// LAN or direct path (and asks for a punch when the path is relayed); count then caps the number
// of PINGs (0: until ctx ends) and reaching it is an error. Ping needs a started Manager.
func (m *Manager) Ping(ctx context.Context, peer string, count int, untilDirect bool, each func(PingResult)) error {
	if count <= 0 && !untilDirect {
		return fmt.Errorf("path: ping %s: count %d", peer, count)
	}
	for seq := 1; ; seq++ {
		if count > 0 && seq > count {
			if untilDirect {
				return fmt.Errorf("path: ping %s: no direct path after %d pings", peer, count)
			}
			return nil
		}
		res, err := m.pingOnce(ctx, peer, seq, untilDirect)
		if err != nil {
			return err
		}
		if each != nil {
			each(res)
		}
		if untilDirect && res.Err == nil && (res.Kind == KindLAN || res.Kind == KindDirect) {
			return nil
		}
		if count > 0 && seq == count {
			continue
		}
		if !sleepCtx(ctx, m.t.ping) {
			return fmt.Errorf("path: ping %s: %w", peer, ctx.Err())
		}
	}
}

var errNoPong = errors.New("no pong")

// pingOnce sends one PING over peer's chosen path and waits for its PONG.
func (m *Manager) pingOnce(ctx context.Context, peer string, seq int, untilDirect bool) (PingResult, error) {
	done := make(chan pongInfo, 1)
	now := time.Now()
	m.mu.Lock()
	if !m.started || m.closed {
		m.mu.Unlock()
		return PingResult{}, fmt.Errorf("path: ping %s: manager not running", peer)
	}
	p := m.byName[peer]
	if p == nil {
		m.mu.Unlock()
		return PingResult{}, fmt.Errorf("path: ping %s: unknown peer", peer)
	}
	c := p.chosen
	if c == nil {
		m.mu.Unlock()
		return PingResult{Seq: seq, Kind: KindNone, Err: errors.New("no path")}, nil
	}
	res := PingResult{Seq: seq, Kind: c.kind(), Addr: c.addr.String()}
	id := m.sendProbeLocked(p, c, now, false, done)
	if untilDirect && c.src == srcRelay {
		m.maybeRequestPunchLocked(p, now, seq == 1)
	}
	m.mu.Unlock()
	if id == 0 {
		res.Err = errors.New("send failed")
		return res, nil
	}
	timer := time.NewTimer(m.t.probe)
	defer timer.Stop()
	select {
	case pong := <-done:
		res.RTT = pong.rtt
		return res, nil
	case <-timer.C:
		res.Err = errNoPong
	case <-ctx.Done():
		res.Err = ctx.Err()
	}
	m.mu.Lock()
	delete(m.txs, id)
	m.mu.Unlock()
	if ctx.Err() != nil {
		return res, fmt.Errorf("path: ping %s: %w", peer, ctx.Err())
	}
	return res, nil
}
