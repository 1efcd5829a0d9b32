package vnet

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"strings"
	"testing"
)

// naiveSum is the textbook one's-complement sum of big-endian 16-bit words, folded.
func naiveSum(b []byte, initial uint32) uint16 {
	sum := initial
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}

func TestChecksum(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{0, 1, 2, 3, 7, 8, 9, 31, 32, 33, 63, 100, 1379, 1500, 65535} {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		for _, initial := range []uint32{0, 1, 0xffff, 0x12345} {
			want := naiveSum(b, initial)
			if got := Fold(Checksum(b, uint64(initial))); got != want {
				t.Errorf("len %d initial %#x: Checksum folds to %#04x, want %#04x", n, initial, got, want)
			}
		}
	}
	ones := bytes.Repeat([]byte{0xff}, 64)
	if got := Fold(Checksum(ones, 0)); got != 0xffff {
		t.Errorf("all ones: %#04x, want 0xffff", got)
	}
}

func TestHeaderRoundTrip(t *testing.T) {
	h := Header{Flags: NeedsChecksum, GSOType: GSOTCPv6, HdrLen: 60, GSOSize: 1380, CsumStart: 40, CsumOffset: 16}
	b := make([]byte, HeaderLen)
	h.Encode(b)
	var got Header
	if err := got.Decode(b); err != nil {
		t.Fatal(err)
	}
	if got != h {
		t.Fatalf("decoded %+v, want %+v", got, h)
	}
	if err := got.Decode(b[:9]); err == nil {
		t.Fatal("Decode of 9 bytes: no error")
	}
}

// superPacket builds a segmentation-offload packet as the kernel hands it over: IP header with the
// total length, transport header whose checksum holds the pseudo-header sum, payload.
func superPacket(t *testing.T, v6 bool, proto uint8, payload []byte, flags byte) ([]byte, Header) {
	t.Helper()
	ipLen, thLen := 20, 20
	if v6 {
		ipLen = 40
	}
	if proto == protoUDP {
		thLen = 8
	}
	pkt := make([]byte, ipLen+thLen+len(payload))
	var src, dst []byte
	if v6 {
		pkt[0] = 6 << 4
		binary.BigEndian.PutUint16(pkt[4:], uint16(len(pkt)-ipLen))
		pkt[6], pkt[7] = proto, 64
		copy(pkt[8:], bytes.Repeat([]byte{0xfd, 1}, 8))
		copy(pkt[24:], bytes.Repeat([]byte{0xfd, 2}, 8))
		src, dst = pkt[8:24], pkt[24:40]
	} else {
		pkt[0] = 0x45
		binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
		binary.BigEndian.PutUint16(pkt[4:], 0xfff0) // the ID wraps while splitting
		pkt[8], pkt[9] = 64, proto
		copy(pkt[12:], []byte{10, 0, 0, 1, 9, 251, 0, 10})
		binary.BigEndian.PutUint16(pkt[10:], ^naiveSum(pkt[:20], 0))
		src, dst = pkt[12:16], pkt[16:20]
	}
	th := pkt[ipLen:]
	binary.BigEndian.PutUint16(th[0:], 40000)
	binary.BigEndian.PutUint16(th[2:], 80)
	h := Header{Flags: NeedsChecksum, CsumStart: uint16(ipLen), GSOSize: 1000}
	if proto == protoTCP {
		binary.BigEndian.PutUint32(th[4:], 0xfffffc00) // the sequence number wraps too
		th[12] = 5 << 4
		th[13] = flags
		h.CsumOffset = 16
		h.GSOType = GSOTCPv4
		if v6 {
			h.GSOType = GSOTCPv6
		}
	} else {
		binary.BigEndian.PutUint16(th[4:], uint16(len(pkt)-ipLen))
		h.CsumOffset = 6
		h.GSOType = GSOUDPL4
	}
	copy(pkt[ipLen+thLen:], payload)
	partial := Fold(PseudoHeaderSum(proto, src, dst, uint16(len(pkt)-ipLen)))
	binary.BigEndian.PutUint16(pkt[int(h.CsumStart)+int(h.CsumOffset):], partial)
	h.HdrLen = 0xffff // the kernel's hdr_len is not trusted: Check recomputes it
	return pkt, h
}

// validTransport reports whether the transport checksum of an IP packet verifies.
func validTransport(pkt []byte) bool {
	var ipLen int
	var proto uint8
	var pseudo []byte
	if pkt[0]>>4 == 6 {
		ipLen, proto = 40, pkt[6]
		pseudo = append(append([]byte{}, pkt[8:40]...), 0, 0, 0, proto)
	} else {
		ipLen, proto = 20, pkt[9]
		pseudo = append(append([]byte{}, pkt[12:20]...), 0, proto)
	}
	l := len(pkt) - ipLen
	pseudo = binary.BigEndian.AppendUint16(pseudo, uint16(l))
	return naiveSum(pkt[ipLen:], uint32(naiveSum(pseudo, 0))) == 0xffff
}

