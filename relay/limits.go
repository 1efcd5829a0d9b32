package relay

import "time"

// ACL decides which token holders may register. Register is called after the join token proof
// has been checked and before the name binding, with the node name and its libp2p peer ID; a
// non-nil error refuses the registration (the error's text is sent to the node). It must be safe
// for concurrent use. A nil ACL allows every token holder.
type ACL interface {
	Register(name string, peer string) error
}

// Limits bounds what each node may use. The zero value of each field means its default.
type Limits struct {
	// DataRate is the sustained rate, in bytes per second, of DATA frames a node may send through
	// the relay (default 1.25e9, 10 Gbit/s: a relay carries data paths, and one relayed TCP flow
	// between two agents exceeds 1 Gbit/s, so the default guards the relay without capping a
	// path); DataBurst the bucket size in bytes (default 16 MiB).
	// Frames over the limit are dropped and counted.
	DataRate  float64
	DataBurst int
	// PunchRate is how many punch requests per second a node may make (default 5), PunchBurst
	// the burst (default 20). Requests over the limit are dropped and counted.
	PunchRate  float64
	PunchBurst int
	// MaxNodes caps the number of registered nodes (default 10000).
	MaxNodes int
	// KeepAlive is the interval of the relay's pings on each control stream (default 5 s); a stream
	// silent for three intervals is closed.
	KeepAlive time.Duration
	// RegisterTimeout bounds the time from a control stream's opening to a valid register, however
	// slowly its bytes arrive, and the life of a connection on which no node registers (default
	// 10 s). Both are closed then and counted.
	RegisterTimeout time.Duration

	// What peers that have not registered (strangers, and nodes in the middle of registering) can
	// make the relay hold. Each is enforced on top of libp2p's resource manager (resources.go) and
	// counted by reason when it refuses (edgewire_relay_unauth_refused_total).
	//
	// MaxUnauthStreams caps their control streams in total (default 64), MaxUnauthStreamsPerIP
	// per source address, an IPv4 address or an IPv6 /64 (default 8). A stream over either cap is
	// reset at once. A stream within them holds at most 8 KiB of frame (maxPreAuthFrame) and
	// what yamux buffers for it (up to its 256 KiB window) for at most RegisterTimeout.
	MaxUnauthStreams      int
	MaxUnauthStreamsPerIP int
	// MaxUnauthConns caps the libp2p connections on which no node is registered, in total (default
	// 256); MaxUnauthConnsPerIP per source address (default 32). A connection over either cap is
	// closed as soon as its handshake completes; one on which no node has registered within
	// RegisterTimeout is closed then.
	MaxUnauthConns      int
	MaxUnauthConnsPerIP int
	// MaxConnsPerIP caps every libp2p connection from one source address, registered or not,
	// before its handshake is even attempted (default 1024: nodes behind one NAT share it).
	// ConnRatePerIP is how many new connections per second one source address may open (default
	// 10, with a burst of MaxUnauthConnsPerIP).
	MaxConnsPerIP int
	ConnRatePerIP float64
}

// DefaultLimits returns the limits used for zero fields.
func DefaultLimits() Limits {
	return Limits{
		DataRate:        10e9 / 8,
		DataBurst:       16 << 20,
		PunchRate:       5,
		PunchBurst:      20,
		MaxNodes:        10000,
		KeepAlive:       5 * time.Second,
		RegisterTimeout: 10 * time.Second,

		MaxUnauthStreams:      64,
		MaxUnauthStreamsPerIP: 8,
		MaxUnauthConns:        256,
		MaxUnauthConnsPerIP:   32,
		MaxConnsPerIP:         1024,
		ConnRatePerIP:         10,
	}
}

// withDefaults fills zero fields from DefaultLimits.
func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	if l.DataRate <= 0 {
		l.DataRate = d.DataRate
	}
	if l.DataBurst <= 0 {
		l.DataBurst = d.DataBurst
	}
	if l.PunchRate <= 0 {
		l.PunchRate = d.PunchRate
	}
	if l.PunchBurst <= 0 {
		l.PunchBurst = d.PunchBurst
	}
	if l.MaxNodes <= 0 {
		l.MaxNodes = d.MaxNodes
	}
	if l.KeepAlive <= 0 {
		l.KeepAlive = d.KeepAlive
	}
	if l.RegisterTimeout <= 0 {
		l.RegisterTimeout = d.RegisterTimeout
	}
	if l.MaxUnauthStreams <= 0 {
		l.MaxUnauthStreams = d.MaxUnauthStreams
	}
	if l.MaxUnauthStreamsPerIP <= 0 {
		l.MaxUnauthStreamsPerIP = d.MaxUnauthStreamsPerIP
	}
	if l.MaxUnauthConns <= 0 {
		l.MaxUnauthConns = d.MaxUnauthConns
	}
	if l.MaxUnauthConnsPerIP <= 0 {
		l.MaxUnauthConnsPerIP = d.MaxUnauthConnsPerIP
	}
	if l.MaxConnsPerIP <= 0 {
		l.MaxConnsPerIP = d.MaxConnsPerIP
	}
	if l.ConnRatePerIP <= 0 {
		l.ConnRatePerIP = d.ConnRatePerIP
	}
	return l
}

// bucket is a token bucket; it is not safe for concurrent use.
type bucket struct {
	rate   float64 // tokens per nanosecond
	burst  float64
	tokens float64
	last   int64 // monotonic nanoseconds of the last refill
}

func newBucket(perSecond float64, burst int, now int64) bucket {
	return bucket{rate: perSecond / 1e9, burst: float64(burst), tokens: float64(burst), last: now}
}

// take removes n tokens at time now (monotonic nanoseconds) and reports whether there were enough.
func (b *bucket) take(n float64, now int64) bool {
	if now > b.last {
		b.tokens = min(b.burst, b.tokens+float64(now-b.last)*b.rate)
		b.last = now
	}
	if b.tokens < n {
		return false
	}
	b.tokens -= n
	return true
}
