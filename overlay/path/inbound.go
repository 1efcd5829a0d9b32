package path

import (
	"net/netip"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"github.com/edgewire/edgewire/overlay/internal/trim"
	"github.com/edgewire/edgewire/relay"
)

// dataMagic0 is the first byte of every path frame (relay/wire.go), checked before parsing.
const dataMagic0 = 0xE7

// WireGuard message types and sizes (wireguard-go device/noise-protocol.go), for classification.
const (
	wgTypeInitiation  = 1
	wgTypeResponse    = 2
	wgTypeCookieReply = 3
	wgTypeTransport   = 4

	wgSizeInitiation      = 148
	wgSizeResponse        = 92
	wgSizeCookieReply     = 64
	wgSizeTransportHeader = 16
	wgSizeTransportMin    = wgSizeTransportHeader + 16 // header + poly1305 tag: a keepalive
)

// dropLogInterval bounds the log of dropped non-WireGuard datagrams to one line per interval.
const dropLogInterval = 10 * time.Second

// isWireGuard reports whether pkt is a well-formed WireGuard message (see the package doc).
func isWireGuard(pkt []byte) bool {
	if len(pkt) < 4 || pkt[1]|pkt[2]|pkt[3] != 0 {
		return false
	}
	switch pkt[0] {
	case wgTypeInitiation:
		return len(pkt) == wgSizeInitiation
	case wgTypeResponse:
		return len(pkt) == wgSizeResponse
	case wgTypeCookieReply:
		return len(pkt) == wgSizeCookieReply
	case wgTypeTransport:
		// Not a multiple of 16: wireguard-go pads to 16 only up to the MTU, so full-size packets are not.
		return len(pkt) >= wgSizeTransportMin
	}
	return false
}

// wrapReceive wraps an inner ReceiveFunc with the demultiplexer. The wrapper for an IPv4 or IPv6
// function is built by a method whose name ends the same way, so fn.PrettyName() — which
// wireguard-go puts in its receive goroutine's logs — still says "v4" or "v6".
func (b *Bind) wrapReceive(fn conn.ReceiveFunc) conn.ReceiveFunc {
	switch fn.PrettyName() {
	case "v4":
		return b.receiveIPv4(fn)
	case "v6":
		return b.receiveIPv6(fn)
	}
	return b.receive(fn)
}

func (b *Bind) receiveIPv4(fn conn.ReceiveFunc) conn.ReceiveFunc {
	var h trim.Holder
	return func(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		b.trim.Maybe(&h, bufs) // wireguard-go calls with a batch of empty buffers of its own
		n, err := fn(bufs, sizes, eps)
		if err == nil {
			b.demux(bufs[:n], sizes[:n], eps[:n])
		}
		return n, err
	}
}

func (b *Bind) receiveIPv6(fn conn.ReceiveFunc) conn.ReceiveFunc {
	var h trim.Holder
	return func(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		b.trim.Maybe(&h, bufs) // wireguard-go calls with a batch of empty buffers of its own
		n, err := fn(bufs, sizes, eps)
		if err == nil {
			b.demux(bufs[:n], sizes[:n], eps[:n])
		}
		return n, err
	}
}

func (b *Bind) receive(fn conn.ReceiveFunc) conn.ReceiveFunc {
	var h trim.Holder
	return func(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		b.trim.Maybe(&h, bufs) // wireguard-go calls with a batch of empty buffers of its own
		n, err := fn(bufs, sizes, eps)
		if err == nil {
			b.demux(bufs[:n], sizes[:n], eps[:n])
		}
		return n, err
	}
}

// demux leaves WireGuard's datagrams in the batch and takes every other one out: it hands it to
// the packet handler (or drops it) and sets its size to 0, which wireguard-go skips. A DATA frame
// from a relay is unwrapped in place first (unwrapRelayed).
func (b *Bind) demux(bufs [][]byte, sizes []int, eps []conn.Endpoint) {
	var wg, other, dropped uint64
	onPacket := b.handler()
	w := b.watch.Load()
	var last netip.AddrPort // the source last noted for w: a batch mostly comes from one peer
	for i, size := range sizes {
		if size <= 0 || size > len(bufs[i]) {
			continue // nothing here (receive contract), or nothing we can read
		}
		pkt := bufs[i][:size]
		if isWireGuard(pkt) {
			wg++
			if w != nil {
				if from, ok := endpointAddr(eps[i]); ok && from != last {
					w.noteReceive(from)
					last = from
				}
			}
			continue
		}
		from, ok := endpointAddr(eps[i])
		if ok && len(pkt) >= relay.DataHeaderLen && pkt[0] == dataMagic0 {
			if typ, isFrame := relay.IsFrame(pkt); isFrame && typ == relay.FrameData {
				if r, isRelay := b.relayOf(from); isRelay {
					if b.unwrapRelayed(r, bufs, sizes, eps, i) {
						wg++
					}
					continue
				}
			}
		}
		other++
		sizes[i] = 0
		if onPacket == nil || !ok {
			dropped++
			continue
		}
		onPacket(pkt, from)
	}
	if wg > 0 {
		b.wgIn.Add(wg)
	}
	if other > 0 {
		b.otherIn.Add(other)
	}
	if dropped > 0 {
		total := b.otherDropped.Add(dropped)
		if b.dropLog.allow(time.Now()) {
			b.log.Debug("dropped datagrams that are not WireGuard", "dropped_total", total,
				"handler", onPacket != nil)
		}
	}
}

// endpointAddr is the source address of a received datagram. A StdNetBind endpoint carries it as
// an AddrPort (no allocation); any other endpoint is parsed from its string form.
func endpointAddr(ep conn.Endpoint) (netip.AddrPort, bool) {
	switch ep := ep.(type) {
	case *conn.StdNetEndpoint:
		if ep == nil {
			return netip.AddrPort{}, false
		}
		return netip.AddrPortFrom(ep.Addr().Unmap(), ep.Port()), ep.IsValid()
	case nil:
		return netip.AddrPort{}, false
	}
	ap, err := netip.ParseAddrPort(ep.DstToString())
	if err != nil {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
}

// logLimiter lets one log line through per dropLogInterval; safe for concurrent use.
type logLimiter struct {
	next atomic.Int64 // unix nanoseconds before which lines are suppressed
}

func (l *logLimiter) allow(now time.Time) bool {
	next := l.next.Load()
	if now.UnixNano() < next {
		return false
	}
	return l.next.CompareAndSwap(next, now.Add(dropLogInterval).UnixNano())
}
