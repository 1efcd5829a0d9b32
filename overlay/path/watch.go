package path

import (
	"errors"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.zx2c4.com/wireguard/conn"
)

// The Bind watches the endpoints the Manager gave wireguard-go (one per peer) for the two signs of
// a path that died without a probe noticing yet (see the package doc, "Failure detection"):
// WireGuard data sent to the endpoint while nothing comes back from it for suspectAfter, and a
// send to it that fails locally. Either raises the endpoint's activity flag and wakes the Manager,
// which probes the path at once.

// activity is what the Bind saw of WireGuard traffic to and from one watched endpoint. Its fields
// are written by wireguard-go's send and receive goroutines and read by the Manager.
type activity struct {
	// unanswered is the time (unix nanoseconds) of the first data send to the endpoint since the
	// last datagram received from it; 0: none since.
	unanswered atomic.Int64
	// suspect is raised once per episode: data unanswered for suspectAfter, or the peer's datagrams
	// arrive through a relay although this node chose this endpoint. The Manager lowers it when it
	// starts probing.
	suspect atomic.Bool
	// sendErr counts local send errors to the endpoint (pathError) not yet taken by the Manager.
	sendErr atomic.Uint32
	// elsewhere is raised with suspect when the peer's datagrams came through a relay: the peer
	// found the path dead already, and one missed probe confirms it.
	elsewhere atomic.Bool
	// heard is set by the first WireGuard datagram received from the endpoint.
	heard atomic.Bool
	// ring keeps the last small datagrams sent to the endpoint, to send again on the next path
	// should this one die (replayRing); nil until the first.
	ring atomic.Pointer[replayRing]
}

// Replaying: the datagrams sent into a path between its death and the failover are lost, and TCP
// waits for its retransmission timeout to send them again: a SYN waits 1 s, longer than the
// service proxy's dial attempt. So the Bind keeps, per watched endpoint, the last replayLen
// datagrams of at most maxReplayLen bytes that asked for an answer (SYNs, SYN-ACKs, ACKs, small
// requests and responses, handshake initiations; bulk data is full-size and skipped, at the cost
// of a length check), and the Manager sends those younger than replayMaxAge again on the new path
// when it fails over. WireGuard's replay filter drops the copies of datagrams that did arrive.
const (
	replayLen    = 32
	maxReplayLen = 256
	replayMaxAge = 2 * time.Second
)

// replayRing is the ring of one endpoint (8 KiB, allocated at its first small datagram). mu
// guards all following fields.
type replayRing struct {
	mu   sync.Mutex
	next int
	ents [replayLen]replayEntry
}

type replayEntry struct {
	at  int64 // unix nanoseconds; 0: empty
	n   int
	buf [maxReplayLen]byte
}

// keep copies the small datagrams of bufs that ask for an answer into a's ring.
func (a *activity) keep(bufs [][]byte, now int64) {
	var r *replayRing
	for _, p := range bufs {
		if len(p) > maxReplayLen || !carriesData([][]byte{p}) {
			continue
		}
		if r == nil {
			if r = a.ring.Load(); r == nil {
				a.ring.CompareAndSwap(nil, new(replayRing))
				r = a.ring.Load()
			}
			r.mu.Lock()
			defer r.mu.Unlock()
		}
		e := &r.ents[r.next]
		e.at, e.n = now, copy(e.buf[:], p)
		r.next = (r.next + 1) % replayLen
	}
}

// takeReplay empties a's ring and returns copies of the datagrams younger than replayMaxAge,
// oldest first.
func (a *activity) takeReplay(now time.Time) [][]byte {
	r := a.ring.Load()
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var out [][]byte
	oldest := now.Add(-replayMaxAge).UnixNano()
	for i := range replayLen {
		e := &r.ents[(r.next+i)%replayLen]
		if e.at != 0 && e.at >= oldest {
			out = append(out, append([]byte(nil), e.buf[:e.n]...))
		}
		e.at = 0
	}
	return out
}

// replay sends again, to the path to, the datagrams kept for the dead path of a (see
// replayRing), and returns how many it sent.
func (b *Bind) replay(a *activity, to netip.AddrPort) (int, error) {
	bufs := a.takeReplay(time.Now())
	if len(bufs) == 0 {
		return 0, nil
	}
	if err := b.sendTo(bufs, to); err != nil {
		return 0, err
	}
	b.replayed.Add(uint64(len(bufs)))
	return len(bufs), nil
}

// watchTable is an immutable set of watched endpoints; the Manager replaces it whole.
type watchTable struct {
	byAddr       map[netip.AddrPort]*activity
	suspectAfter int64 // nanoseconds
	wake         func()
}

// setWatch installs the watched endpoints (nil: none).
func (b *Bind) setWatch(t *watchTable) { b.watch.Store(t) }

