// Package pathtest is an in-memory internet for tests of overlay/path: sockets that are
// wireguard-go conn.Binds (or plain packet connections), NAT routers with programmable behaviour,
// a drop filter, and a datagram relay that speaks the relay package's UDP frames.
//
// A socket has an address; it sits on a LAN behind a NAT, or on the public internet (nat nil).
// Sockets behind the same NAT reach each other directly; a datagram leaving a NAT gets its source
// translated: an Easy NAT maps a socket to one public port whatever the destination
// (endpoint-independent), a Hard NAT to a new port per destination. Both filter inbound
// datagrams: only a remote the inside socket has sent to may answer through the mapping (as
// Linux conntrack does). There is no hairpin: a datagram to the own NAT's public address is
// dropped. Delivery is immediate and unordered queues are bounded (full: dropped and counted).
//
// A Bridge (bridge.go) joins the network to a real UDP service on this machine, such as a
// mesh-relay started in the test's process: the engine tests of package overlay run agents on
// this network with a real relay.
package pathtest

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/conn"
)

// NATKind is a NAT's mapping behaviour.
type NATKind int

// NAT kinds.
const (
	Easy NATKind = iota // endpoint-independent mapping (plain masquerade)
	Hard                // a new public port per destination (--random-fully)
)

// Network is the in-memory internet. Its methods are safe for concurrent use.
type Network struct {
	mu    sync.Mutex // guards all following fields
	socks map[netip.AddrPort]*socket
	nats  map[netip.Addr]*NAT
	drop  func(from, to netip.AddrPort) bool
	// alias maps an address to the address a datagram sent to it goes to instead (bridge.go).
	alias map[netip.AddrPort]netip.AddrPort

	// Dropped counts datagrams dropped: unroutable, filtered by a NAT, by the drop filter, or to
	// a full queue.
	Dropped atomic.Uint64
}

// NewNetwork returns an empty network.
func NewNetwork() *Network {
	return &Network{socks: make(map[netip.AddrPort]*socket), nats: make(map[netip.Addr]*NAT),
		alias: make(map[netip.AddrPort]netip.AddrPort)}
}

// NAT is a router with one public address.
type NAT struct {
	kind   NATKind
	public netip.Addr

	mu       sync.Mutex // guards all following fields
	nextPort uint16
	out      map[natKey]uint16
	in       map[uint16]*mapping
}

type natKey struct {
	inside netip.AddrPort
	dst    netip.AddrPort // Hard only
}

type mapping struct {
	inside  netip.AddrPort
	allowed map[netip.AddrPort]bool
}

// AddNAT adds a NAT router with the given public address.
func (n *Network) AddNAT(public netip.Addr, kind NATKind) *NAT {
	nat := &NAT{kind: kind, public: public, nextPort: 40000, out: map[natKey]uint16{}, in: map[uint16]*mapping{}}
	n.mu.Lock()
	n.nats[public] = nat
	n.mu.Unlock()
	return nat
}

// Public is the NAT's public address.
func (nat *NAT) Public() netip.Addr { return nat.public }

// translate maps an outgoing datagram's source and records that dst may answer.
func (nat *NAT) translate(inside, dst netip.AddrPort) netip.AddrPort {
	nat.mu.Lock()
	defer nat.mu.Unlock()
	k := natKey{inside: inside}
	if nat.kind == Hard {
		k.dst = dst
	}
	port, ok := nat.out[k]
	if !ok {
		port = nat.nextPort
		nat.nextPort++
		nat.out[k] = port
		nat.in[port] = &mapping{inside: inside, allowed: map[netip.AddrPort]bool{}}
	}
	nat.in[port].allowed[dst] = true
	return netip.AddrPortFrom(nat.public, port)
}

// inbound returns the inside address for a datagram from src to the NAT's port, if allowed.
func (nat *NAT) inbound(src netip.AddrPort, port uint16) (netip.AddrPort, bool) {
	nat.mu.Lock()
	defer nat.mu.Unlock()
	m := nat.in[port]
	if m == nil || !m.allowed[src] {
		return netip.AddrPort{}, false
	}
	return m.inside, true
}

// SetDrop installs a filter of datagrams as they cross the internet (after the sender's NAT,
// before the receiver's); it returns true to drop. nil removes it. Datagrams between sockets
// behind the same NAT are filtered with their private addresses.
func (n *Network) SetDrop(f func(from, to netip.AddrPort) bool) {
	n.mu.Lock()
	n.drop = f
	n.mu.Unlock()
}

type packet struct {
	b    []byte
	from netip.AddrPort
}

// socket is one bound address.
type socket struct {
	addr netip.AddrPort
	nat  *NAT
	q    chan packet
	done chan struct{}
	once sync.Once
}

func (s *socket) close() { s.once.Do(func() { close(s.done) }) }

// listen binds addr (port 0: the next free one from 20000) behind nat.
func (n *Network) listen(addr netip.AddrPort, nat *NAT) (*socket, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if addr.Port() == 0 {
		for p := uint16(20000); ; p++ {
			a := netip.AddrPortFrom(addr.Addr(), p)
			if n.socks[a] == nil {
				addr = a
				break
			}
		}
	}
	if n.socks[addr] != nil {
		return nil, fmt.Errorf("pathtest: listen %s: address in use", addr)
	}
	s := &socket{addr: addr, nat: nat, q: make(chan packet, 1024), done: make(chan struct{})}
	n.socks[addr] = s
	return s, nil
}

