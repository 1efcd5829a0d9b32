//go:build linux

package relay

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
)

// sentMsg is a message a fakeBatchConn sent: its destination, its bytes, and its GSO segment size
// (0: one datagram).
type sentMsg struct {
	to  netip.AddrPort
	b   []byte
	seg int
}

// fakeBatchConn records what WriteBatch sends (copies, as the kernel would make), and fails the
// sends that fail says should fail.
type fakeBatchConn struct {
	sent  []sentMsg
	calls int
	fail  func(m sentMsg) error
}

func (f *fakeBatchConn) ReadBatch([]ipv4.Message, int) (int, error) { return 0, net.ErrClosed }

func (f *fakeBatchConn) WriteBatch(ms []ipv4.Message, _ int) (int, error) {
	f.calls++
	for i, m := range ms {
		s := sentMsg{to: m.Addr.(*net.UDPAddr).AddrPort(), b: bytes.Clone(m.Buffers[0]), seg: gsoSegment(m.OOB)}
		if f.fail != nil {
			if err := f.fail(s); err != nil {
				if i == 0 {
					return -1, err // as x/net passes on sendmmsg's -1
				}
				return i, nil
			}
		}
		f.sent = append(f.sent, s)
	}
	return len(ms), nil
}

// gsoSegment is the size of a UDP_SEGMENT control message in oob, 0 without one.
func gsoSegment(oob []byte) int {
	for len(oob) >= unix.SizeofCmsghdr {
		hdr, data, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			return -1
		}
		if hdr.Level == unix.SOL_UDP && hdr.Type == unix.UDP_SEGMENT && len(data) >= 2 {
			return int(binary.NativeEndian.Uint16(data))
		}
		oob = rest
	}
	return 0
}

// datagrams cuts the messages into the datagrams the kernel would send: "port:tag" each, where tag
// is the byte the frame's payload repeats ('!' if it does not).
func datagrams(sent []sentMsg) []string {
	var out []string
	for _, m := range sent {
		seg := m.seg
		if seg == 0 {
			seg = len(m.b)
		}
		for off := 0; off < len(m.b); off += seg {
			f := m.b[off:min(off+seg, len(m.b))]
			tag := f[DataHeaderLen]
			if bytes.Count(f[DataHeaderLen:], []byte{tag}) != len(f)-DataHeaderLen {
				tag = '!' // a frame overwritten in part
			}
			out = append(out, fmt.Sprintf("%d:%c", m.to.Port(), tag))
		}
	}
	return out
}

