// Package flows owns what the agent's two flow terminators, the service netstack (overlay/netstack)
// and the forward listener (overlay/forward), share to keep flows within bounds: the flow table that
// caps flows per client and in total (Table), the file-descriptor budget their default caps are cut
// from (FDLimit, Share), and the copy that takes a buffer only while a flow has data to move (Copy,
// WaitReadable, Buffers), so that an idle flow holds no buffer and no pipe.
//
// # File descriptors
//
// Every flow costs descriptors: on the client node one upstream socket per netstack flow, TCP or UDP;
// on the endpoint node two sockets per forwarded TCP flow (the peer's and the target's) and one per
// forwarded UDP flow. An agent is both at once, so the default caps are shares of the soft
// RLIMIT_NOFILE in force when the component is built (N, 20,000 in the load goals):
//
//	netstack TCP  N/5   1 fd each   (4,000 flows, 4,000 fds at N = 20,000)
//	netstack UDP  N/10  1 fd each   (2,000 flows, 2,000 fds)
//	forward TCP   N/5   2 fds each  (4,000 flows, 8,000 fds)
//	forward UDP   N/10  1 fd each   (2,000 flows, 2,000 fds)
//
// which is 80% of N at worst, leaving a fifth for everything else (WireGuard, the TUN, DNS, the
// control socket, forward spares). Each share is clamped between a floor, so a tiny limit still
// serves, and a ceiling set by memory rather than descriptors (a flow at rest costs heap, goroutine
// stacks and kernel socket memory), so a limit of a million does not invite a million flows. Per-client
// caps are a fraction of the total (a quarter in the netstack, where a client is an application's
// source address; a half in the forward listener, where a client is a whole peer node), so one
// client at its cap leaves room for the others.
//
// Copying a TCP flow in user space with a pooled buffer, rather than with splice(2), is deliberate:
// Go's splice (internal/poll, behind (*net.TCPConn).ReadFrom) holds a pipe (two descriptors, 1 MiB
// of capacity) for as long as it waits for data, which is for the life of an idle flow, and parks
// it afterwards in a sync.Pool that only the garbage collector empties, minutes later on an idle
// process. That tripled the descriptors of a forwarded flow and kept them open after the flows
// ended.
package flows

import (
	"errors"
	"net/netip"
	"sync"
	"syscall"
	"time"
)

// Errors of Table.Acquire; test them with errors.Is.
var (
	// ErrClientCap: the client already has its cap of flows.
	ErrClientCap = errors.New("per-client flow cap reached")
	// ErrTotalCap: the table holds its total cap of flows.
	ErrTotalCap = errors.New("total flow cap reached")
)

// FallbackFDLimit is what FDLimit returns when the limit cannot be read or is unlimited.
const FallbackFDLimit = 1024

// FDLimit returns the soft RLIMIT_NOFILE in force, the budget the default caps are cut from; it
// returns FallbackFDLimit when the limit cannot be read, and caps an unlimited one at 1<<20.
func FDLimit() int {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Cur == 0 {
		return FallbackFDLimit
	}
	return int(min(rl.Cur, 1<<20))
}

// Share returns limit/div clamped to [lo, hi].
func Share(limit, div, lo, hi int) int {
	return min(max(limit/div, lo), hi)
}

// Flow is what a Table holds: something comparable that tells when it last carried a packet.
type Flow interface {
	comparable
	// LastActive returns the UnixNano time of the flow's last packet, either way.
	LastActive() int64
}

// Counted is the Flow of a Table that only counts slots (Acquire and Release), with no flow to
// attach or evict.
type Counted struct{}

// LastActive implements Flow.
func (Counted) LastActive() int64 { return 0 }

// Table counts flows per client and in total against caps, and holds the established ones so that
// the least recently active flow of a client can be evicted. A slot is taken with Acquire (a flow
// being set up: dialling counts, since it already holds a descriptor) and either given back with
// Release or given to the established flow with Attach, whose Detach gives it back. It is safe for
// concurrent use; its size is bounded by the total cap.
type Table[F Flow] struct {
	perClient, total int

	// mu guards all following fields.
	mu      sync.Mutex
	n       int
	clients map[netip.Addr]*client[F]
}

// client is one client's share of a Table.
type client[F Flow] struct {
	n     int            // slots held: flows being set up and established ones
	flows map[F]struct{} // the established flows, which Evict may pick
	// noEvictBefore is a time (UnixNano) before which no established flow can be idle enough to
	// evict, found by the last Evict that found none: Evict answers at once until then.
	noEvictBefore int64
}

// NewTable returns a Table of at most perClient flows per client and total flows in all; each
// is at least 1.
func NewTable[F Flow](perClient, total int) *Table[F] {
	total = max(total, 1)
	return &Table[F]{
		perClient: min(max(perClient, 1), total),
		total:     total,
		clients:   make(map[netip.Addr]*client[F]),
	}
}

