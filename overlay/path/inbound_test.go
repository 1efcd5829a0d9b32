package path

import (
	"bytes"
	"io"
	"log/slog"
	"net/netip"
	"testing"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/conn/bindtest"
)

func TestClassify(t *testing.T) {
	tests := []struct {
		name string
		pkt  []byte
		want bool
	}{
		{"initiation", wgMsg(wgTypeInitiation, 148), true},
		{"initiation short", wgMsg(wgTypeInitiation, 147), false},
		{"initiation long", wgMsg(wgTypeInitiation, 149), false},
		{"response", wgMsg(wgTypeResponse, 92), true},
		{"response short", wgMsg(wgTypeResponse, 91), false},
		{"response at initiation size", wgMsg(wgTypeResponse, 148), false},
		{"cookie reply", wgMsg(wgTypeCookieReply, 64), true},
		{"cookie reply long", wgMsg(wgTypeCookieReply, 65), false},
		{"keepalive", wgMsg(wgTypeTransport, 32), true},
		{"transport 16-byte payload", wgMsg(wgTypeTransport, 48), true},
		{"transport full segment", wgMsg(wgTypeTransport, 1440), true},
		{"transport too short", wgMsg(wgTypeTransport, 16), false},
		{"transport 31 bytes", wgMsg(wgTypeTransport, 31), false},
		{"transport 33 bytes (padding stops at the MTU)", wgMsg(wgTypeTransport, 33), true},
		{"transport 1452 bytes: a full 1420-byte packet", wgMsg(wgTypeTransport, 1452), true},
		{"transport 31 bytes: shorter than a keepalive", wgMsg(wgTypeTransport, 31), false},
		{"reserved byte 1 set", withByte(wgMsg(wgTypeInitiation, 148), 1, 1), false},
		{"reserved byte 2 set", withByte(wgMsg(wgTypeResponse, 92), 2, 1), false},
		{"reserved byte 3 set", withByte(wgMsg(wgTypeTransport, 32), 3, 0xff), false},
		{"type 0", wgMsg(0, 148), false},
		{"type 5", wgMsg(5, 32), false},
		{"type in high byte", withByte(wgMsg(0, 32), 3, wgTypeTransport), false},
		{"probe magic", probe(1), false},
		{"probe magic padded to 148", append(probe(1), make([]byte, 148-len(probe(1)))...), false},
		{"empty", []byte{}, false},
		{"nil", nil, false},
		{"1 byte", []byte{wgTypeTransport}, false},
		{"4-byte header only", wgMsg(wgTypeTransport, 4), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := isWireGuard(tc.pkt); got != tc.want {
				t.Errorf("isWireGuard(%d bytes %x…) = %v, want %v", len(tc.pkt), head(tc.pkt), got, tc.want)
			}
			// Whatever is WireGuard also has the prefix SendTo refuses.
			if tc.want && !looksLikeWireGuard(tc.pkt) {
				t.Errorf("looksLikeWireGuard = false for a WireGuard message")
			}
		})
	}
}

// TestDemux runs the receive wrapper over hand-built batches: WireGuard stays in the batch, the
// rest goes to OnPacket (or is dropped) with its size zeroed, and the counters add up.
func TestDemux(t *testing.T) {
	src := netip.MustParseAddrPort("192.0.2.7:41641")
	mapped := netip.AddrPortFrom(netip.AddrFrom16(src.Addr().As16()), src.Port())
	std := &conn.StdNetEndpoint{AddrPort: src}
	stdMapped := &conn.StdNetEndpoint{AddrPort: mapped}
	channel := bindtest.ChannelEndpoint(3) // DstToString "127.0.0.1:3"

	type in struct {
		pkt []byte
		ep  conn.Endpoint
	}
	tests := []struct {
		name        string
		handler     bool
		batch       []in
		wantSizes   []int
		wantFrom    []netip.AddrPort // OnPacket sources, in order
		wantStats   Stats
		wantDropLog bool
	}{
		{
			name:      "all WireGuard",
			handler:   true,
			batch:     []in{{wgMsg(wgTypeInitiation, 148), std}, {wgMsg(wgTypeTransport, 64), std}},
			wantSizes: []int{148, 64},
			wantStats: Stats{WireGuardIn: 2},
		},
		{
			name:      "mixed with handler",
			handler:   true,
			batch:     []in{{probe(0), std}, {wgMsg(wgTypeTransport, 32), std}, {probe(1), stdMapped}, {probe(2), channel}},
			wantSizes: []int{0, 32, 0, 0},
			wantFrom:  []netip.AddrPort{src, src, netip.MustParseAddrPort("127.0.0.1:3")},
			wantStats: Stats{WireGuardIn: 1, OtherIn: 3},
		},
		{
			name:        "no handler",
			handler:     false,
			batch:       []in{{probe(0), std}, {wgMsg(wgTypeResponse, 92), std}, {[]byte{7}, std}},
			wantSizes:   []int{0, 92, 0},
			wantStats:   Stats{WireGuardIn: 1, OtherIn: 2, OtherDropped: 2},
			wantDropLog: true,
		},
		{
			name:        "no endpoint",
			handler:     true,
			batch:       []in{{probe(0), nil}, {probe(1), (*conn.StdNetEndpoint)(nil)}, {probe(2), &conn.StdNetEndpoint{}}},
			wantSizes:   []int{0, 0, 0},
			wantStats:   Stats{OtherIn: 3, OtherDropped: 3},
			wantDropLog: true,
		},
		{
			name:      "empty slots ignored",
			handler:   true,
			batch:     []in{{nil, std}, {wgMsg(wgTypeTransport, 32), std}},
			wantSizes: []int{0, 32},
			wantStats: Stats{WireGuardIn: 1},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var from []netip.AddrPort
			var logs bytes.Buffer
			cfg := Config{Logger: debugLogger(&logs)}
			if tc.handler {
				cfg.OnPacket = func(pkt []byte, f netip.AddrPort) {
					if !bytes.HasPrefix(pkt, probeMagic) {
						t.Errorf("OnPacket got %x, not a probe", head(pkt))
					}
					from = append(from, f)
				}
			}
			b := NewBind(cfg)
			n := len(tc.batch)
			bufs, sizes, eps := batch(n + 2) // longer than the batch: the tail must be left alone
			fn := b.wrapReceive(func(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
				for i, p := range tc.batch {
					sizes[i] = copy(bufs[i], p.pkt)
					eps[i] = p.ep
				}
				sizes[n], sizes[n+1] = 999, 999
				return n, nil
			})
			got, err := fn(bufs, sizes, eps)
			if err != nil || got != n {
				t.Fatalf("receive = %d, %v; want %d, nil", got, err, n)
			}
			for i, want := range tc.wantSizes {
				if sizes[i] != want {
					t.Errorf("sizes[%d] = %d, want %d", i, sizes[i], want)
				}
			}
			if sizes[n] != 999 || sizes[n+1] != 999 {
				t.Errorf("sizes past n were changed: %v", sizes[n:])
			}
			if len(from) != len(tc.wantFrom) {
				t.Fatalf("OnPacket sources %v, want %v", from, tc.wantFrom)
			}
			for i := range from {
				if from[i] != tc.wantFrom[i] {
					t.Errorf("OnPacket source %d = %v, want %v", i, from[i], tc.wantFrom[i])
				}
			}
			if st := b.Stats(); st != tc.wantStats {
				t.Errorf("Stats() = %+v, want %+v", st, tc.wantStats)
			}
			if logged := logs.Len() > 0; logged != tc.wantDropLog {
				t.Errorf("drop logged = %v, want %v (%q)", logged, tc.wantDropLog, logs.String())
			}
		})
	}
}