// TestUDPWriter feeds frames to a udpWriter the way readUDP does — in order, each a slice of its
// read buffer with the capacity to the buffer's end — and checks what it sends: every datagram,
// in order, to its destination, and runs of one size to one destination coalesced with GSO.
func TestUDPWriter(t *testing.T) {
	dstA, dstB := netip.MustParseAddrPort("192.0.2.1:1"), netip.MustParseAddrPort("192.0.2.2:2")
	dsts := map[byte]netip.AddrPort{'a': dstA, 'b': dstB}
	// A frame is "<dst><tag><size>" in the spec strings below: dst a or b, or x for a frame that is
	// handled but not forwarded (dropped); tag a letter that ends up in the payload.
	type item struct {
		dst  byte
		tag  byte
		size int
	}
	parse := func(spec string) (buffers [][]item) {
		for _, buf := range strings.Split(spec, "|") {
			var items []item
			for _, f := range strings.Fields(buf) {
				var size int
				fmt.Sscanf(f[2:], "%d", &size)
				items = append(items, item{f[0], f[1], size})
			}
			buffers = append(buffers, items)
		}
		return buffers
	}
	tests := []struct {
		name string
		// spec lists the read buffers ("|" between them) and their frames, as GRO would fill them.
		spec string
		gso  bool
		fail func(m sentMsg) error
		// want is the datagrams sent, "port:tag"; msgs how many messages (GSO sends) carried them.
		want    string
		msgs    int
		wantOff bool // GSO is turned off
		failed  uint64
	}{
		{name: "one run", spec: "a1100 a2100 a3100", gso: true, want: "1:1 1:2 1:3", msgs: 1},
		{name: "shorter last frame ends the message", spec: "a1100 a2100 a350 a4100", gso: true,
			want: "1:1 1:2 1:3 1:4", msgs: 2},
		{name: "dropped frame in the middle", spec: "a1100 x2100 a3100 a4100", gso: true, want: "1:1 1:3 1:4", msgs: 1},
		{name: "destinations interleaved", spec: "a1100 b2100 a3100 a4100 b5100", gso: true,
			want: "1:1 2:2 1:3 1:4 2:5", msgs: 4},
		{name: "runs across read buffers", spec: "a1100 a2100 | a3100 a4100 | b5100 | b6100 a7100", gso: true,
			want: "1:1 1:2 1:3 1:4 2:5 2:6 1:7", msgs: 3},
		{name: "dropped frames at a buffer's end and start", spec: "a1100 x2100 | x3100 a4100", gso: true,
			want: "1:1 1:4", msgs: 1},
		{name: "larger frame starts a new message", spec: "a1100 a2200 a3200", gso: true, want: "1:1 1:2 1:3", msgs: 2},
		{name: "at most maxGSOBytes in a message", spec: "a130000 a230000 | a330000", gso: true,
			want: "1:1 1:2 1:3", msgs: 2},
		{name: "without GSO one message a frame", spec: "a1100 a2100 | a3100", gso: false, want: "1:1 1:2 1:3", msgs: 3},
		{name: "a failed single datagram is dropped, the rest go", spec: "a1100 b2100 a3100", gso: true,
			fail: func(m sentMsg) error {
				if m.to == dstB {
					return os.NewSyscallError("sendmmsg", unix.EPERM)
				}
				return nil
			},
			want: "1:1 1:3", msgs: 2, failed: 1},
		{name: "a GSO send the device cannot checksum: sent singly, GSO off", spec: "a1100 a2100 | a3100 b4100", gso: true,
			fail: func(m sentMsg) error {
				if m.seg != 0 {
					return os.NewSyscallError("sendmmsg", unix.EIO)
				}
				return nil
			},
			want: "1:1 1:2 1:3 2:4", msgs: 4, wantOff: true},
		{name: "a GSO send refused otherwise (segment over the MTU): sent singly, GSO stays", spec: "a1100 a2100 a3100",
			gso: true,
			fail: func(m sentMsg) error {
				if m.seg != 0 {
					return os.NewSyscallError("sendmmsg", unix.EINVAL)
				}
				return nil
			},
			want: "1:1 1:2 1:3", msgs: 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fc := &fakeBatchConn{fail: tc.fail}
			w := newUDPWriter(fc, tc.gso)
			var want []string
			if tc.want != "" {
				want = strings.Fields(tc.want)
			}
			var frames int
			for _, items := range parse(tc.spec) {
				// One read buffer, filled as GRO fills it: the frames back to back.
				buf := make([]byte, 0, udpBufSize)
				for _, it := range items {
					f := AppendDataHeader(buf[len(buf):], 0)
					f = append(f, bytes.Repeat([]byte{it.tag}, it.size-DataHeaderLen)...)
					buf = buf[:len(buf)+len(f)]
				}
				off := 0
				for _, it := range items {
					frame := buf[off : off+it.size]
					off += it.size
					if to, ok := dsts[it.dst]; ok {
						w.add(frame, to, net.UDPAddrFromAddrPort(to))
						frames++
					}
				}
			}
			r := w.flush()
			if got := datagrams(fc.sent); !slices.Equal(got, want) {
				t.Fatalf("sent %v, want %v", got, want)
			}
			if len(fc.sent) != tc.msgs {
				t.Errorf("%d messages, want %d", len(fc.sent), tc.msgs)
			}
			for _, m := range fc.sent {
				if m.seg < 0 {
					t.Errorf("bad control message")
				}
				if m.seg > 0 && (len(m.b) > maxGSOBytes || (len(m.b)+m.seg-1)/m.seg > maxGSOSegments) {
					t.Errorf("GSO message of %d bytes in segments of %d", len(m.b), m.seg)
				}
			}
			if r.gsoOff != tc.wantOff || w.gso != (tc.gso && !tc.wantOff) {
				t.Errorf("gsoOff %v, writer GSO %v; want GSO turned off: %v", r.gsoOff, w.gso, tc.wantOff)
			}
			if r.failed != tc.failed || r.frames != uint64(len(want)) || r.frames+r.failed != uint64(frames) {
				t.Errorf("flush: %d sent, %d failed of %d; want %d failed", r.frames, r.failed, frames, tc.failed)
			}
			var wantPayload uint64
			for _, m := range fc.sent {
				seg := m.seg
				if seg == 0 {
					seg = len(m.b)
				}
				wantPayload += uint64(len(m.b) - (len(m.b)+seg-1)/seg*DataHeaderLen)
			}
			if r.payload != wantPayload {
				t.Errorf("payload %d, want %d", r.payload, wantPayload)
			}
		})
	}
}

// TestUDPWriterMaxSegments checks that a run longer than the kernel's limit is cut into messages of
// at most maxGSOSegments datagrams.
func TestUDPWriterMaxSegments(t *testing.T) {
	to := netip.MustParseAddrPort("192.0.2.1:1")
	fc := &fakeBatchConn{}
	w := newUDPWriter(fc, true)
	const n, size = 2*maxGSOSegments + 1, 40
	buf := make([]byte, n*size, udpBufSize)
	for i := range n {
		copy(buf[i*size:], AppendDataHeader(nil, 0))
		w.add(buf[i*size:(i+1)*size], to, net.UDPAddrFromAddrPort(to))
	}
	if r := w.flush(); r.frames != n {
		t.Fatalf("sent %d frames, want %d", r.frames, n)
	}
	if len(fc.sent) != 3 || fc.calls != 1 {
		t.Fatalf("%d messages in %d calls, want 3 in 1", len(fc.sent), fc.calls)
	}
	for i, m := range fc.sent {
		if want := min(maxGSOSegments, n-i*maxGSOSegments) * size; len(m.b) != want {
			t.Errorf("message %d: %d bytes, want %d", i, len(m.b), want)
		}
	}
	// The batch is empty again.
	if r := w.flush(); r.frames != 0 || len(fc.sent) != 3 {
		t.Errorf("second flush sent %d frames", r.frames)
	}
}