// Caps returns the per-client and total caps.
func (t *Table[F]) Caps() (perClient, total int) { return t.perClient, t.total }

// Len returns the number of slots held.
func (t *Table[F]) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.n
}

// Clients returns the number of clients holding slots.
func (t *Table[F]) Clients() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.clients)
}

// ClientLen returns the number of slots c holds.
func (t *Table[F]) ClientLen(c netip.Addr) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e := t.clients[c.Unmap()]; e != nil {
		return e.n
	}
	return 0
}

// Acquire takes a slot for a flow of client c, or returns ErrClientCap or ErrTotalCap. The client's
// cap is checked first, so a client at its own cap is told so even when the table is full.
func (t *Table[F]) Acquire(c netip.Addr) error {
	c = c.Unmap()
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.clients[c]
	if e != nil && e.n >= t.perClient {
		return ErrClientCap
	}
	if t.n >= t.total {
		return ErrTotalCap
	}
	if e == nil {
		e = &client[F]{}
		t.clients[c] = e
	}
	e.n++
	t.n++
	return nil
}

// Release gives back a slot of c that was never attached to a flow.
func (t *Table[F]) Release(c netip.Addr) {
	c = c.Unmap()
	t.mu.Lock()
	defer t.mu.Unlock()
	t.releaseLocked(c, t.clients[c])
}

func (t *Table[F]) releaseLocked(c netip.Addr, e *client[F]) {
	if e == nil || e.n == 0 {
		return
	}
	e.n--
	t.n--
	if e.n == 0 {
		delete(t.clients, c)
	}
}

// Attach makes f, a flow of c, the holder of a slot c acquired.
func (t *Table[F]) Attach(c netip.Addr, f F) {
	c = c.Unmap()
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.clients[c]
	if e == nil {
		return
	}
	if e.flows == nil {
		e.flows = make(map[F]struct{})
	}
	e.flows[f] = struct{}{}
}

// Detach gives back the slot of f, an attached flow of c, and reports whether it held one: false
// when Evict already took it.
func (t *Table[F]) Detach(c netip.Addr, f F) bool {
	c = c.Unmap()
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.clients[c]
	if e == nil {
		return false
	}
	if _, ok := e.flows[f]; !ok {
		return false
	}
	delete(e.flows, f)
	t.releaseLocked(c, e)
	return true
}

// Evict detaches and returns the least recently active established flow of c, provided it has been
// idle for at least minIdle at now (both UnixNano); the caller closes it. The slot it held is free at
// once. It scans the client's flows, at most the per-client cap of them, and not again until one of
// them can have become idle enough.
func (t *Table[F]) Evict(c netip.Addr, now int64, minIdle time.Duration) (F, bool) {
	var none F
	c = c.Unmap()
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.clients[c]
	if e == nil || len(e.flows) == 0 || now < e.noEvictBefore {
		return none, false
	}
	var oldest F
	var oldestAt int64
	found := false
	for f := range e.flows {
		if at := f.LastActive(); !found || at < oldestAt {
			oldest, oldestAt, found = f, at, true
		}
	}
	if earliest := oldestAt + int64(minIdle); now < earliest {
		// Every flow was active after the oldest one was: none can be idle enough before it is.
		e.noEvictBefore = earliest
		return none, false
	}
	delete(e.flows, oldest)
	t.releaseLocked(c, e)
	return oldest, true
}

// Caps are the flow caps of a component: totals and per-client (or per-peer) shares of them.
type Caps struct {
	TCP, UDP             int
	TCPPerOne, UDPPerOne int
}

// DefaultTCP and DefaultUDP are the default totals for a file-descriptor limit fdLimit: fdLimit/5
// TCP flows (64-8192) and fdLimit/10 UDP flows (32-4096).
func DefaultTCP(fdLimit int) int { return Share(fdLimit, 5, 64, 8192) }

// DefaultUDP: see DefaultTCP.
func DefaultUDP(fdLimit int) int { return Share(fdLimit, 10, 32, 4096) }

// WithDefaults fills c's zero caps: the totals from the file limit in force, the per-one caps as
// total/perOneDiv (at least 1), and keeps each per-one cap within its total.
func (c Caps) WithDefaults(perOneDiv int) Caps {
	if c.TCP <= 0 || c.UDP <= 0 {
		fds := FDLimit()
		if c.TCP <= 0 {
			c.TCP = DefaultTCP(fds)
		}
		if c.UDP <= 0 {
			c.UDP = DefaultUDP(fds)
		}
	}
	if c.TCPPerOne <= 0 {
		c.TCPPerOne = max(c.TCP/perOneDiv, 1)
	}
	if c.UDPPerOne <= 0 {
		c.UDPPerOne = max(c.UDP/perOneDiv, 1)
	}
	c.TCPPerOne = min(c.TCPPerOne, c.TCP)
	c.UDPPerOne = min(c.UDPPerOne, c.UDP)
	return c
}
