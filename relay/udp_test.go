package relay

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"
)

func TestBind(t *testing.T) {
	s := startServer(t, "", 0, nil)
	n := newNode(t, "b1")
	n.start(t, testToken, p2pAddr(s))
	sess := waitSession(t, n, 0)
	conn := bindUDP(t, sess) // checks BINDACK's observed address is the socket's own

	tests := []struct {
		name   string
		frame  []byte
		reason string
	}{
		{name: "bad MAC", frame: AppendBind(nil, sess.ID, 1, make([]byte, 32)), reason: dropBadMAC},
		{name: "unknown node", frame: AppendBind(nil, sess.ID+100, 1, sess.Key), reason: dropUnknownNode},
		{name: "truncated", frame: AppendBind(nil, sess.ID, 1, sess.Key)[:20], reason: dropMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := counter(s, tc.reason)
			if _, err := conn.WriteToUDPAddrPort(tc.frame, sess.UDPAddr); err != nil {
				t.Fatal(err)
			}
			eventually(t, 5*time.Second, tc.reason+" counted", func() bool { return counter(s, tc.reason) > before })
		})
	}
	// The bad BINDs moved nothing: the node is still bound to conn.
	eventually(t, 5*time.Second, "reflexive in directory", func() bool {
		e, ok := n.dirEntry(0, "b1")
		return ok && e.Reflexive.String() == conn.LocalAddr().String()
	})
}

func TestDataRelay(t *testing.T) {
	s := startServer(t, "", 0, func(c *ServerConfig) {
		c.Limits.DataRate = 1000 // bytes per second
		c.Limits.DataBurst = 4000
	})
	a, b, c := newNode(t, "a"), newNode(t, "b"), newNode(t, "c")
	a.start(t, testToken, p2pAddr(s))
	b.start(t, testToken, p2pAddr(s))
	c.start(t, testToken, p2pAddr(s))
	sa, sb, sc := waitSession(t, a, 0), waitSession(t, b, 0), waitSession(t, c, 0)
	ua, ub := bindUDP(t, sa), bindUDP(t, sb)
	// c is registered but never binds; stranger is not registered at all.
	stranger, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer stranger.Close()

	payload := bytes.Repeat([]byte{0x04}, 1000) // looks like a WireGuard transport message
	id, got := func() (uint32, []byte) {
		if _, err := ua.WriteToUDPAddrPort(append(AppendDataHeader(nil, sb.ID), payload...), sb.UDPAddr); err != nil {
			t.Fatal(err)
		}
		id, got, err := recvData(ub, 5*time.Second)
		if err != nil {
			t.Fatalf("b received nothing: %v", err)
		}
		return id, got
	}()
	if id != sa.ID || !bytes.Equal(got, payload) {
		t.Fatalf("b got DATA from %d (%d bytes), want from %d (%d bytes)", id, len(got), sa.ID, len(payload))
	}
	// The relay counts a batch once it has sent it, so the count may trail the datagram.
	eventually(t, 5*time.Second, "bytes relayed counted", func() bool { return s.metrics.bytesRelayed.Load() == uint64(len(payload)) })

	tests := []struct {
		name   string
		from   *net.UDPConn
		frame  []byte
		reason string
	}{
		{name: "unregistered source", from: stranger, frame: AppendDataHeader(nil, sb.ID), reason: dropUnbound},
		{name: "unknown destination", from: ua, frame: AppendDataHeader(nil, 999), reason: dropNoDest},
		{name: "to itself", from: ua, frame: AppendDataHeader(nil, sa.ID), reason: dropNoDest},
		{name: "destination not bound", from: ua, frame: AppendDataHeader(nil, sc.ID), reason: dropDestUnbound},
		{name: "not a frame", from: stranger, frame: []byte{1, 0, 0, 0, 5, 6, 7, 8}, reason: dropMalformed},
		{name: "short DATA", from: ua, frame: AppendDataHeader(nil, sb.ID)[:6], reason: dropMalformed},
		{name: "PING to the relay", from: ua, frame: AppendPing(nil, Ping{}, make([]byte, 32)), reason: dropUnknownType},
		{name: "unknown type", from: stranger, frame: []byte{0xE7, 0x77, 1, 0x7f}, reason: dropUnknownType},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := counter(s, tc.reason)
			if _, err := tc.from.WriteToUDPAddrPort(tc.frame, sa.UDPAddr); err != nil {
				t.Fatal(err)
			}
			eventually(t, 5*time.Second, tc.reason+" counted", func() bool { return counter(s, tc.reason) > before })
		})
	}
	// c's address was never bound, so nothing reached anyone else.
	if _, _, err := recvData(ub, 50*time.Millisecond); err == nil {
		t.Fatal("b received a frame that should have been dropped")
	}

	t.Run("rate limit", func(t *testing.T) {
		// The bucket holds 4000 bytes and refills at 1000/s: a burst of 20 frames of 1008 bytes
		// overflows it.
		before := counter(s, dropRateLimited)
		frame := append(AppendDataHeader(nil, sb.ID), payload...)
		for range 20 {
			if _, err := ua.WriteToUDPAddrPort(frame, sa.UDPAddr); err != nil {
				t.Fatal(err)
			}
		}
		eventually(t, 5*time.Second, "rate limit drops", func() bool { return counter(s, dropRateLimited) >= before+10 })
		// b itself is not limited by a's excess: its own DATA still goes through.
		if _, err := ub.WriteToUDPAddrPort(append(AppendDataHeader(nil, sa.ID), payload...), sb.UDPAddr); err != nil {
			t.Fatal(err)
		}
		for {
			id, _, err := recvData(ua, 5*time.Second)
			if err != nil {
				t.Fatalf("a received nothing from b: %v", err)
			}
			if id == sb.ID {
				break
			}
		}
	})
}

