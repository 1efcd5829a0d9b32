// Package ratelimit owns the one limiter the agent's packages use to keep per-packet and per-flow
// logs down to one line per interval, counting what they leave out.
package ratelimit

import (
	"sync"
	"time"
)

// Limiter lets one event through per Every and counts the rest. The zero Limiter with Every set is
// ready; it is safe for concurrent use.
type Limiter struct {
	Every time.Duration

	mu         sync.Mutex // guards the following fields
	last       time.Time
	suppressed uint64
}

// Allow reports whether an event may pass now and, when it may, how many were held back since the
// last one that passed.
func (r *Limiter) Allow() (suppressed uint64, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	if !r.last.IsZero() && now.Sub(r.last) < r.Every {
		r.suppressed++
		return 0, false
	}
	r.last = now
	n := r.suppressed
	r.suppressed = 0
	return n, true
}
