package tun

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	wgtun "golang.zx2c4.com/wireguard/tun"
)

// Splitter pumps packets between the kernel TUN and the devices that own destination prefixes (the service
// netstack now; wireguard-go's overlay side in later work).
//
// Inbound (kernel → devices) one goroutine reads the kernel in batches, sends each packet to the device of
// the longest route prefix containing its destination, and writes each device's share of the batch in one
// Write. Outbound, one goroutine per device reads it in batches and writes them to the kernel. Buffers
// are allocated once per goroutine; no packet passes through a channel.
//
// States: configuring (NewSplitter, Route) → running (Start) → closed (Close).
type Splitter struct {
	log    *slog.Logger
	kernel wgtun.Device

	routes  []*splitRoute // longest prefix first once started
	devs    []*splitDev
	closing atomic.Bool
	wg      sync.WaitGroup

	toKernel, noRoute, malformed, segments, readErrors, writeErrors atomic.Uint64
	superIn, superOut                                               atomic.Uint64

	logMu   sync.Mutex // guards lastLog
	lastLog time.Time

	// mu guards all following fields.
	mu      sync.Mutex
	started bool
	closed  bool
	overlay *overlayDev
}

type splitRoute struct {
	prefix  netip.Prefix
	dev     *splitDev
	packets atomic.Uint64
}

type splitDev struct {
	dev     wgtun.Device
	pending [][]byte // this device's share of the current inbound batch; used by the inbound goroutine only
	// offload is dev when it is an OffloadDevice and the kernel TUN has IFF_VNET_HDR (set by Start).
	offload OffloadDevice
}

// SplitterStats is a snapshot of the Splitter's counters.
type SplitterStats struct {
	// Routes counts the packets sent from the kernel to each route's device, in the order Route was called.
	Routes []RouteStats
	// ToKernel counts the packets the devices emitted that were written to the kernel.
	ToKernel uint64
	// DroppedNoRoute counts kernel packets whose destination no route contains.
	DroppedNoRoute uint64
	// DroppedMalformed counts kernel packets that are empty, not IPv4/IPv6 or shorter than their header.
	DroppedMalformed uint64
	// DroppedSegments counts kernel reads that lost segments (tun.ErrTooManySegments).
	DroppedSegments uint64
	// ReadErrors and WriteErrors count failed reads and writes (other than the device closing).
	ReadErrors, WriteErrors uint64
	// SuperPacketsIn counts the kernel's TCP segmentation-offload packets given whole to an
	// OffloadDevice; SuperPacketsOut the segmentation-offload packets OffloadDevices wrote to the
	// kernel. Both stay 0 without IFF_VNET_HDR.
	SuperPacketsIn, SuperPacketsOut uint64
}

// RouteStats counts the packets sent to one route's device.
type RouteStats struct {
	Prefix  netip.Prefix
	Packets uint64
}

// NewSplitter returns a Splitter for kernel. logger nil discards logs.
func NewSplitter(logger *slog.Logger, kernel wgtun.Device) *Splitter {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Splitter{log: logger.With("component", "splitter"), kernel: kernel}
}

// Route sends packets whose destination is in prefix to dev (dev.Write), and dev's output (dev.Read) to
// the kernel. Several prefixes may go to one device; the longest prefix wins. Route must be called before
// Start; later calls are ignored and logged.
func (s *Splitter) Route(prefix netip.Prefix, dev wgtun.Device) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started || s.closed {
		s.log.Error("route added after start: ignored", "prefix", prefix)
		return
	}
	var d *splitDev
	for _, sd := range s.devs {
		if sameDevice(sd.dev, dev) {
			d = sd
			break
		}
	}
	if d == nil {
		d = &splitDev{dev: dev}
		s.devs = append(s.devs, d)
	}
	s.routes = append(s.routes, &splitRoute{prefix: prefix.Masked(), dev: d})
}

// sameDevice compares devices without panicking on an uncomparable dynamic type.
func sameDevice(a, b wgtun.Device) bool {
	if reflect.TypeOf(a) != reflect.TypeOf(b) || !reflect.TypeOf(a).Comparable() {
		return false
	}
	return a == b
}

