package dns

import (
	"math/rand/v2"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"golang.org/x/sys/unix"
)

// BenchmarkUDPThroughput measures how many fast-path queries per second the server answers over
// loopback through a generic PacketConn, with 4 clients keeping 32 queries each in flight: the
// capacity the per-source rate (Config.SourceRate) is chosen against. Unlimited here.
func BenchmarkUDPThroughput(b *testing.B) {
	s := newTestServer(b, Config{SourceRate: -1})
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	if err := s.Start(genericPacketConn{pc}, nil); err != nil {
		pc.Close()
		b.Fatal(err)
	}
	pkt := packQuery(b, "web.default.svc.cluster.local.", mdns.TypeA, -1, nil)
	const clients, window = 4, 32
	var answered atomic.Int64
	target := int64(b.N)
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for range clients {
		conn, err := net.Dial("udp", pc.LocalAddr().String())
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 512)
			for answered.Load() < target {
				for range window {
					conn.Write(pkt)
				}
				// Read the window's replies; a lost one ends the round at the deadline.
				conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
				for range window {
					if _, err := conn.Read(buf); err != nil {
						break
					}
					answered.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	b.ReportMetric(float64(answered.Load())/time.Since(start).Seconds(), "replies/s")
}

// fastUpstream answers every query at once, from one goroutine, with NXDOMAIN and no SOA (not
// cached, so every random name is forwarded).
func fastUpstream(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			q := new(mdns.Msg)
			if q.Unpack(buf[:n]) != nil {
				continue
			}
			m := new(mdns.Msg)
			m.SetRcode(q, mdns.RcodeNameError)
			if b, err := m.Pack(); err == nil {
				pc.WriteTo(b, from)
			}
		}
	}()
	t.Cleanup(func() { pc.Close(); <-done })
	return pc.LocalAddr().String()
}

// TestFloodOneSource sends the floods of issue 13 (200k datagrams at up to 200k a second from one
// socket, 100k at 50k a second under the race detector: random bytes, random names of the cluster
// zone, random outside names) while a client of another address asks a cluster name every
// millisecond: at least 99% of its queries must be answered within 100 ms, and the server must
// start no goroutine. The latencies are wall-clock: on a machine whose cores are all taken by
// other work the server gets too little CPU to drain the flood in time.
func TestFloodOneSource(t *testing.T) {
	flood, perSec := 200_000, 200_000
	if raceEnabled {
		flood, perSec = 100_000, 50_000
	}
	const (
		batch     = 50
		maxBehind = 5 * time.Millisecond
		inTime    = 100 * time.Millisecond
		every     = time.Millisecond
	)
	rng := rand.New(rand.NewPCG(13, 13))
	randomName := func(suffix string) string {
		b := make([]byte, 12)
		for i := range b {
			b[i] = 'a' + byte(rng.IntN(26))
		}
		return string(b) + suffix
	}
	tests := []struct {
		name string
		next func(b []byte) []byte // the next flood datagram, written into b
	}{
		{name: "random bytes", next: func(b []byte) []byte {
			b = b[:rng.IntN(300)]
			for i := range b {
				b[i] = byte(rng.Uint32())
			}
			return b
		}},
		{name: "random cluster names", next: func(b []byte) []byte {
			p, _ := query(randomName(".default.svc.cluster.local."), mdns.TypeA, 0).PackBuffer(b)
			return p
		}},
		{name: "random outside names", next: func(b []byte) []byte {
			p, _ := query(randomName(".example."), mdns.TypeA, 0).PackBuffer(b)
			return p
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestServer(t, Config{Upstreams: []string{fastUpstream(t)}})
			udp := startFloodServer(t, s)
			flooder := newClient(t, "127.0.0.1", udp)
			other := newClient(t, "127.0.0.2", udp)
			base := runtime.NumGoroutine()

			var wg sync.WaitGroup
			defer wg.Wait()
			flooding := make(chan struct{})
			var floodTook time.Duration // set before flooding is closed
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer close(flooding)
				buf := make([]byte, 512)
				start := time.Now()
				next := start
				for sent := 0; sent < flood; sent += batch {
					for range batch {
						flooder.conn.Write(tc.next(buf))
					}
					// Keep to perSec: wait when ahead of the schedule; when far behind (the
					// process was not running), start the schedule again rather than burst.
					next = next.Add(batch * time.Second / time.Duration(perSec))
					if d := time.Until(next); d > 0 {
						time.Sleep(d)
					} else if d < -maxBehind {
						next = time.Now()
					}
				}
				floodTook = time.Since(start)
			}()
			// The other client asks at its own pace, whatever comes back; the replies are matched
			// by ID below.
			var sentAt [1 << 16]atomic.Int64
			var asked atomic.Int64
			wg.Add(1)
			go func() {
				defer wg.Done()
				q := query("web.default.svc.cluster.local.", mdns.TypeA, 0)
				for id := 0; id < len(sentAt); id++ {
					select {
					case <-flooding:
						return
					default:
					}
					q.Id = uint16(id)
					b, _ := q.Pack()
					sentAt[id].Store(time.Now().UnixNano())
					other.conn.Write(b)
					asked.Add(1)
					time.Sleep(every)
				}
			}()
			answered, peak := 0, base+2 // +2: the flooder and the other client
			var slowest time.Duration
			for {
				m := other.recv(inTime)
				if m == nil {
					select {
					case <-flooding:
					default:
						continue
					}
					break // flood over, and nothing more within inTime
				}
				took := time.Duration(time.Now().UnixNano() - sentAt[m.Id].Load())
				if len(m.Answer) == 1 && took <= inTime {
					answered++
					slowest = max(slowest, took)
				}
				peak = max(peak, runtime.NumGoroutine())
			}
			wg.Wait()
			st := s.Stats()
			n := int(asked.Load())
			t.Logf("flood of %d in %v; %d of %d answered within %v (slowest %v); stats %+v",
				flood, floodTook.Round(time.Millisecond), answered, n, inTime, slowest, st)
			if n < 200 || float64(answered) < 0.99*float64(n) {
				t.Errorf("%d of %d queries answered within %v, want 99%% of at least 200", answered, n, inTime)
			}
			if st.RateLimited == 0 {
				t.Errorf("nothing rate-limited")
			}
			if peak > base+2 {
				t.Errorf("goroutines rose from %d to %d during the flood", base+2, peak)
			}
		})
	}
}

// floodBufBytes is the receive buffer of the flood test's server socket. The agent's DNS socket is
// an endpoint of the gVisor netstack, whose 212 KiB receive buffer counts payload bytes: some 4000
// queries. A kernel socket counts each datagram's whole buffer (about 1 KiB on loopback), so the
// test gives its socket 4 MiB to hold as many.
const floodBufBytes = 4 << 20

// startFloodServer serves s over UDP on 127.0.0.1 with a receive buffer of floodBufBytes, through
// a generic PacketConn as in the agent, and returns the address.
func startFloodServer(t *testing.T, s *Server) string {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	rc, err := pc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		// FORCE passes net.core.rmem_max (root only); else the kernel caps the size at it.
		if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, floodBufBytes); serr != nil {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, floodBufBytes)
		}
	}); err != nil || serr != nil {
		t.Fatalf("receive buffer: %v %v", err, serr)
	}
	if err := s.Start(genericPacketConn{pc}, nil); err != nil {
		pc.Close()
		t.Fatal(err)
	}
	return pc.LocalAddr().String()
}
