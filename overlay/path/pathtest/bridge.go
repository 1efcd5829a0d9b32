package pathtest

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
)

// Bridge joins the network to a real UDP service on this machine (mesh-relay's datagram socket, in
// the engine tests of package overlay, whose control connections are real TCP). On the network it
// is a public host at the address it was made with; each source on the network that sends to it
// gets a real UDP socket of its own on 127.0.0.1, from which its datagrams go to the service and
// on which the service's answers come back, delivered to the source from the Bridge's address.
//
// The service sees each source as its real socket's address, and tells others about it (a relay
// reports a node's reflexive address). So that those addresses work on the network, each real
// socket's address is an alias of its source: a datagram sent to it on the network goes to the
// source's address instead, through the source's NAT and its filter, as if the service had seen
// the source's own public address.
//
// A Bridge holds at most its limit of real sockets; datagrams from further sources are dropped
// and counted.
type Bridge struct {
	net    *Network
	sock   *socket
	target *net.UDPAddr
	limit  int
	wg     sync.WaitGroup

	mu    sync.Mutex // guards all following fields
	conns map[netip.AddrPort]*net.UDPConn
	done  bool

	// Dropped counts datagrams dropped: over the limit of sources, or failed real sends.
	Dropped atomic.Uint64
}

// NewBridge puts a Bridge at addr (public) on the network that forwards to the real UDP address
// target, with at most limit sources (each one real socket and goroutine).
func (n *Network) NewBridge(addr, target netip.AddrPort, limit int) (*Bridge, error) {
	if limit < 1 {
		return nil, errors.New("pathtest: bridge limit must be at least 1")
	}
	s, err := n.listen(addr, nil)
	if err != nil {
		return nil, err
	}
	b := &Bridge{net: n, sock: s, target: net.UDPAddrFromAddrPort(target), limit: limit,
		conns: make(map[netip.AddrPort]*net.UDPConn)}
	b.wg.Add(1)
	go b.outbound()
	return b, nil
}

// Sources is how many sources the Bridge holds a real socket for.
func (b *Bridge) Sources() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.conns)
}

// Close removes the Bridge from the network, closes its real sockets and waits for its goroutines.
func (b *Bridge) Close() error {
	b.net.unlisten(b.sock)
	b.mu.Lock()
	b.done = true
	conns := b.conns
	b.conns = map[netip.AddrPort]*net.UDPConn{}
	b.mu.Unlock()
	var errs []error
	b.net.mu.Lock()
	for _, c := range conns {
		delete(b.net.alias, c.LocalAddr().(*net.UDPAddr).AddrPort())
	}
	b.net.mu.Unlock()
	for _, c := range conns {
		errs = append(errs, c.Close())
	}
	b.wg.Wait()
	return errors.Join(errs...)
}

// outbound sends what the network sends to the Bridge on to the service, each source from its own
// real socket.
func (b *Bridge) outbound() {
	defer b.wg.Done()
	for {
		var p packet
		select {
		case <-b.sock.done:
			return
		case p = <-b.sock.q:
		}
		c := b.connFor(p.from)
		if c == nil {
			b.Dropped.Add(1)
			continue
		}
		if _, err := c.WriteToUDP(p.b, b.target); err != nil {
			b.Dropped.Add(1)
		}
	}
}

// connFor returns the real socket of source src, opening it (and its alias and reader) on first
// use; nil when the Bridge is full or closed or the socket cannot be opened.
func (b *Bridge) connFor(src netip.AddrPort) *net.UDPConn {
	b.mu.Lock()
	defer b.mu.Unlock()
	if c := b.conns[src]; c != nil {
		return c
	}
	if b.done || len(b.conns) >= b.limit {
		return nil
	}
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil
	}
	b.conns[src] = c
	real := c.LocalAddr().(*net.UDPAddr).AddrPort()
	b.net.mu.Lock()
	b.net.alias[real] = src
	b.net.mu.Unlock()
	b.wg.Add(1)
	go b.inbound(c, src)
	return c
}

// inbound delivers the service's answers on c to src, from the Bridge's address.
func (b *Bridge) inbound(c *net.UDPConn, src netip.AddrPort) {
	defer b.wg.Done()
	buf := make([]byte, 65536)
	for {
		n, _, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		b.net.send(b.sock, buf[:n], src)
	}
}

// String describes the Bridge for logs.
func (b *Bridge) String() string {
	return fmt.Sprintf("bridge %s -> %s", b.sock.addr, b.target)
}
