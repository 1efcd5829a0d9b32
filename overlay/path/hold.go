package path

import (
	"bytes"
	"fmt"
	"net/netip"
	"sync"
	"time"
)

// Holding the first handshake (see the package doc, "First packets"). wireguard-go sends a
// handshake initiation as soon as it has a packet for a peer without a session, and sends no
// other for RekeyTimeout (5 s) even when that one went nowhere: to no endpoint at all ("no known
// endpoint for peer"), to a guess that does not answer, or to a peer that does not know this node
// yet. Its data packets wait in its staged queue meanwhile, so the first TCP SYN waited 5 s.
//
// So until a path to a peer answered, the Manager gives wireguard-go the peer's hold endpoint
// 127.3.0.H:L (a synthetic address of no relay: H<<16|L is the peer's hold ID). The Bind keeps
// the last initiation sent there instead of sending it, and the Manager releases it to the path
// once one answers: the peer, which just answered a probe, knows this node, and the handshake
// completes one round trip later; wireguard-go then sends its staged packets. Of two nodes, the
// one with the lower key releases at once and the other waits crossWait for a handshake from the
// peer first: two initiations that cross invalidate each other and both sides wait 5 s.

// wgRekeyTimeout is wireguard-go's RekeyTimeout: an initiation older than this has been replaced.
const wgRekeyTimeout = 5 * time.Second

// maxHeld bounds the initiations held at once (one per peer waiting for a path: 148 bytes each);
// an initiation beyond it is dropped and counted, as before holding existed.
const maxHeld = 4096

// holdPrefix holds every hold endpoint: the synthetic addresses with relay byte 0.
var holdPrefix = netip.PrefixFrom(netip.AddrFrom4([4]byte{127, 3, 0, 0}), 24)

// maxHoldID is the largest hold ID a hold endpoint can name.
const maxHoldID = 1<<24 - 1

// HoldEndpoint returns the hold endpoint of hold ID id (see hold.go).
func HoldEndpoint(id uint32) netip.AddrPort {
	id &= maxHoldID
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 3, 0, byte(id >> 16)}), uint16(id))
}

// heldInit is one held handshake initiation.
type heldInit struct {
	pkt [wgSizeInitiation]byte
	at  time.Time
}

// holdTable holds the initiations sent to hold endpoints. mu guards all following fields.
type holdTable struct {
	mu   sync.Mutex
	held map[netip.AddrPort]*heldInit
}

// hold keeps the last handshake initiation of bufs for the hold endpoint to; every other datagram
// is dropped and counted (wireguard-go sends nothing else to a peer without a session).
func (b *Bind) hold(bufs [][]byte, to netip.AddrPort) error {
	var last []byte
	for _, p := range bufs {
		if len(p) == wgSizeInitiation && isWireGuard(p) && p[0] == wgTypeInitiation {
			last = p
		} else {
			b.heldDropped.Add(1)
		}
	}
	if last == nil {
		return nil
	}
	now := time.Now()
	h := &b.holds
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.held == nil {
		h.held = make(map[netip.AddrPort]*heldInit)
	}
	e := h.held[to]
	if e == nil {
		if len(h.held) >= maxHeld {
			for a, old := range h.held {
				if now.Sub(old.at) >= wgRekeyTimeout {
					delete(h.held, a)
				}
			}
		}
		if len(h.held) >= maxHeld {
			b.heldDropped.Add(1)
			return nil
		}
		e = &heldInit{}
		h.held[to] = e
	}
	copy(e.pkt[:], last)
	e.at = now
	b.heldIn.Add(1)
	return nil
}

// takeHeld removes the initiation held for the hold endpoint from and returns it, if one is held
// and younger than RekeyTimeout.
func (b *Bind) takeHeld(from netip.AddrPort) ([]byte, bool) {
	h := &b.holds
	h.mu.Lock()
	e := h.held[from]
	delete(h.held, from)
	h.mu.Unlock()
	if e == nil {
		return nil, false
	}
	if time.Since(e.at) >= wgRekeyTimeout {
		b.heldDropped.Add(1)
		return nil, false
	}
	return e.pkt[:], true
}