// pathError reports whether a send failed because of the path itself: a firewall refusing it
// (EPERM, EACCES), no route or no interface (ENETUNREACH, EHOSTUNREACH, ENETDOWN, EADDRNOTAVAIL,
// ENODEV, ENXIO). Such an error is certain: the datagram did not leave, and the next will not
// either, so the Manager counts it as a lost probe at once. Transient errors (ENOBUFS, EAGAIN) and
// a closed socket are not path errors.
func pathError(err error) bool {
	if err == nil {
		return false
	}
	for _, e := range [...]syscall.Errno{syscall.EPERM, syscall.EACCES, syscall.ENETUNREACH, syscall.EHOSTUNREACH,
		syscall.ENETDOWN, syscall.EADDRNOTAVAIL, syscall.ENODEV, syscall.ENXIO} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// carriesData reports whether a batch holds a datagram that asks for an answer: a handshake
// initiation, or transport data longer than a keepalive (which the peer does not answer).
func carriesData(bufs [][]byte) bool {
	for _, p := range bufs {
		if len(p) > wgSizeTransportMin || (len(p) == wgSizeInitiation && p[0] == wgTypeInitiation) {
			return true
		}
	}
	return false
}

// noteSend records a WireGuard send to a watched endpoint (called after every Send with a
// watched table installed; a map lookup and, for data, an atomic load).
func (b *Bind) noteSend(w *watchTable, bufs [][]byte, ep conn.Endpoint, err error) {
	var to netip.AddrPort
	if synth, ok := syntheticOf(ep); ok {
		to = synth
	} else if a, ok := endpointAddr(ep); ok {
		to = a
	} else {
		return
	}
	a := w.byAddr[to]
	if a == nil {
		if pathError(err) {
			// wireguard-go roamed to an address this node cannot send to (the source of a
			// datagram from the peer): the Manager applies its choice again at once, and sends
			// what failed there.
			b.sendErrs.Add(1)
			b.keepRoamed(to, bufs)
			w.wake()
		}
		return
	}
	if err != nil {
		if pathError(err) {
			// The datagrams never left: the failover sends them on the next path.
			a.keep(bufs, time.Now().UnixNano())
			b.sendErrs.Add(1)
			a.sendErr.Add(1)
			w.wake()
		}
		return
	}
	if !carriesData(bufs) {
		return
	}
	now := time.Now().UnixNano()
	a.keep(bufs, now)
	first := a.unanswered.Load()
	switch {
	case first == 0:
		a.unanswered.CompareAndSwap(0, now)
	case now-first >= w.suspectAfter && !a.suspect.Load() && a.suspect.CompareAndSwap(false, true):
		b.suspicions.Add(1)
		w.wake()
	}
}

// noteReceive records a WireGuard datagram received from a watched endpoint.
func (w *watchTable) noteReceive(from netip.AddrPort) {
	a := w.byAddr[from]
	if a == nil {
		return
	}
	if a.unanswered.Load() != 0 {
		a.unanswered.Store(0)
	}
	if !a.heard.Load() {
		a.heard.Store(true)
	}
}

// noteElsewhere records that the peer whose chosen endpoint is chosen sent a WireGuard datagram
// through a relay instead: it may have found that path dead.
func (b *Bind) noteElsewhere(w *watchTable, chosen netip.AddrPort) {
	if a := w.byAddr[chosen]; a != nil && !a.suspect.Load() && a.suspect.CompareAndSwap(false, true) {
		a.elsewhere.Store(true)
		b.suspicions.Add(1)
		w.wake()
	}
}

// roamed is what failed to leave for an address wireguard-go roamed to (see keepRoamed). mu
// guards all following fields.
type roamed struct {
	mu   sync.Mutex
	addr netip.AddrPort // invalid: none since the Manager took them
	kept activity       // its ring only
}

// keepRoamed records that WireGuard's datagrams to to (an address no peer's chosen endpoint) failed
// with a path error, keeping the small ones for takeRoamed. Only the last such address is kept.
func (b *Bind) keepRoamed(to netip.AddrPort, bufs [][]byte) {
	r := &b.roamed
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.addr != to {
		r.kept.takeReplay(time.Now()) // empties the ring
		r.addr = to
	}
	r.kept.keep(bufs, time.Now().UnixNano())
}

// takeRoamed returns the address of the last failed roam and the datagrams kept for it, and
// forgets both.
func (b *Bind) takeRoamed() (netip.AddrPort, [][]byte) {
	r := &b.roamed
	r.mu.Lock()
	defer r.mu.Unlock()
	addr := r.addr
	r.addr = netip.AddrPort{}
	if !addr.IsValid() {
		return addr, nil
	}
	return addr, r.kept.takeReplay(time.Now())
}

// sendTo sends WireGuard datagrams to a path (a real endpoint, or a relay's synthetic one).
func (b *Bind) sendTo(bufs [][]byte, to netip.AddrPort) error {
	if _, _, relayed := ParseSynthetic(to); relayed {
		return b.sendRelayed(bufs, to)
	}
	ep, err := b.inner.ParseEndpoint(to.String())
	if err != nil {
		return err
	}
	return b.inner.Send(bufs, ep)
}