func TestSplit(t *testing.T) {
	payload := make([]byte, 4500)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	for _, tc := range []struct {
		name  string
		v6    bool
		proto uint8
	}{
		{"tcp4", false, protoTCP},
		{"tcp6", true, protoTCP},
		{"udp4", false, protoUDP},
		{"udp6", true, protoUDP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pkt, h := superPacket(t, tc.v6, tc.proto, payload, tcpFlagFIN|tcpFlagPSH|0x10)
			if err := Check(pkt, &h); err != nil {
				t.Fatalf("Check: %v", err)
			}
			const offset = 16
			bufs := make([][]byte, 8)
			for i := range bufs {
				bufs[i] = make([]byte, offset+1500)
			}
			sizes := make([]int, len(bufs))
			n, err := Split(pkt, h, bufs, sizes, offset)
			if err != nil {
				t.Fatalf("Split: %v", err)
			}
			if n != 5 {
				t.Fatalf("Split made %d segments, want 5", n)
			}
			var got []byte
			for i := range n {
				seg := bufs[i][offset : offset+sizes[i]]
				hl := int(h.HdrLen)
				got = append(got, seg[hl:]...)
				if !validTransport(seg) {
					t.Errorf("segment %d: transport checksum does not verify", i)
				}
				if tc.v6 {
					if l := int(binary.BigEndian.Uint16(seg[4:])); l != len(seg)-40 {
						t.Errorf("segment %d: payload length %d, want %d", i, l, len(seg)-40)
					}
				} else {
					if naiveSum(seg[:20], 0) != 0xffff {
						t.Errorf("segment %d: IPv4 header checksum does not verify", i)
					}
					if l := int(binary.BigEndian.Uint16(seg[2:])); l != len(seg) {
						t.Errorf("segment %d: total length %d, want %d", i, l, len(seg))
					}
					if id := binary.BigEndian.Uint16(seg[4:]); id != uint16(0xfff0+i) {
						t.Errorf("segment %d: ID %#x, want %#x", i, id, uint16(0xfff0+i))
					}
				}
				th := seg[h.CsumStart:]
				if tc.proto == protoTCP {
					if seq := binary.BigEndian.Uint32(th[4:]); seq != 0xfffffc00+uint32(i)*1000 {
						t.Errorf("segment %d: seq %#x", i, seq)
					}
					last := i == n-1
					if fin := th[13]&(tcpFlagFIN|tcpFlagPSH) != 0; fin != last {
						t.Errorf("segment %d: FIN/PSH set %v, want %v", i, fin, last)
					}
				} else if l := int(binary.BigEndian.Uint16(th[4:])); l != len(seg)-int(h.CsumStart) {
					t.Errorf("segment %d: UDP length %d, want %d", i, l, len(seg)-int(h.CsumStart))
				}
			}
			if !bytes.Equal(got, payload) {
				t.Fatal("segments' payloads do not add up to the super-packet's")
			}
		})
	}
}

func TestSplitTooManySegments(t *testing.T) {
	pkt, h := superPacket(t, false, protoTCP, make([]byte, 3500), 0x10)
	if err := Check(pkt, &h); err != nil {
		t.Fatal(err)
	}
	bufs := [][]byte{make([]byte, 1500), make([]byte, 1500)}
	if _, err := Split(pkt, h, bufs, make([]int, 2), 0); err != ErrTooManySegments {
		t.Fatalf("Split into 2 buffers: %v, want ErrTooManySegments", err)
	}
}

func TestComplete(t *testing.T) {
	pkt, h := superPacket(t, true, protoTCP, []byte("hello, partial checksum"), 0x18)
	h.GSOType, h.GSOSize = GSONone, 0
	if err := Check(pkt, &h); err != nil {
		t.Fatal(err)
	}
	bufs := [][]byte{make([]byte, 200)}
	sizes := []int{0}
	if n, err := Split(pkt, h, bufs, sizes, 0); err != nil || n != 1 {
		t.Fatalf("Split of a plain packet: %d, %v", n, err)
	}
	if !validTransport(bufs[0][:sizes[0]]) {
		t.Fatal("completed checksum does not verify")
	}
}

func TestCheckRejects(t *testing.T) {
	good := func() ([]byte, Header) { return superPacket(t, false, protoTCP, make([]byte, 3000), 0x10) }
	for _, tc := range []struct {
		name   string
		mangle func([]byte, *Header) []byte
		want   string
	}{
		{"empty", func(p []byte, h *Header) []byte { return nil }, "empty"},
		{"version", func(p []byte, h *Header) []byte { p[0] = 0x55; return p }, "IP version 5"},
		{"gso type", func(p []byte, h *Header) []byte { h.GSOType = 3; return p }, "unsupported GSO type 3"},
		{"tcp6 on v4", func(p []byte, h *Header) []byte { h.GSOType = GSOTCPv6; return p }, "on an IPv4 packet"},
		{"no partial checksum", func(p []byte, h *Header) []byte { h.Flags = 0; return p }, "without a partial checksum"},
		{"gso size 0", func(p []byte, h *Header) []byte { h.GSOSize = 0; return p }, "GSO size 0"},
		{"csum start in ip header", func(p []byte, h *Header) []byte { h.CsumStart = 10; return p }, "inside the IPv4 header"},
		{"checksum outside", func(p []byte, h *Header) []byte { h.CsumOffset = 60000; return p }, "outside"},
		{"truncated tcp", func(p []byte, h *Header) []byte { return p[:30] }, "checksum at 20+16 outside a 30-byte packet"},
		{"tcp header length", func(p []byte, h *Header) []byte { p[32] = 2 << 4; return p }, "TCP header length 8"},
		{"headers longer than packet", func(p []byte, h *Header) []byte { p[32] = 15 << 4; return p[:60] }, "headers of 80 bytes in a 60-byte packet"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, h := good()
			p = tc.mangle(p, &h)
			err := Check(p, &h)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Check: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

func BenchmarkChecksum(b *testing.B) {
	buf := make([]byte, 1420)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		Checksum(buf, 0)
	}
}
