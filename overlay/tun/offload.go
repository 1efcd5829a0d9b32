package tun

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"

	"github.com/edgewire/edgewire/overlay/internal/vnet"
)

// OffloadDevice is a routed device that takes part in the kernel TUN's segmentation offloads (the
// service netstack). When the kernel TUN has IFF_VNET_HDR, the Splitter gives such a device the
// kernel's TCP packets whole through Write — super-packets of up to 64 KiB, their TCP checksum holding
// only the pseudo-header sum (see package vnet) — instead of MTU-sized segments whose checksums it would
// have computed; and instead of reading the device, it calls PumpOffload, which writes every packet the
// device emits to the kernel with its virtio header, so the device's own segmentation-offload packets
// reach the kernel whole too. Without IFF_VNET_HDR an OffloadDevice is treated as any other device.
type OffloadDevice interface {
	wgtun.Device
	// PumpOffload writes every packet the device emits through write until the device closes, then
	// returns nil (or an error saying why it stopped early). It may call write from one goroutine only;
	// parts are the packet's bytes in order, valid during the call.
	PumpOffload(write func(h vnet.Header, parts [][]byte) error) error
}

// rawTUN is the kernel TUN's file when the device has IFF_VNET_HDR: every packet read or written is
// preceded by a virtio_net_hdr.
type rawTUN struct {
	f  *os.File
	rc syscall.RawConn
}

// rawOf returns the raw side of dev (a wireguard-go TUN) if its file has IFF_VNET_HDR, or nil.
func rawOf(dev wgtun.Device) *rawTUN {
	f := dev.File()
	if f == nil {
		return nil
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return nil
	}
	var flags uint16
	cerr := rc.Control(func(fd uintptr) {
		ifr, err := unix.NewIfreq("")
		if err != nil {
			return
		}
		if err := unix.IoctlIfreq(int(fd), unix.TUNGETIFF, ifr); err == nil {
			flags = ifr.Uint16()
		}
	})
	if cerr != nil || flags&unix.IFF_VNET_HDR == 0 {
		return nil
	}
	return &rawTUN{f: f, rc: rc}
}

// read reads one packet with its virtio header into buf.
func (r *rawTUN) read(buf []byte) (int, error) {
	n, err := r.f.Read(buf)
	if errors.Is(err, syscall.EBADFD) {
		err = os.ErrClosed
	}
	return n, err
}

// rawWriter writes packets with virtio headers to the kernel TUN with writev, from one goroutine.
type rawWriter struct {
	r    *rawTUN
	hdr  [vnet.HeaderLen]byte
	iovs [][]byte
	// do is the RawConn callback, built once so that a write allocates nothing.
	do    func(fd uintptr) bool
	total int
	err   error
}

func newRawWriter(r *rawTUN) *rawWriter {
	w := &rawWriter{r: r, iovs: make([][]byte, 0, 8)}
	w.do = w.writev
	return w
}

// maxOffloadPacket is the largest packet a write may carry: an IP packet's length field.
const maxOffloadPacket = 65535

// write writes one packet, the concatenation of parts, preceded by h.
func (w *rawWriter) write(h vnet.Header, parts [][]byte) error {
	h.Encode(w.hdr[:])
	w.iovs = w.iovs[:0]
	w.iovs = append(w.iovs, w.hdr[:])
	w.total = 0
	for _, p := range parts {
		if len(p) == 0 {
			continue
		}
		w.iovs = append(w.iovs, p)
		w.total += len(p)
	}
	if w.total == 0 || w.total > maxOffloadPacket {
		return fmt.Errorf("tun: %d-byte packet: want 1 to %d bytes", w.total, maxOffloadPacket)
	}
	w.err = nil
	err := w.r.rc.Write(w.do)
	clear(w.iovs) // no reference to the packet's memory past the call
	if err != nil {
		return err
	}
	return w.err
}

func (w *rawWriter) writev(fd uintptr) bool {
	n, err := unix.Writev(int(fd), w.iovs)
	if err == unix.EAGAIN {
		return false
	}
	if err != nil {
		w.err = err
	} else if n != len(w.hdr)+w.total {
		w.err = fmt.Errorf("tun: short write: %d of %d bytes", n, len(w.hdr)+w.total)
	}
	return true
}
