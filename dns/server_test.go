package dns

import (
	"encoding/binary"
	"net"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// genericPacketConn hides the *net.UDPConn behind a plain net.PacketConn, as the gVisor netstack's
// conns are, so that miekg takes its generic PacketConn path.
type genericPacketConn struct{ net.PacketConn }

// startServer serves s on fresh sockets of 127.0.0.1 and returns their addresses.
func startServer(t *testing.T, s *Server, generic bool) (udp, tcp string) {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		pc.Close()
		t.Fatal(err)
	}
	udp, tcp = pc.LocalAddr().String(), ln.Addr().String()
	if generic {
		pc = genericPacketConn{pc}
	}
	if err := s.Start(pc, ln); err != nil {
		pc.Close()
		ln.Close()
		t.Fatalf("Start: %v", err)
	}
	return udp, tcp
}

func TestStartOverSockets(t *testing.T) {
	tests := []struct {
		name    string
		generic bool
	}{
		{name: "net.UDPConn", generic: false},
		{name: "generic PacketConn", generic: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestServer(t, Config{})
			udp, tcp := startServer(t, s, tc.generic)
			q := query("big.kube-system.svc.cluster.local.", mdns.TypeA, 0)

			uc := &mdns.Client{Net: "udp", Timeout: 5 * time.Second}
			m, _, err := uc.Exchange(q, udp)
			if err != nil {
				t.Fatalf("udp exchange: %v", err)
			}
			if !m.Truncated || len(m.Answer) == 0 || len(m.Answer) >= 100 {
				t.Errorf("udp-512 reply: TC %v with %d answers, want TC and a part of 100", m.Truncated, len(m.Answer))
			}

			tc2 := &mdns.Client{Net: "tcp", Timeout: 5 * time.Second}
			m, _, err = tc2.Exchange(q, tcp)
			if err != nil {
				t.Fatalf("tcp exchange: %v", err)
			}
			if m.Truncated || len(m.Answer) != 100 {
				t.Errorf("tcp reply: TC %v with %d answers, want the whole 100", m.Truncated, len(m.Answer))
			}

			m, _, err = uc.Exchange(query("web.default.svc.cluster.local.", mdns.TypeA, 4096), udp)
			if err != nil {
				t.Fatalf("udp exchange with EDNS0: %v", err)
			}
			if len(m.Answer) != 1 || m.IsEdns0() == nil {
				t.Errorf("EDNS0 reply %s: want one answer and an OPT", describe(m))
			}
		})
	}
}

// rawHeader builds a 12-byte DNS header.
func rawHeader(id, flags, qd, an, ns, ar uint16) []byte {
	b := make([]byte, 12)
	binary.BigEndian.PutUint16(b[0:], id)
	binary.BigEndian.PutUint16(b[2:], flags)
	binary.BigEndian.PutUint16(b[4:], qd)
	binary.BigEndian.PutUint16(b[6:], an)
	binary.BigEndian.PutUint16(b[8:], ns)
	binary.BigEndian.PutUint16(b[10:], ar)
	return b
}

// rawQuestion is "web.default.svc.cluster.local. IN A" in wire form.
func rawQuestion(t *testing.T) []byte {
	t.Helper()
	b, err := query("web.default.svc.cluster.local.", mdns.TypeA, 0).Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b[12:]
}

