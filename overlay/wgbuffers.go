package overlay

import (
	"errors"
	"fmt"
	"reflect"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.zx2c4.com/wireguard/device"
	wgtun "golang.zx2c4.com/wireguard/tun"

	"github.com/edgewire/edgewire/overlay/identity"
	"github.com/edgewire/edgewire/overlay/internal/trim"
)

// wireguard-go keeps every packet it handles — read from the TUN, received from the Bind, queued
// for encryption, decryption or the TUN — in a message buffer of device.MaxMessageSize (64 KiB, so
// that a GSO super-packet fits), from a pool with no bound on Linux: its queues hold up to 1,024
// batches each, and under a bulk transfer the agent held ~180 MB of them (3,000 buffers) and grew
// past the DaemonSet's 256 MiB limit. Only its Android and iOS builds bound the pool, with a
// constant.
//
// boundBuffers gives the device a pool with a bound of its own instead: once maxBuffers buffers
// are out, the next Get waits until one comes back. The wait is the backpressure the queues lack:
// the TUN reader stops reading (the kernel's TUN queue fills and drops, and TCP slows down), the
// Bind's receivers stop receiving (the socket's buffer fills and drops). This is what wireguard-go's
// own bounded builds do.
//
// The pool is an unexported field, so it is replaced through reflection, checked against the
// layout of the wireguard-go version in go.mod: a version that moves the field makes boundBuffers
// fail (the agent logs it and runs with the unbounded pool) and TestBoundBuffers fail. The
// replacement must happen before any goroutine of the device touches the pool: NewDevice starts
// its TUN reader at once, and that reader's first call is to the TUN device's BatchSize, so the
// device is given a gatedTUN whose BatchSize (and Events, which would bring the device up) wait
// until the pool is in place.

// bufferStats counts the bounded pool's buffers.
type bufferStats struct {
	max uint32
	// made counts buffers made since start. The pool reuses buffers, but the sync.Pool under it
	// lets the garbage collector free idle ones, so made may pass max over time; at most max are
	// out at once (inUse).
	made atomic.Uint64
	// flushes counts the times relieveBuffers flushed staged packets.
	flushes atomic.Uint64
	// lock and count are the pool's own mutex and count of buffers out (nil before boundBuffers).
	lock  *sync.Mutex
	count *uint32
}

// inUse returns how many buffers are out of the pool now.
func (s *bufferStats) inUse() uint32 {
	if s.lock == nil {
		return 0
	}
	s.lock.Lock()
	defer s.lock.Unlock()
	return *s.count
}

// boundBuffers replaces dev's message-buffer pool with one of at most maxBuffers buffers.
func boundBuffers(dev *device.Device, maxBuffers uint32, stats *bufferStats) error {
	if maxBuffers == 0 {
		return errors.New("wireguard buffers: a bound of 0")
	}
	pool := reflect.ValueOf(dev).Elem().FieldByName("pool")
	if !pool.IsValid() || pool.Kind() != reflect.Struct {
		return errors.New("wireguard buffers: this wireguard-go has no Device.pool")
	}
	field := pool.FieldByName("messageBuffers")
	want := reflect.TypeFor[*device.WaitPool]()
	if !field.IsValid() || field.Type() != want {
		return fmt.Errorf("wireguard buffers: this wireguard-go's Device.pool.messageBuffers is not a %v", want)
	}
	bounded := device.NewWaitPool(maxBuffers, func() any {
		stats.made.Add(1)
		return new([device.MaxMessageSize]byte)
	})
	pv := reflect.ValueOf(bounded).Elem()
	lock, count := pv.FieldByName("lock"), pv.FieldByName("count")
	if lock.Type() != reflect.TypeFor[sync.Mutex]() || count.Type() != reflect.TypeFor[uint32]() {
		return errors.New("wireguard buffers: this wireguard-go's WaitPool has no lock and count")
	}
	stats.max = maxBuffers
	stats.lock = (*sync.Mutex)(unsafe.Pointer(lock.UnsafeAddr()))
	stats.count = (*uint32)(unsafe.Pointer(count.UnsafeAddr()))
	reflect.NewAt(want, unsafe.Pointer(field.UnsafeAddr())).Elem().Set(reflect.ValueOf(bounded))
	return nil
}