// Start starts the inbound goroutine and one outbound goroutine per device.
func (s *Splitter) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("splitter: start: %w", net.ErrClosed)
	}
	if s.started {
		return errors.New("splitter: already started")
	}
	s.started = true
	// Longest prefix first; the stable sort keeps Route order among equal lengths. Stats keep Route order
	// through the pointers.
	sorted := slices.Clone(s.routes)
	slices.SortStableFunc(sorted, func(a, b *splitRoute) int { return b.prefix.Bits() - a.prefix.Bits() })
	batch := max(s.kernel.BatchSize(), 1)
	raw := rawOf(s.kernel)
	for _, d := range s.devs {
		d.pending = make([][]byte, 0, batch)
		if od, ok := d.dev.(OffloadDevice); ok && raw != nil {
			d.offload = od
		}
	}
	s.log.Debug("splitter started", "offloads", raw != nil)
	reader := &kernelReader{s: s, raw: raw, routes: sorted}
	if s.overlay != nil {
		// wireguard-go's TUN reader drives the inbound path through the overlay device's Read.
		s.overlay.reader = reader
		s.overlay.ready.Store(true)
	} else {
		s.wg.Add(1)
		go s.inbound(reader, batch)
	}
	s.wg.Add(len(s.devs))
	for _, d := range s.devs {
		if d.offload != nil {
			go s.pump(d, raw)
		} else {
			go s.outbound(d)
		}
	}
	return nil
}

// Stats returns a snapshot of the counters.
func (s *Splitter) Stats() SplitterStats {
	s.mu.Lock()
	routes := make([]RouteStats, len(s.routes))
	for i, r := range s.routes {
		routes[i] = RouteStats{Prefix: r.prefix, Packets: r.packets.Load()}
	}
	s.mu.Unlock()
	return SplitterStats{
		Routes:           routes,
		ToKernel:         s.toKernel.Load(),
		DroppedNoRoute:   s.noRoute.Load(),
		DroppedMalformed: s.malformed.Load(),
		DroppedSegments:  s.segments.Load(),
		ReadErrors:       s.readErrors.Load(),
		WriteErrors:      s.writeErrors.Load(),
		SuperPacketsIn:   s.superIn.Load(),
		SuperPacketsOut:  s.superOut.Load(),
	}
}

// Close stops the Splitter and waits for its goroutines. It does not close the devices: the owner closes
// the kernel TUN and the routed devices first, which makes their blocked Reads return, and then calls
// Close, which waits for the goroutines to see that. Close is idempotent.
func (s *Splitter) Close() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.closing.Store(true)
	s.wg.Wait()
	return nil
}

// packetBufSize is the size of one packet buffer of the inbound and outbound loops: the kernel
// device's MTU, since no packet they move is larger (the kernel TUN's Read splits its offloaded
// super-packets into MTU-sized segments, and the devices behind the splitter produce packets of at
// most the MTU). MaxPacketSize when the MTU is unknown. Sizing them to the MTU instead of 64 KiB keeps
// 16 MiB of mostly untouched buffers out of the heap, whose size sets the garbage collector's target.
func (s *Splitter) packetBufSize() int {
	mtu, err := s.kernel.MTU()
	if err != nil || mtu <= 0 || mtu > MaxPacketSize {
		return MaxPacketSize
	}
	return mtu
}

