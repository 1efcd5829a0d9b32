package dns

import (
	"net/netip"
	"sync"
	"time"
)

// Admission before the socket. The read loop's per-source limit acts on datagrams it has read;
// a flood faster than the loop reads fills the socket's receive buffer first, and then every
// source's queries are lost there alike. AdmitDatagram is the same limit applied where datagrams
// arrive, before they are queued: the agent's service netstack asks it for every UDP datagram to
// the DNS address and drops the refused ones (Stats.Policed) before they reach the socket, so a
// flooding source loses its excess and the others keep their share of the buffer. It keeps its
// own buckets (the read loop's are the loop's alone, without a lock); a datagram admitted here is
// charged again by the loop, at the same rate, so the loop's limit rarely acts on its own.

// admission is the pre-socket limiter; nil when SourceRate < 0.
type admission struct {
	mu      sync.Mutex // guards limiter
	limiter *sourceLimiter
	epoch   time.Time
}

// AdmitDatagram reports whether a UDP datagram from src may be queued for the server, charging
// src's bucket. It is safe for concurrent use and cheap (a map lookup under a mutex).
func (s *Server) AdmitDatagram(src netip.Addr) bool {
	a := s.admit
	if a == nil {
		return true
	}
	a.mu.Lock()
	b, _ := a.limiter.bucket(src.Unmap(), int64(time.Since(a.epoch)))
	ok := b.take(1)
	a.mu.Unlock()
	if !ok {
		s.policed.Add(1)
	}
	return ok
}
