package path

import (
	"errors"
	"fmt"
	"net/netip"

	"golang.zx2c4.com/wireguard/conn"

	"github.com/edgewire/edgewire/relay"
)

// Synthetic endpoints (see the package doc): 127.3.R.H:L names node ID (H<<16 | L) on relay R-1.
const (
	// MaxRelays is the number of relay indexes a synthetic endpoint can name (0..254).
	MaxRelays = 255
	// MaxRelayNodeID is the largest node ID a synthetic endpoint can name (24 bits).
	MaxRelayNodeID = 1<<24 - 1
)

// syntheticPrefix holds every synthetic endpoint address.
var syntheticPrefix = netip.PrefixFrom(netip.AddrFrom4([4]byte{127, 3, 0, 0}), 16)

// errNoRelay is returned by Send to a synthetic endpoint whose relay has no session.
var errNoRelay = errors.New("no session with the endpoint's relay")

// SyntheticEndpoint returns the endpoint wireguard-go and UAPI see for node id on relay index r,
// and false when r or id is out of range (see the package doc).
func SyntheticEndpoint(r int, id uint32) (netip.AddrPort, bool) {
	if r < 0 || r >= MaxRelays || id > MaxRelayNodeID {
		return netip.AddrPort{}, false
	}
	a := netip.AddrFrom4([4]byte{127, 3, byte(r + 1), byte(id >> 16)})
	return netip.AddrPortFrom(a, uint16(id)), true
}

// ParseSynthetic is the inverse of SyntheticEndpoint.
func ParseSynthetic(ap netip.AddrPort) (r int, id uint32, ok bool) {
	a := ap.Addr().Unmap()
	if !syntheticPrefix.Contains(a) {
		return 0, 0, false
	}
	b := a.As4()
	if b[2] == 0 {
		return 0, 0, false
	}
	return int(b[2]) - 1, uint32(b[3])<<16 | uint32(ap.Port()), true
}

// relayTable is an immutable snapshot of the relays the Bind wraps DATA frames for; the Manager
// replaces it whole (Bind.relays).
type relayTable struct {
	byAddr map[netip.AddrPort]int // relay UDP address → relay index
	relays [MaxRelays]relayConn
}

type relayConn struct {
	addr netip.AddrPort
	ep   conn.Endpoint // of the inner Bind, for addr
}

// setRelays installs the relays' UDP addresses by index (invalid: none).
func (b *Bind) setRelays(addrs map[int]netip.AddrPort) error {
	t := &relayTable{byAddr: make(map[netip.AddrPort]int, len(addrs))}
	for r, a := range addrs {
		if r < 0 || r >= MaxRelays {
			return fmt.Errorf("path: relay index %d out of range 0..%d", r, MaxRelays-1)
		}
		a = netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
		ep, err := b.inner.ParseEndpoint(a.String())
		if err != nil {
			return fmt.Errorf("path: relay %d address %s: %w", r, a, err)
		}
		t.byAddr[a] = r
		t.relays[r] = relayConn{addr: a, ep: ep}
	}
	b.relays.Store(t)
	return nil
}

// relayOf returns the relay index whose UDP address is from.
func (b *Bind) relayOf(from netip.AddrPort) (int, bool) {
	t := b.relays.Load()
	if t == nil {
		return 0, false
	}
	r, ok := t.byAddr[from]
	return r, ok
}

// syntheticOf returns the synthetic address ep names, if it names one, without allocating for a
// StdNetEndpoint.
func syntheticOf(ep conn.Endpoint) (netip.AddrPort, bool) {
	if ep == nil || !syntheticPrefix.Contains(ep.DstIP().Unmap()) {
		return netip.AddrPort{}, false
	}
	if std, ok := ep.(*conn.StdNetEndpoint); ok {
		return netip.AddrPortFrom(std.Addr().Unmap(), std.Port()), true
	}
	ap, err := netip.ParseAddrPort(ep.DstToString())
	if err != nil {
		return netip.AddrPort{}, false
	}
	return ap, true
}

// relayBatch is a pooled batch of DATA frames, laid out back to back in buf.
type relayBatch struct {
	buf  []byte
	bufs [][]byte
}