// TestBindRightAfterWelcome: a node BINDs its WireGuard socket the moment its welcome arrives. The
// relay must know the node by then; a BIND that came first used to be dropped as from an unknown
// node, leaving the node unbound (nothing relayed to or from it, no reflexive address, no punches)
// until its next BIND, a probe interval later. One BIND each, no retry: every one is answered.
func TestBindRightAfterWelcome(t *testing.T) {
	s := startServer(t, "", 0, nil)
	const nodes = 8
	type result struct {
		conn  *net.UDPConn
		nonce uint64
		known bool // the relay knew the node's ID when its welcome arrived
	}
	results := make(chan result, nodes)
	for i := range nodes {
		n := newNode(t, fmt.Sprintf("n%d", i))
		conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		c, err := NewClient(ClientConfig{
			Relays: []string{p2pAddr(s)}, JoinToken: testToken, Key: n.key,
			Self: Registration{Name: n.name, WireGuardKey: n.wgKey, Overlay: netip.MustParseAddr("fd65:7765:7769::1")},
			OnSession: func(sess Session, up bool) {
				if !up {
					return
				}
				s.udpMu.RLock()
				known := s.byID[sess.ID] != nil
				s.udpMu.RUnlock()
				nonce := uint64(7000 + i)
				if _, err := conn.WriteToUDPAddrPort(AppendBind(nil, sess.ID, nonce, sess.Key), sess.UDPAddr); err != nil {
					t.Error(err)
				}
				results <- result{conn, nonce, known}
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
	buf := make([]byte, 1500)
	for range nodes {
		var r result
		select {
		case r = <-results:
		case <-time.After(10 * time.Second):
			t.Fatal("a node did not register within 10 s")
		}
		if !r.known {
			t.Errorf("node with nonce %d: the relay did not know it when its welcome arrived", r.nonce)
		}
		r.conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, _, err := r.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Errorf("node with nonce %d: no BINDACK to its only BIND (dropped %d BINDs from unknown nodes in all): %v",
				r.nonce, counter(s, dropUnknownNode), err)
			continue
		}
		if nonce, _, err := ParseBindAck(buf[:n]); err != nil || nonce != r.nonce {
			t.Errorf("node with nonce %d: BINDACK %d, %v", r.nonce, nonce, err)
		}
	}
	if n := counter(s, dropUnknownNode); n > 0 {
		t.Errorf("%d BINDs dropped as from unknown nodes", n)
	}
}