// gatedTUN is the TUN device handed to wireguard-go: BatchSize and Events wait until open, so that
// no goroutine of the device reaches its pools before boundBuffers has replaced them.
type gatedTUN struct {
	wgtun.Device
	trim      *trim.Trimmer // the TUN reader's batch is trimmed at its next Read when asked
	holder    trim.Holder   // used by the one goroutine that calls Read
	ready     chan struct{}
	openOnce  sync.Once
	events    chan wgtun.Event
	forwarded sync.WaitGroup
}

func newGatedTUN(inner wgtun.Device, t *trim.Trimmer) *gatedTUN {
	return &gatedTUN{Device: inner, trim: t, ready: make(chan struct{}), events: make(chan wgtun.Event)}
}

// Read trims the batch when asked (wireguard-go's TUN reader calls it with buffers of its own that
// hold no packet: those it handed on were replaced), then reads.
func (g *gatedTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	g.trim.Maybe(&g.holder, bufs)
	return g.Device.Read(bufs, sizes, offset)
}

// open lets the device's goroutines through, and forwards the inner device's events from then on
// until it closes their channel.
func (g *gatedTUN) open() {
	g.openOnce.Do(func() {
		close(g.ready)
		g.forwarded.Go(func() {
			defer close(g.events)
			for ev := range g.Device.Events() {
				g.events <- ev
			}
		})
	})
}

func (g *gatedTUN) BatchSize() int {
	<-g.ready
	return g.Device.BatchSize()
}

func (g *gatedTUN) Events() <-chan wgtun.Event { return g.events }

// Close closes the inner device (which closes its events) and waits for the forwarder.
func (g *gatedTUN) Close() error {
	g.open() // a device closed before it was opened still ends its forwarder
	err := g.Device.Close()
	g.forwarded.Wait()
	return err
}

// A bounded pool has one way to stall: packets for a peer without a session wait in that peer's
// staged queue (up to device.QueueStagedSize buffers) until a handshake completes or wireguard-go
// gives up after 90 s, and the handshake's reply needs a receiver that needs a buffer. A few
// unreachable peers with full staged queues could hold every buffer the receivers and TUN reader
// do not. relieveBuffers is the valve: while fewer than relieveMargin buffers are left, it flushes
// the staged packets of every peer (those of peers with a session are sent at once and are rarely
// there), which the senders retransmit once a path exists. It counts the flushes.

// relieveMargin is how close to the bound the pool may come before staged packets are flushed.
const relieveMargin = device.QueueStagedSize

// relieveEvery is how often relieveBuffers looks at the pool.
const relieveEvery = time.Second

// relieveBuffers runs until m.done.
func (m *mesh) relieveBuffers() {
	defer m.wg.Done()
	t := time.NewTicker(relieveEvery)
	defer t.Stop()
	for {
		select {
		case <-m.done:
			return
		case <-t.C:
			if m.buffers.inUse()+relieveMargin < m.buffers.max {
				continue
			}
			m.mu.Lock()
			keys := make([]identity.Key, 0, len(m.peers))
			for k := range m.peers {
				keys = append(keys, k)
			}
			m.mu.Unlock()
			for _, k := range keys {
				if p := m.dev.LookupPeer(device.NoisePublicKey(k)); p != nil {
					p.FlushStagedPackets()
				}
			}
			m.buffers.flushes.Add(1)
			m.logger.Warn("wireguard buffers nearly exhausted: flushed the packets waiting for handshakes",
				"in_use", m.buffers.inUse(), "max", m.buffers.max, "peers", len(keys))
		}
	}
}
