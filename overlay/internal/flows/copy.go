package flows

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// BufferSize is the size of the buffers Copy uses: 64 KiB, which also holds any UDP datagram.
const BufferSize = 64 << 10

// Buffers is a pool of BufferSize buffers. The zero value is ready; it must not be copied after first
// use. A buffer is held only while a flow moves data (see Copy), so the pool's size follows the data
// in flight, not the flows open.
type Buffers struct {
	pool  sync.Pool
	inUse atomic.Int64
}

// Get returns a buffer of BufferSize bytes.
func (b *Buffers) Get() *[]byte {
	b.inUse.Add(1)
	if v, ok := b.pool.Get().(*[]byte); ok {
		return v
	}
	buf := make([]byte, BufferSize)
	return &buf
}

// Put gives back a buffer Get returned.
func (b *Buffers) Put(p *[]byte) {
	b.inUse.Add(-1)
	b.pool.Put(p)
}

// InUse returns the number of buffers taken and not given back.
func (b *Buffers) InUse() int64 { return b.inUse.Load() }

// WaitReadable blocks until the socket of rc has something to read without blocking: data, a
// datagram, end of stream, or a pending error, honouring the socket's read deadline. It reads
// nothing, except a pending socket error (a reset, an ICMP error on a connected UDP socket), which
// peeking consumes: that error is returned, wrapped, for the caller to treat as the read's. An error
// of rc itself (the conn was closed, the deadline passed) is returned as it is.
func WaitReadable(rc syscall.RawConn) error {
	var serr error
	err := rc.Read(func(fd uintptr) bool {
		var b [1]byte
		_, _, serr = unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		return !errors.Is(serr, unix.EAGAIN)
	})
	if err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("recvfrom: %w", serr)
	}
	return nil
}

// SocketWaiter returns a wait function for Copy that waits with WaitReadable on c's socket, or nil
// when c is not a syscall.Conn (Copy then holds a buffer while it waits).
func SocketWaiter(c any) func() error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return func() error { return WaitReadable(rc) }
}

// Copy copies src to dst until src's end of stream, when it returns nil, or the first error, which
// it returns; every byte written is added to count as it goes.
//
// wait, when not nil, blocks until src has something to read (data, end of stream or an error);
// Copy takes a buffer from bufs only then, and gives it back once a read returns less than a full
// buffer, before it waits again: an idle flow holds no buffer. Without wait, Copy holds a buffer for
// as long as it runs.
func Copy(dst io.Writer, src io.Reader, wait func() error, bufs *Buffers, count *atomic.Uint64) error {
	for {
		if wait != nil {
			if err := wait(); err != nil {
				return err
			}
		}
		bp := bufs.Get()
		err := copyReady(dst, src, *bp, count, wait != nil)
		bufs.Put(bp)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// copyReady copies while src has data for it: until an error (io.EOF at the end of src) or, when
// drained is set, until a read returns less than buf's length, which it reports as nil.
func copyReady(dst io.Writer, src io.Reader, buf []byte, count *atomic.Uint64, drained bool) error {
	for {
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			count.Add(uint64(nw))
			if werr != nil {
				return werr
			}
			if nw != nr {
				return io.ErrShortWrite
			}
		}
		if rerr != nil {
			return rerr
		}
		if drained && nr < len(buf) {
			return nil
		}
	}
}