func (n *Network) unlisten(s *socket) {
	n.mu.Lock()
	if n.socks[s.addr] == s {
		delete(n.socks, s.addr)
	}
	n.mu.Unlock()
	s.close()
}

// send routes one datagram from s to dst.
func (n *Network) send(s *socket, b []byte, dst netip.AddrPort) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	n.mu.Lock()
	if to, ok := n.alias[dst]; ok {
		dst = to
	}
	drop := n.drop
	target := n.socks[dst]
	dstNAT := n.nats[dst.Addr()]
	n.mu.Unlock()
	from := s.addr
	var to *socket
	switch {
	case target != nil && target.nat == s.nat: // same LAN (or both public)
		to = target
	case target != nil && target.nat == nil: // out to a public host
		if s.nat != nil {
			from = s.nat.translate(s.addr, dst)
		}
		to = target
	case dstNAT != nil && dstNAT != s.nat: // to another NAT's public address
		if s.nat != nil {
			from = s.nat.translate(s.addr, dst)
		}
		inside, ok := dstNAT.inbound(from, dst.Port())
		if ok {
			n.mu.Lock()
			to = n.socks[inside]
			n.mu.Unlock()
		}
	}
	if to == nil || (drop != nil && drop(from, dst)) {
		n.Dropped.Add(1)
		return
	}
	select {
	case to.q <- packet{b: append([]byte(nil), b...), from: from}:
	default:
		n.Dropped.Add(1)
	}
}

// Bind is a conn.Bind on the in-memory network. Received datagrams carry a fresh
// *conn.StdNetEndpoint each, as conn.StdNetBind's do.
type Bind struct {
	net  *Network
	addr netip.Addr
	nat  *NAT

	mu   sync.Mutex // guards sock
	sock *socket
}

var _ conn.Bind = (*Bind)(nil)

// NewBind returns a closed Bind that will listen on addr behind nat (nil: public).
func (n *Network) NewBind(addr netip.Addr, nat *NAT) *Bind {
	return &Bind{net: n, addr: addr, nat: nat}
}

// Open binds the address on port (0: any).
func (b *Bind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.sock != nil {
		return nil, 0, conn.ErrBindAlreadyOpen
	}
	s, err := b.net.listen(netip.AddrPortFrom(b.addr, port), b.nat)
	if err != nil {
		return nil, 0, err
	}
	b.sock = s
	recv := func(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		var p packet
		select {
		case <-s.done:
			return 0, net.ErrClosed
		case p = <-s.q:
		}
		n := 0
		for {
			sizes[n] = copy(bufs[n], p.b)
			eps[n] = &conn.StdNetEndpoint{AddrPort: p.from}
			n++
			if n == len(bufs) {
				return n, nil
			}
			select {
			case p = <-s.q:
			default:
				return n, nil
			}
		}
	}
	return []conn.ReceiveFunc{recv}, s.addr.Port(), nil
}

// Close unbinds; the receive function returns net.ErrClosed.
func (b *Bind) Close() error {
	b.mu.Lock()
	s := b.sock
	b.sock = nil
	b.mu.Unlock()
	if s != nil {
		b.net.unlisten(s)
	}
	return nil
}

// Send sends each datagram to ep.
func (b *Bind) Send(bufs [][]byte, ep conn.Endpoint) error {
	b.mu.Lock()
	s := b.sock
	b.mu.Unlock()
	if s == nil {
		return net.ErrClosed
	}
	std, ok := ep.(*conn.StdNetEndpoint)
	if !ok {
		return fmt.Errorf("pathtest: endpoint %T", ep)
	}
	for _, buf := range bufs {
		b.net.send(s, buf, std.AddrPort)
	}
	return nil
}

// ParseEndpoint parses an IP:port.
func (b *Bind) ParseEndpoint(s string) (conn.Endpoint, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return nil, fmt.Errorf("pathtest: %w", err)
	}
	return &conn.StdNetEndpoint{AddrPort: ap}, nil
}

// SetMark does nothing.
func (b *Bind) SetMark(uint32) error { return nil }

// BatchSize is 16.
func (b *Bind) BatchSize() int { return 16 }

// PacketConn is a plain datagram socket on the network.
type PacketConn struct {
	net  *Network
	sock *socket
}

// ListenPacket binds addr behind nat (nil: public).
func (n *Network) ListenPacket(addr netip.AddrPort, nat *NAT) (*PacketConn, error) {
	s, err := n.listen(addr, nat)
	if err != nil {
		return nil, err
	}
	return &PacketConn{net: n, sock: s}, nil
}

// ReadFrom waits for a datagram; after Close it returns net.ErrClosed.
func (c *PacketConn) ReadFrom(b []byte) (int, netip.AddrPort, error) {
	select {
	case <-c.sock.done:
		return 0, netip.AddrPort{}, net.ErrClosed
	case p := <-c.sock.q:
		return copy(b, p.b), p.from, nil
	}
}

// WriteTo sends b to to.
func (c *PacketConn) WriteTo(b []byte, to netip.AddrPort) error {
	select {
	case <-c.sock.done:
		return net.ErrClosed
	default:
	}
	c.net.send(c.sock, b, to)
	return nil
}

// Addr is the bound address.
func (c *PacketConn) Addr() netip.AddrPort { return c.sock.addr }

// Close unbinds.
func (c *PacketConn) Close() error {
	c.net.unlisten(c.sock)
	return nil
}