// dropHeld forgets the initiation held for from, counting it dropped.
func (b *Bind) dropHeld(from netip.AddrPort) {
	if _, ok := b.takeHeld(from); ok {
		b.heldDropped.Add(1)
	}
}

// releaseHeld sends the initiation held for the hold endpoint from to the path to (a real
// endpoint or a relay's synthetic one). It reports whether one was sent.
func (b *Bind) releaseHeld(from, to netip.AddrPort) (bool, error) {
	pkt, ok := b.takeHeld(from)
	if !ok {
		return false, nil
	}
	if err := b.sendTo([][]byte{pkt}, to); err != nil {
		b.heldDropped.Add(1)
		return false, fmt.Errorf("path: release held initiation to %s: %w", to, err)
	}
	b.heldReleased.Add(1)
	return true, nil
}

// holdingLocked reports whether p's endpoint is still its hold endpoint: no path of p answered
// yet and holdMax has not passed since p appeared (after that, the best guess is applied as
// before holding existed, and the held initiation released to it).
func (m *Manager) holdingLocked(p *peerState, now time.Time) bool {
	return !p.real && (p.chosen == nil || !p.chosen.alive) && now.Sub(p.added) < m.t.holdMax
}

// appliedLocked records that wireguard-go now uses to for p, and, for the first endpoint that is
// not the hold endpoint, releases the initiation held for p: at once from the node with the
// lower key, after crossWait from the other (see hold.go).
func (m *Manager) appliedLocked(p *peerState, to netip.AddrPort, kind Kind, now time.Time) {
	p.applied, p.appliedKind = to, kind
	if to == p.hold || p.real {
		return
	}
	p.real = true
	if bytes.Compare(m.cfg.PublicKey[:], p.info.Key[:]) < 0 {
		m.releaseLocked(p, to)
		return
	}
	var rtt time.Duration
	if c := p.find(to); c != nil {
		rtt = c.rtt
	}
	p.releaseTo, p.releaseAt = to, now.Add(min(max(4*rtt, m.t.crossWaitMin), m.t.crossWaitMax))
}

// releaseDueLocked carries out p's delayed release when it falls due: the held initiation is
// dropped when the peer sent anything from one of its addresses meanwhile (it initiated: a second
// initiation would cross its own), and released otherwise. It returns when the release falls due
// (zero: none waits).
func (m *Manager) releaseDueLocked(p *peerState, now time.Time) time.Time {
	if p.releaseAt.IsZero() {
		return time.Time{}
	}
	if now.Before(p.releaseAt) {
		return p.releaseAt
	}
	p.releaseAt = time.Time{}
	for _, c := range p.cands {
		if a := m.watched[c.addr]; a != nil && a.heard.Load() {
			m.bind.dropHeld(p.hold)
			m.log.Debug("held initiation dropped: the peer initiated", "peer", p.info.Name)
			return time.Time{}
		}
	}
	m.releaseLocked(p, p.releaseTo)
	return time.Time{}
}

func (m *Manager) releaseLocked(p *peerState, to netip.AddrPort) {
	sent, err := m.bind.releaseHeld(p.hold, to)
	switch {
	case err != nil:
		m.log.Debug("release held initiation", "peer", p.info.Name, "to", to, "err", err)
	case sent:
		m.log.Debug("held initiation released", "peer", p.info.Name, "to", to)
	}
}

// nextHoldLocked returns a new hold endpoint (hold IDs whose port would be 0 are skipped).
func (m *Manager) nextHoldLocked() netip.AddrPort {
	for {
		m.nextHold = (m.nextHold + 1) & maxHoldID
		if m.nextHold&0xffff != 0 {
			return HoldEndpoint(m.nextHold)
		}
	}
}
