package path

import (
	"errors"
	"net/netip"
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
		return
	}
	if err != nil {
		if pathError(err) {
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
	if a := w.byAddr[from]; a != nil && a.unanswered.Load() != 0 {
		a.unanswered.Store(0)
	}
}

// noteElsewhere records that the peer whose chosen endpoint is chosen sent a WireGuard datagram
// through a relay instead: it may have found that path dead.
func (b *Bind) noteElsewhere(w *watchTable, chosen netip.AddrPort) {
	if a := w.byAddr[chosen]; a != nil && !a.suspect.Load() && a.suspect.CompareAndSwap(false, true) {
		b.suspicions.Add(1)
		w.wake()
	}
}