func TestMalformedOverUDP(t *testing.T) {
	s := newTestServer(t, Config{})
	udp, _ := startServer(t, s, false)
	conn, err := net.Dial("udp", udp)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	question := rawQuestion(t)
	const rd = 1 << 8
	tests := []struct {
		name      string
		packet    []byte
		wantRcode int
	}{
		{name: "no question", packet: rawHeader(101, rd, 0, 0, 0, 0), wantRcode: mdns.RcodeFormatError},
		{name: "two questions", packet: append(append(rawHeader(102, rd, 2, 0, 0, 0), question...), question...), wantRcode: mdns.RcodeFormatError},
		{name: "question cut short", packet: append(rawHeader(103, rd, 1, 0, 0, 0), question[:9]...), wantRcode: mdns.RcodeFormatError},
		{name: "garbage label", packet: append(rawHeader(104, rd, 1, 0, 0, 0), 0xC0, 0xFF, 0, 1, 0, 1), wantRcode: mdns.RcodeFormatError},
		{name: "additional record cut short", packet: append(append(rawHeader(106, rd, 1, 0, 0, 1), question...), 0, 0, 41, 16), wantRcode: mdns.RcodeFormatError},
		{name: "opcode STATUS", packet: append(rawHeader(107, 2<<11|rd, 1, 0, 0, 0), question...), wantRcode: mdns.RcodeNotImplemented},
	}
	buf := make([]byte, 65535)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := conn.Write(tc.packet); err != nil {
				t.Fatal(err)
			}
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, err := conn.Read(buf)
			if err != nil {
				t.Fatalf("no reply: %v", err)
			}
			m := new(mdns.Msg)
			if err := m.Unpack(buf[:n]); err != nil {
				t.Fatalf("reply does not parse: %v", err)
			}
			wantID := binary.BigEndian.Uint16(tc.packet)
			if m.Id != wantID || m.Rcode != tc.wantRcode || !m.Response {
				t.Errorf("reply id %d %s response %v, want id %d %s", m.Id, mdns.RcodeToString[m.Rcode], m.Response, wantID, mdns.RcodeToString[tc.wantRcode])
			}

			// The server keeps answering.
			good := query("web.default.svc.cluster.local.", mdns.TypeA, 0)
			c := &mdns.Client{Net: "udp", Timeout: 5 * time.Second}
			r, _, err := c.Exchange(good, udp)
			if err != nil || len(r.Answer) != 1 {
				t.Fatalf("valid query after %s: %v %s", tc.name, err, describe(r))
			}
		})
	}

	// A packet too short for a header gets no reply (nothing to address it to), nor does a
	// response (answering it could start a loop with another server), but both are counted.
	for _, p := range [][]byte{{1, 2, 3}, append(rawHeader(105, 1<<15|rd, 1, 0, 0, 0), question...)} {
		if _, err := conn.Write(p); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the short packet and the response to be counted", func() bool { return s.Stats().Dropped == 2 })
	// Replies leave in order through one writer: the next datagram is the reply to the next query.
	good := query("web.default.svc.cluster.local.", mdns.TypeA, 0)
	good.Id = 4242
	b, err := good.Pack()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write(b); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := conn.Read(buf)
	if err != nil || n < headerLen || binary.BigEndian.Uint16(buf) != good.Id {
		t.Errorf("after the dropped packets: read %x, %v: want the reply to query %d first", buf[:n], err, good.Id)
	}

	st := s.Stats()
	if st.FormErr != 5 || st.NotImp != 1 {
		t.Errorf("stats %+v: want 5 FORMERR and 1 NOTIMP", st)
	}
}

func TestStartErrors(t *testing.T) {
	s := newTestServer(t, Config{})
	tests := []struct {
		name  string
		setup func()
	}{
		{name: "nothing to serve"},
		{name: "started twice", setup: func() { startServer(t, s, false) }},
		{name: "closed", setup: func() { s.Close() }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.setup != nil {
				tc.setup()
				pc, err := net.ListenPacket("udp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				defer pc.Close()
				if err := s.Start(pc, nil); err == nil {
					t.Error("Start succeeded, want an error")
				}
				return
			}
			if err := s.Start(nil, nil); err == nil {
				t.Error("Start(nil, nil) succeeded, want an error")
			}
		})
	}
}

func TestCloseIdempotent(t *testing.T) {
	s, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	startServer(t, s, true)
	for i := range 2 {
		if err := s.Close(); err != nil {
			t.Fatalf("Close #%d: %v", i+1, err)
		}
	}
}

func TestCloseAbortsForwarding(t *testing.T) {
	silent, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	s, err := New(Config{Upstreams: []string{silent.LocalAddr().String()}, ForwardTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	udp, _ := startServer(t, s, false)
	conn, err := net.Dial("udp", udp)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	b, err := query("example.com.", mdns.TypeA, 0).Pack()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write(b); err != nil {
		t.Fatal(err)
	}
	// The forwarded query reaching the upstream proves an exchange is in flight.
	silent.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, _, err := silent.ReadFrom(make([]byte, 512)); err != nil {
		t.Fatalf("upstream got no query: %v", err)
	}
	start := time.Now()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("Close took %v with a forward in flight, want it aborted", took)
	}
}

func TestUpdateWhileServing(t *testing.T) {
	s := newTestServer(t, Config{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 20 {
			s.Update(testSnapshot())
		}
	}()
	q := query("web.default.svc.cluster.local.", mdns.TypeA, 1232)
	for {
		select {
		case <-done:
			return
		default:
		}
		w := newRecorder(false)
		s.ServeDNS(w, q)
		if w.msg == nil || len(w.msg.Answer) != 1 {
			t.Fatalf("reply during Update: %s", describe(w.msg))
		}
	}
}