func TestDropLogRateLimited(t *testing.T) {
	var logs bytes.Buffer
	b := NewBind(Config{Logger: debugLogger(&logs)})
	bufs, sizes, eps := batch(1)
	fn := b.wrapReceive(func(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		sizes[0] = copy(bufs[0], probe(0))
		eps[0] = &conn.StdNetEndpoint{AddrPort: netip.MustParseAddrPort("192.0.2.1:1")}
		return 1, nil
	})
	for range 1000 {
		if _, err := fn(bufs, sizes, eps); err != nil {
			t.Fatal(err)
		}
	}
	if lines := bytes.Count(logs.Bytes(), []byte("\n")); lines != 1 {
		t.Errorf("1000 drops within %v logged %d lines, want 1", dropLogInterval, lines)
	}
	if st := b.Stats(); st.OtherDropped != 1000 {
		t.Errorf("OtherDropped = %d, want 1000", st.OtherDropped)
	}
}

// receiveBench builds a Bind whose receive wrapper is fed, on every call, a full batch of 128
// datagrams from a real StdNetBind endpoint: 120 transport messages of 1440 bytes and 8 probes.
func receiveBench() (conn.ReceiveFunc, [][]byte, []int, []conn.Endpoint, *int) {
	delivered := new(int)
	b := NewBind(Config{OnPacket: func([]byte, netip.AddrPort) { *delivered++ }})
	const n = conn.IdealBatchSize
	bufs, sizes, eps := batch(n)
	ep := &conn.StdNetEndpoint{AddrPort: netip.MustParseAddrPort("192.0.2.7:41641")}
	transport := wgMsg(wgTypeTransport, 1440)
	for i := range n {
		if i%16 == 0 {
			copy(bufs[i], probe(i))
		} else {
			copy(bufs[i], transport)
		}
		eps[i] = ep
	}
	fn := b.wrapReceive(func(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		for i := range n {
			if i%16 == 0 {
				sizes[i] = len(probeMagic) + 4
			} else {
				sizes[i] = len(transport)
			}
		}
		return n, nil
	})
	return fn, bufs, sizes, eps, delivered
}

func TestReceiveAllocs(t *testing.T) {
	fn, bufs, sizes, eps, delivered := receiveBench()
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := fn(bufs, sizes, eps); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("receive wrapper allocates %v times per batch, want 0", allocs)
	}
	if *delivered == 0 {
		t.Errorf("no probe reached OnPacket")
	}
}

func BenchmarkReceive(b *testing.B) {
	fn, bufs, sizes, eps, _ := receiveBench()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := fn(bufs, sizes, eps); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(len(bufs)), "ns/datagram")
}

// wgMsg is a size-byte datagram with a WireGuard header of the given type (reserved bytes zero)
// and a non-zero body.
func wgMsg(typ byte, size int) []byte {
	pkt := bytes.Repeat([]byte{0xa5}, size)
	if size > 0 {
		pkt[0] = typ
	}
	for i := 1; i < 4 && i < size; i++ {
		pkt[i] = 0
	}
	return pkt
}

// withByte returns pkt with pkt[i] set to v.
func withByte(pkt []byte, i int, v byte) []byte {
	pkt[i] = v
	return pkt
}

// batch allocates receive buffers the way wireguard-go does.
func batch(n int) ([][]byte, []int, []conn.Endpoint) {
	bufs := make([][]byte, n)
	for i := range bufs {
		bufs[i] = make([]byte, 65535)
	}
	return bufs, make([]int, n), make([]conn.Endpoint, n)
}

// head is the first bytes of pkt, for messages.
func head(pkt []byte) []byte {
	return pkt[:min(len(pkt), 8)]
}

// debugLogger logs everything, as text, to w.
func debugLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
