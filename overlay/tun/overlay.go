package tun

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	wgtun "golang.zx2c4.com/wireguard/tun"
)

// Overlay returns the device wireguard-go is given, for the overlay range. Once it is asked for, the
// Splitter runs no inbound goroutine of its own: wireguard-go's TUN reader calls the overlay device's
// Read, which reads the kernel TUN, hands each packet whose destination is in a Route to that route's
// device (the service netstack) and returns the rest — packets for the overlay range — to
// wireguard-go, in the very buffers it read them into. What wireguard-go decrypts is written back to
// the kernel by the overlay device's Write. So the overlay hop costs no copy and no goroutine hand-off
// beyond wireguard-go's own (Tailscale's tstun wrapper is the model).
//
// Overlay must be called before Start. Closing the overlay device (wireguard-go's Device.Close does)
// closes the kernel TUN, which is what unblocks its reader.
func (s *Splitter) Overlay() wgtun.Device {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.overlay == nil {
		s.overlay = &overlayDev{s: s, events: make(chan wgtun.Event, 1)}
		s.overlay.events <- wgtun.EventUp
	}
	return s.overlay
}

// overlayDev is the tun.Device of wireguard-go.
type overlayDev struct {
	s *Splitter
	// reader is set by Start before ready; it is then used only by the one goroutine that calls Read
	// (wireguard-go reads its TUN from a single goroutine).
	reader *kernelReader
	ready  atomic.Bool

	packetsIn, packetsOut atomic.Uint64

	closeOnce sync.Once
	events    chan wgtun.Event
}

var _ wgtun.Device = (*overlayDev)(nil)

func (o *overlayDev) File() *os.File             { return nil }
func (o *overlayDev) MTU() (int, error)          { return o.s.kernel.MTU() }
func (o *overlayDev) Name() (string, error)      { return o.s.kernel.Name() }
func (o *overlayDev) Events() <-chan wgtun.Event { return o.events }
func (o *overlayDev) BatchSize() int             { return o.s.kernel.BatchSize() }

// Read reads the kernel TUN until at least one packet is for wireguard-go; packets for routed devices are
// written to them and their sizes set to zero, which wireguard-go skips.
func (o *overlayDev) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	if !o.ready.Load() {
		return 0, errors.New("tun: overlay device read before the splitter started")
	}
	s := o.s
	for {
		n, err := o.reader.read(bufs, sizes, offset)
		kept := 0
		for i := range n {
			if sizes[i] < 1 {
				continue
			}
			pkt := bufs[i][offset : offset+sizes[i]]
			dst, ok := destination(pkt)
			if !ok {
				s.malformed.Add(1)
				sizes[i] = 0
				continue
			}
			if r := lookup(o.reader.routes, dst); r != nil {
				r.packets.Add(1)
				r.dev.pending = append(r.dev.pending, bufs[i][:offset+sizes[i]])
				sizes[i] = 0
				continue
			}
			kept++
		}
		o.flush(offset)
		o.packetsIn.Add(uint64(kept))
		if err != nil || kept > 0 {
			return n, err
		}
	}
}

// flush writes each routed device's share of the batch.
func (o *overlayDev) flush(offset int) {
	s := o.s
	for _, d := range s.devs {
		if len(d.pending) == 0 {
			continue
		}
		if _, werr := d.dev.Write(d.pending, offset); werr != nil && !s.closedErr(werr) {
			s.writeErrors.Add(1)
			s.logLimited("write to device failed", "err", werr)
		}
		clear(d.pending)
		d.pending = d.pending[:0]
	}
}

// Write writes what wireguard-go decrypted to the kernel.
func (o *overlayDev) Write(bufs [][]byte, offset int) (int, error) {
	n, err := o.s.kernel.Write(bufs, offset)
	o.packetsOut.Add(uint64(n))
	if err != nil {
		return n, fmt.Errorf("tun: overlay write: %w", err)
	}
	return n, nil
}

// Close closes the kernel TUN, so that a Read blocked in it returns. It is idempotent.
func (o *overlayDev) Close() error {
	var err error
	o.closeOnce.Do(func() {
		close(o.events)
		err = o.s.kernel.Close()
	})
	return err
}
