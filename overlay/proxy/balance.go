package proxy

import (
	"encoding/binary"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// inlineTargets is how many candidates DialFlow orders without allocating.
const inlineTargets = 16

// candidates appends to dst the targets of sp in the order DialFlow tries them: the affinity
// endpoint, then the policy's order, with ejected endpoints moved after all the others.
func (p *Proxy) candidates(dst []*target, sp *svcPort, client netip.Addr) []*target {
	now := p.now()
	var seq uint64
	if sp.policy != PolicySourceHash && sp.policy != PolicyRandom {
		seq = sp.rr.Add(1) - 1 // one round-robin step per flow, whatever the grouping
	}
	var order []*target
	if sp.nLocal > 0 {
		order = p.policyOrder(dst, sp.targets[:sp.nLocal], sp, client, seq)
		order = p.policyOrder(order, sp.targets[sp.nLocal:], sp, client, seq)
	} else {
		order = p.policyOrder(dst, sp.targets, sp, client, seq)
	}
	if sp.affinity != nil {
		if addr, ok := sp.affinity.lookup(client, now, sp.affinityTimeout); ok {
			moveToFront(order, addr)
		}
	}
	return ejectedLast(order, now)
}

// policyOrder appends targets to dst in the order of sp's policy; seq is the flow's round-robin
// step.
func (p *Proxy) policyOrder(dst []*target, targets []target, sp *svcPort, client netip.Addr, seq uint64) []*target {
	n := len(targets)
	if n == 0 {
		return dst
	}
	switch sp.policy {
	case PolicySourceHash:
		return sourceHashOrder(dst, targets, client)
	case PolicyRandom:
		return rotation(dst, targets, p.rand(n))
	default:
		return rotation(dst, targets, int(seq%uint64(n)))
	}
}

// rotation appends targets starting at index start and wrapping around.
func rotation(dst []*target, targets []target, start int) []*target {
	dst = slices.Grow(dst, len(targets))
	for i := range targets {
		dst = append(dst, &targets[(start+i)%len(targets)])
	}
	return dst
}

// sourceHashOrder appends targets by descending rendezvous weight for client.
func sourceHashOrder(dst []*target, targets []target, client netip.Addr) []*target {
	type scored struct {
		w uint64
		t *target
	}
	var buf [inlineTargets]scored
	ws := buf[:0]
	c := addrHash(client)
	for i := range targets {
		t := &targets[i]
		ws = append(ws, scored{w: mix64(c ^ t.hash), t: t})
	}
	slices.SortFunc(ws, func(a, b scored) int {
		switch {
		case a.w > b.w:
			return -1
		case a.w < b.w:
			return 1
		}
		return a.t.addr.Compare(b.t.addr)
	})
	for _, s := range ws {
		dst = append(dst, s.t)
	}
	return dst
}

// moveToFront moves the target with addr to the front of order, keeping the others' order.
func moveToFront(order []*target, addr netip.AddrPort) {
	for i, t := range order {
		if t.addr == addr {
			copy(order[1:i+1], order[:i])
			order[0] = t
			return
		}
	}
}

// ejectedLast stably moves the targets ejected at now after the others.
func ejectedLast(order []*target, now time.Time) []*target {
	var buf [inlineTargets]*target
	ejected := buf[:0]
	k := 0
	for _, t := range order {
		if t.backend.ejected(now) {
			ejected = append(ejected, t)
			continue
		}
		order[k] = t
		k++
	}
	copy(order[k:], ejected)
	return order
}

// mix64 is the splitmix64 finaliser.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// addrHash hashes an address deterministically (every node computes the same value).
func addrHash(a netip.Addr) uint64 {
	b := a.As16()
	return mix64(binary.BigEndian.Uint64(b[:8]) ^ mix64(binary.BigEndian.Uint64(b[8:])))
}

// targetHash is the rendezvous key of an endpoint address:port.
func targetHash(ap netip.AddrPort) uint64 {
	return mix64(addrHash(ap.Addr()) ^ (uint64(ap.Port())+1)*0x9e3779b97f4a7c15)
}

// backend is the health of one endpoint address:port, shared by every service port that targets it
// and carried over Update.
type backend struct {
	// ejectedUntil is the end of the ejection in Unix nanoseconds, 0 when not ejected. It is
	// written under mu and read without it.
	ejectedUntil atomic.Int64

	mu       sync.Mutex // guards failures
	failures int        // consecutive failed dials
}

// ejected reports whether the backend is ejected at now.
func (b *backend) ejected(now time.Time) bool {
	u := b.ejectedUntil.Load()
	return u != 0 && now.UnixNano() < u
}

// failing reports whether the backend's last dial failed (ejected now or earlier, and not
// recovered since).
func (b *backend) failing() bool {
	return b.ejectedUntil.Load() != 0
}

// until returns the end of the ejection and the consecutive failures, or zero values.
func (b *backend) until() (time.Time, int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	u := b.ejectedUntil.Load()
	if u == 0 {
		return time.Time{}, b.failures
	}
	return time.Unix(0, u), b.failures
}

// failed records a failed dial at now and ejects the backend for base doubled per earlier
// consecutive failure, at most max. first is true when the backend was not failing before.
func (b *backend) failed(now time.Time, base, max time.Duration) (d time.Duration, first bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.failures++
	d = base
	for i := 1; i < b.failures && d < max; i++ {
		d *= 2
	}
	d = min(d, max)
	b.ejectedUntil.Store(now.Add(d).UnixNano())
	return d, b.failures == 1
}

// succeeded records a successful dial, ending any ejection; it reports whether the backend had
// been failing.
func (b *backend) succeeded() bool {
	if b.ejectedUntil.Load() == 0 {
		return false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	was := b.failures > 0
	b.failures = 0
	b.ejectedUntil.Store(0)
	return was
}

// affinity maps client IPs to the endpoint that last answered them, for one service port.
type affinity struct {
	mu        sync.Mutex // guards all following fields
	clients   map[netip.Addr]affinityEntry
	nextSweep int // sweep expired entries when the map grows to this size
}

type affinityEntry struct {
	addr netip.AddrPort
	last time.Time
}

const minAffinitySweep = 1024

func newAffinity() *affinity {
	return &affinity{clients: map[netip.Addr]affinityEntry{}, nextSweep: minAffinitySweep}
}

// lookup returns the endpoint client last used, if that was within timeout of now.
func (a *affinity) lookup(client netip.Addr, now time.Time, timeout time.Duration) (netip.AddrPort, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	e, ok := a.clients[client]
	if !ok {
		return netip.AddrPort{}, false
	}
	if now.Sub(e.last) > timeout {
		delete(a.clients, client)
		return netip.AddrPort{}, false
	}
	return e.addr, true
}

// record remembers that client's flow at now went to addr.
func (a *affinity) record(client netip.Addr, addr netip.AddrPort, now time.Time, timeout time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.clients[client]; !ok && len(a.clients) >= a.nextSweep {
		a.sweepLocked(now, timeout)
	}
	a.clients[client] = affinityEntry{addr: addr, last: now}
}

// sweepLocked drops expired entries and, when the map is still full, arbitrary ones down to three
// quarters of the bound; it sets the next sweep to twice what is left (at most the bound), so
// sweeping stays amortised O(1) per new client.
func (a *affinity) sweepLocked(now time.Time, timeout time.Duration) {
	for c, e := range a.clients {
		if now.Sub(e.last) > timeout {
			delete(a.clients, c)
		}
	}
	if len(a.clients) >= MaxAffinityEntries {
		for c := range a.clients {
			if len(a.clients) <= MaxAffinityEntries*3/4 {
				break
			}
			delete(a.clients, c)
		}
	}
	a.nextSweep = min(max(2*len(a.clients), minAffinitySweep), MaxAffinityEntries)
}

// len returns the number of remembered clients.
func (a *affinity) len() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.clients)
}
