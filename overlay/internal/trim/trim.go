// Package trim owns giving the pages of idle packet buffers back to the kernel. wireguard-go's TUN
// reader and each of its socket receivers hold a batch of 64 KiB buffers for good (128 each); a
// bulk transfer writes every page of them, and they stay resident after it, some 8 MiB per holder,
// although the process holds no packet in them between two calls. A Trimmer is asked (Request)
// when the agent has returned its free memory after a load; each holder then, at the start of its
// next call, while the batch's buffers are its own and empty, advises the kernel to drop their
// pages (madvise MADV_DONTNEED: the next write faults in a zero page). Nothing is trimmed while a
// packet may be in a buffer, so no data is ever lost.
package trim

import (
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Trimmer counts trim requests. The zero value is ready; a nil *Trimmer never asks for a trim.
type Trimmer struct {
	gen     atomic.Uint64
	trimmed atomic.Uint64 // bytes advised away
}

// Request asks every holder to trim its batch at its next call.
func (t *Trimmer) Request() { t.gen.Add(1) }

// Trimmed is how many bytes of buffer pages have been given back.
func (t *Trimmer) Trimmed() uint64 { return t.trimmed.Load() }

// Holder is one holder's state: it must be used by one goroutine (the one that makes the calls).
type Holder struct {
	seen uint64
}

// Maybe trims bufs if a request came since h's last trim. bufs must be buffers no one else reads
// or writes during the call and whose contents are not needed.
func (t *Trimmer) Maybe(h *Holder, bufs [][]byte) {
	if t == nil {
		return
	}
	g := t.gen.Load()
	if g == h.seen {
		return
	}
	h.seen = g
	var n uint64
	for _, b := range bufs {
		n += dontNeed(b[:cap(b)])
	}
	t.trimmed.Add(n)
}

var pageSize = uintptr(unix.Getpagesize())

// dontNeed advises the kernel to drop the whole pages inside b and returns how many bytes they
// span.
func dontNeed(b []byte) uint64 {
	if len(b) == 0 {
		return 0
	}
	start := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	end := start + uintptr(len(b))
	first := (start + pageSize - 1) &^ (pageSize - 1)
	last := end &^ (pageSize - 1)
	if last <= first {
		return 0
	}
	pages := b[first-start : last-start]
	if unix.Madvise(pages, unix.MADV_DONTNEED) != nil {
		return 0
	}
	return uint64(len(pages))
}
