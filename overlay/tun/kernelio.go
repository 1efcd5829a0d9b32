package tun

import (
	"errors"
	"fmt"

	"github.com/edgewire/edgewire/overlay/internal/vnet"
)

// kernelReader reads the kernel TUN for the one goroutine that drives the inbound path (the
// Splitter's own, or wireguard-go's TUN reader through the overlay device).
//
// Without IFF_VNET_HDR (raw nil) it is the kernel device's Read. With it, it reads each packet with its
// virtio header itself: a TCP packet for an OffloadDevice is written to that device whole, super-packet
// and partial checksum included; any other packet is split into MTU-sized segments with their checksums
// (vnet.Split) and returned in bufs, as the kernel device's Read would have.
type kernelReader struct {
	s      *Splitter
	raw    *rawTUN
	routes []*splitRoute // longest prefix first

	buf []byte    // raw mode: one packet with its virtio header, allocated on first use
	one [1][]byte // raw mode: the batch of one given to an offload device's Write
}

// read fills bufs[i][offset:] and sizes like wgtun.Device.Read.
func (k *kernelReader) read(bufs [][]byte, sizes []int, offset int) (int, error) {
	if k.raw == nil {
		return k.s.kernel.Read(bufs, sizes, offset)
	}
	if offset < vnet.HeaderLen {
		return 0, fmt.Errorf("tun: read offset %d leaves no room for the %d-byte virtio header", offset, vnet.HeaderLen)
	}
	if k.buf == nil {
		k.buf = make([]byte, offset+MaxPacketSize)
	}
	s := k.s
	for {
		n, err := k.raw.read(k.buf[offset-vnet.HeaderLen:])
		if err != nil {
			return 0, err
		}
		var h vnet.Header
		if err := h.Decode(k.buf[offset-vnet.HeaderLen : offset-vnet.HeaderLen+n]); err != nil {
			s.malformed.Add(1)
			s.logLimited("dropped packet", "err", err)
			continue
		}
		pkt := k.buf[offset : offset-vnet.HeaderLen+n]
		if err := vnet.Check(pkt, &h); err != nil {
			s.malformed.Add(1)
			s.logLimited("dropped packet", "err", err)
			continue
		}
		if h.GSOType != vnet.GSOUDPL4 {
			if dst, ok := destination(pkt); ok {
				if r := lookup(k.routes, dst); r != nil && r.dev.offload != nil {
					r.packets.Add(1)
					if h.IsTCPSegmentation() {
						s.superIn.Add(1)
					}
					k.one[0] = k.buf[:offset+len(pkt)]
					if _, werr := r.dev.dev.Write(k.one[:], offset); werr != nil && !s.closedErr(werr) {
						s.writeErrors.Add(1)
						s.logLimited("write to device failed", "err", werr)
					}
					k.one[0] = nil
					continue
				}
			}
		}
		m, err := vnet.Split(pkt, h, bufs, sizes, offset)
		if errors.Is(err, vnet.ErrTooManySegments) {
			s.segments.Add(1)
			s.logLimited("dropped segments of a super-packet", "err", err)
			return m, nil
		}
		if err != nil {
			s.malformed.Add(1)
			s.logLimited("dropped packet", "err", err)
			continue
		}
		return m, nil
	}
}

// pump runs d's PumpOffload, writing what it emits to the kernel with the virtio headers it gives.
func (s *Splitter) pump(d *splitDev, raw *rawTUN) {
	defer s.wg.Done()
	w := newRawWriter(raw)
	err := d.offload.PumpOffload(func(h vnet.Header, parts [][]byte) error {
		if err := w.write(h, parts); err != nil {
			if s.closedErr(err) || s.closing.Load() {
				return err
			}
			s.writeErrors.Add(1)
			s.logLimited("write to kernel failed", "err", err)
			return nil
		}
		s.toKernel.Add(1)
		if h.GSOType != vnet.GSONone {
			s.superOut.Add(1)
		}
		return nil
	})
	if err != nil && !s.closedErr(err) && !s.closing.Load() {
		name, _ := d.dev.Name()
		s.log.Error("device stopped pumping packets", "device", name, "err", err)
	}
}