// sendRelayed wraps each datagram in a DATA frame for the node that synthetic address to names
// and sends the batch to its relay from the WireGuard socket, in one Send.
//
// The frames lie back to back in one buffer, and each frame's slice keeps the capacity that runs
// on over the frames after it. That is what wireguard-go's StdNetBind needs to send the batch with
// UDP GSO: it coalesces a batch for one endpoint by appending each datagram to the previous one
// when that one has room (conn.coalesceMessages), which here finds the next frame already in place
// (a copy onto itself). Without the room, every frame would be a datagram of its own, sendmmsg
// but no GSO, and a relayed burst would cross the node's stack once per datagram instead of once.
func (b *Bind) sendRelayed(bufs [][]byte, to netip.AddrPort) error {
	r, id, ok := ParseSynthetic(to)
	if !ok {
		return fmt.Errorf("path: %s is not a relay endpoint", to)
	}
	t := b.relays.Load()
	if t == nil || !t.relays[r].addr.IsValid() {
		b.relayedOutDropped.Add(uint64(len(bufs)))
		return fmt.Errorf("path: send to relay %d: %w", r, errNoRelay)
	}
	batch, _ := b.batchPool.Get().(*relayBatch)
	if batch == nil {
		batch = &relayBatch{}
	}
	total := 0
	for _, p := range bufs {
		total += relay.DataHeaderLen + len(p)
	}
	if cap(batch.buf) < total {
		batch.buf = make([]byte, 0, total)
	}
	buf, out := batch.buf[:0], batch.bufs[:0]
	for _, p := range bufs {
		start := len(buf)
		buf = append(relay.AppendDataHeader(buf, id), p...)
		out = append(out, buf[start:]) // capacity to the end of buf: see above
	}
	err := b.inner.Send(out, t.relays[r].ep)
	batch.buf, batch.bufs = buf[:0], out[:0]
	b.batchPool.Put(batch)
	if err != nil {
		return err
	}
	b.relayedOut.Add(uint64(len(bufs)))
	return nil
}

// unwrapRelayed handles a DATA frame that arrived from relay r in slot i of a receive batch. A
// WireGuard payload is moved to the start of the buffer and the slot's endpoint becomes the
// source node's synthetic endpoint (true: leave it in the batch). Any other payload is handed to
// the packet handler from the synthetic endpoint. Malformed frames are dropped and counted.
func (b *Bind) unwrapRelayed(r int, bufs [][]byte, sizes []int, eps []conn.Endpoint, i int) bool {
	id, payload, err := relay.ParseData(bufs[i][:sizes[i]])
	synth, ok := SyntheticEndpoint(r, id)
	if err != nil || !ok || len(payload) == 0 {
		b.relayedInDropped.Add(1)
		sizes[i] = 0
		return false
	}
	if isWireGuard(payload) {
		std, isStd := eps[i].(*conn.StdNetEndpoint)
		if !isStd || std == nil {
			// Only a StdNetEndpoint, fresh per datagram, can be rewritten without allocating.
			b.relayedInDropped.Add(1)
			sizes[i] = 0
			return false
		}
		sizes[i] = copy(bufs[i], payload)
		std.ClearSrc()
		std.AddrPort = synth
		w := b.watch.Load()
		if w != nil {
			w.noteReceive(synth)
		}
		if pref := b.preferred.Load(); pref != nil {
			// This node chose another path to the peer (direct, or another relay): a datagram the
			// peer sent through this relay must not make wireguard-go roam here (see
			// Manager.updatePreferredLocked). When this node chose a direct path, that the peer
			// sends here may mean it found that path dead: the Manager checks it at once. (Two
			// nodes on different relays is no sign of anything.)
			if chosen, ok := (*pref)[synth]; ok {
				std.AddrPort = chosen
				if w != nil && !syntheticPrefix.Contains(chosen.Addr()) {
					b.noteElsewhere(w, chosen)
				}
			}
		}
		b.relayedIn.Add(1)
		return true
	}
	sizes[i] = 0
	b.relayedIn.Add(1)
	h := b.handler()
	if h == nil {
		b.otherDropped.Add(1)
		return false
	}
	h(payload, synth)
	return false
}
