package pathtest

import (
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/edgewire/edgewire/relay"
)

// Relay is a datagram relay on the network: it answers BIND frames of registered nodes with
// BINDACK and forwards DATA frames between bound nodes, as mesh-relay's UDP socket does.
type Relay struct {
	conn *PacketConn
	wg   sync.WaitGroup

	mu    sync.Mutex // guards all following fields
	keys  map[uint32][]byte
	bound map[uint32]netip.AddrPort
	byAdr map[netip.AddrPort]uint32

	// Forwarded counts relayed DATA frames; Refused counts frames refused (bad MAC, unbound,
	// unknown destination, malformed).
	Forwarded, Refused atomic.Uint64
}

// NewRelay starts a relay listening on addr (public).
func (n *Network) NewRelay(addr netip.AddrPort) (*Relay, error) {
	c, err := n.ListenPacket(addr, nil)
	if err != nil {
		return nil, err
	}
	r := &Relay{conn: c, keys: map[uint32][]byte{}, bound: map[uint32]netip.AddrPort{}, byAdr: map[netip.AddrPort]uint32{}}
	r.wg.Add(1)
	go r.serve()
	return r, nil
}

// Register adds node id with its session key.
func (r *Relay) Register(id uint32, key []byte) {
	r.mu.Lock()
	r.keys[id] = key
	r.mu.Unlock()
}

// Addr is the relay's UDP address.
func (r *Relay) Addr() netip.AddrPort { return r.conn.Addr() }

// Bound returns the address node id is bound at.
func (r *Relay) Bound(id uint32) (netip.AddrPort, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.bound[id]
	return a, ok
}

// Close stops the relay and waits for it.
func (r *Relay) Close() error {
	err := r.conn.Close()
	r.wg.Wait()
	return err
}

func (r *Relay) serve() {
	defer r.wg.Done()
	buf := make([]byte, 65536)
	for {
		n, from, err := r.conn.ReadFrom(buf)
		if err != nil {
			return
		}
		pkt := buf[:n]
		typ, _ := relay.IsFrame(pkt)
		switch typ {
		case relay.FrameBind:
			r.bind(pkt, from)
		case relay.FrameData:
			r.forward(pkt, from)
		default:
			r.Refused.Add(1)
		}
	}
}

func (r *Relay) bind(pkt []byte, from netip.AddrPort) {
	id, nonce, err := relay.ParseBind(pkt)
	r.mu.Lock()
	key := r.keys[id]
	ok := err == nil && key != nil && relay.VerifyBind(pkt, key)
	if ok {
		if old, had := r.bound[id]; had {
			delete(r.byAdr, old)
		}
		r.bound[id] = from
		r.byAdr[from] = id
	}
	r.mu.Unlock()
	if !ok {
		r.Refused.Add(1)
		return
	}
	_ = r.conn.WriteTo(relay.AppendBindAck(nil, nonce, from), from)
}

func (r *Relay) forward(pkt []byte, from netip.AddrPort) {
	dst, payload, err := relay.ParseData(pkt)
	r.mu.Lock()
	src, srcOK := r.byAdr[from]
	to, dstOK := r.bound[dst]
	r.mu.Unlock()
	if err != nil || !srcOK || !dstOK {
		r.Refused.Add(1)
		return
	}
	out := append(relay.AppendDataHeader(make([]byte, 0, relay.DataHeaderLen+len(payload)), src), payload...)
	_ = r.conn.WriteTo(out, to)
	r.Forwarded.Add(1)
}
