// Package proxytest provides a fake proxy.EndpointDialer that records which endpoints were dialled
// and can make chosen endpoints refuse or black-hole dials, for tests of the proxy and of the code
// that wires it.
package proxytest

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/proxy"
)

var _ proxy.EndpointDialer = (*Dialer)(nil)

// Dial is one recorded call of DialEndpoint.
type Dial struct {
	Proto discovery.Protocol
	Node  string // the endpoint's NodeName
	Addr  netip.AddrPort
	Err   error // what the dial returned
}

// Behaviour is how the fake answers dials to an address.
type Behaviour int

// Behaviours of an address.
const (
	// Answer: the dial succeeds (the default).
	Answer Behaviour = iota
	// Refuse: the dial fails at once with ECONNREFUSED.
	Refuse
	// BlackHole: the dial blocks until its context is done and fails with the context's error.
	BlackHole
)

// Dialer is a fake proxy.EndpointDialer. Its zero value answers every dial; it is safe for
// concurrent use.
type Dialer struct {
	mu        sync.Mutex // guards all following fields
	behaviour map[netip.AddrPort]Behaviour
	dials     []Dial
	noRecord  bool
}

// Set makes dials to addr behave as b from now on.
func (d *Dialer) Set(addr netip.AddrPort, b Behaviour) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.behaviour == nil {
		d.behaviour = map[netip.AddrPort]Behaviour{}
	}
	d.behaviour[addr] = b
}

// DontRecord stops recording dials (for benchmarks).
func (d *Dialer) DontRecord() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.noRecord = true
}

// Dials returns the recorded dials, oldest first, and forgets them.
func (d *Dialer) Dials() []Dial {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := d.dials
	d.dials = nil
	return out
}

// DialEndpoint implements proxy.EndpointDialer. A successful dial returns a Conn.
func (d *Dialer) DialEndpoint(ctx context.Context, proto discovery.Protocol, ep *discovery.Endpoint, addr netip.AddrPort) (net.Conn, error) {
	d.mu.Lock()
	b := d.behaviour[addr]
	d.mu.Unlock()

	var (
		conn net.Conn
		err  error
	)
	switch b {
	case Refuse:
		err = fmt.Errorf("fake dial %s: %w", addr, syscall.ECONNREFUSED)
	case BlackHole:
		<-ctx.Done()
		err = fmt.Errorf("fake dial %s: %w", addr, ctx.Err())
	default:
		conn = &Conn{Remote: addr}
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.noRecord {
		d.dials = append(d.dials, Dial{Proto: proto, Node: ep.NodeName, Addr: addr, Err: err})
	}
	return conn, err
}

// Conn is the connection a fake dial returns: reads fail with net.ErrClosed, writes are discarded.
// It only exists to be told apart by its Remote address.
type Conn struct {
	Remote netip.AddrPort
}

func (c *Conn) Read([]byte) (int, error)         { return 0, net.ErrClosed }
func (c *Conn) Write(b []byte) (int, error)      { return len(b), nil }
func (c *Conn) Close() error                     { return nil }
func (c *Conn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *Conn) RemoteAddr() net.Addr             { return net.TCPAddrFromAddrPort(c.Remote) }
func (c *Conn) SetDeadline(time.Time) error      { return nil }
func (c *Conn) SetReadDeadline(time.Time) error  { return nil }
func (c *Conn) SetWriteDeadline(time.Time) error { return nil }