// inbound reads the kernel and writes each packet to its route's device.
func (s *Splitter) inbound(reader *kernelReader, batch int) {
	defer s.wg.Done()
	routes := reader.routes
	bufs := make([][]byte, batch)
	size := s.packetBufSize()
	for i := range bufs {
		bufs[i] = make([]byte, Offset+size)
	}
	sizes := make([]int, batch)
	for {
		n, err := reader.read(bufs, sizes, Offset)
		for i := range n {
			pkt := bufs[i][Offset : Offset+sizes[i]]
			dst, ok := destination(pkt)
			if !ok {
				s.malformed.Add(1)
				continue
			}
			r := lookup(routes, dst)
			if r == nil {
				s.noRoute.Add(1)
				s.logLimited("dropped packet: no route", "dst", dst)
				continue
			}
			r.packets.Add(1)
			r.dev.pending = append(r.dev.pending, bufs[i][:Offset+sizes[i]])
		}
		for _, d := range s.devs {
			if len(d.pending) == 0 {
				continue
			}
			if _, werr := d.dev.Write(d.pending, Offset); werr != nil && !s.closedErr(werr) {
				s.writeErrors.Add(1)
				s.logLimited("write to device failed", "err", werr)
			}
			clear(d.pending)
			d.pending = d.pending[:0]
		}
		if err != nil {
			if s.stopOnReadErr("kernel", err) {
				return
			}
		}
	}
}

// outbound reads d and writes its packets to the kernel.
func (s *Splitter) outbound(d *splitDev) {
	defer s.wg.Done()
	batch := max(d.dev.BatchSize(), 1)
	bufs := make([][]byte, batch)
	out := make([][]byte, 0, batch)
	size := s.packetBufSize()
	for i := range bufs {
		bufs[i] = make([]byte, Offset+size)
	}
	sizes := make([]int, batch)
	for {
		n, err := d.dev.Read(bufs, sizes, Offset)
		for i := range n {
			if sizes[i] < 1 {
				continue
			}
			out = append(out, bufs[i][:Offset+sizes[i]])
		}
		if len(out) > 0 {
			if _, werr := s.kernel.Write(out, Offset); werr != nil && !s.closedErr(werr) {
				s.writeErrors.Add(1)
				s.logLimited("write to kernel failed", "err", werr)
			}
			s.toKernel.Add(uint64(len(out)))
			clear(out)
			out = out[:0]
		}
		if err != nil {
			name, _ := d.dev.Name()
			if s.stopOnReadErr(name, err) {
				return
			}
		}
	}
}

// stopOnReadErr counts and logs a read error and reports whether the reading goroutine must stop: when
// the device is closed or the Splitter is closing. Lost segments and other read errors (a malformed
// virtio header, say) are not fatal, as in wireguard-go's RoutineReadFromTUN.
func (s *Splitter) stopOnReadErr(dev string, err error) bool {
	if s.closedErr(err) || s.closing.Load() {
		return true
	}
	if errors.Is(err, wgtun.ErrTooManySegments) {
		s.segments.Add(1)
		s.logLimited("dropped segments of a multi-segment read", "device", dev, "err", err)
		return false
	}
	s.readErrors.Add(1)
	s.logLimited("read failed", "device", dev, "err", err)
	return false
}

func (s *Splitter) closedErr(err error) bool {
	return errors.Is(err, os.ErrClosed) || errors.Is(err, net.ErrClosed)
}

// logLimited logs at most one message per second.
func (s *Splitter) logLimited(msg string, args ...any) {
	s.logMu.Lock()
	now := time.Now()
	ok := now.Sub(s.lastLog) >= time.Second
	if ok {
		s.lastLog = now
	}
	s.logMu.Unlock()
	if ok {
		s.log.Log(context.Background(), slog.LevelDebug, msg, args...)
	}
}

func lookup(routes []*splitRoute, dst netip.Addr) *splitRoute {
	for _, r := range routes {
		if r.prefix.Contains(dst) {
			return r
		}
	}
	return nil
}

// destination returns the destination address of an IPv4 or IPv6 packet.
func destination(pkt []byte) (netip.Addr, bool) {
	if len(pkt) == 0 {
		return netip.Addr{}, false
	}
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < 20 {
			return netip.Addr{}, false
		}
		return netip.AddrFrom4([4]byte(pkt[16:20])), true
	case 6:
		if len(pkt) < 40 {
			return netip.Addr{}, false
		}
		return netip.AddrFrom16([16]byte(pkt[24:40])), true
	}
	return netip.Addr{}, false
}
