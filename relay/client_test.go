package relay

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

// newRawHost is a libp2p host like the client's, for tests that speak the control protocol by hand.
func newRawHost(t *testing.T, listen bool) host.Host {
	t.Helper()
	opts := []libp2p.Option{libp2p.NoListenAddrs}
	if listen {
		opts = []libp2p.Option{libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0")}
	}
	h, err := libp2p.New(append(opts, hostOptions()...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// impostor is a relay that does not know the join token: it answers every register with a welcome
// whose relayProof is wrong, followed by a directory. It counts the registers it gets.
func impostor(t *testing.T) (h host.Host, registers *atomic.Int64) {
	h = newRawHost(t, true)
	registers = new(atomic.Int64)
	h.SetStreamHandler(ProtocolID, func(st network.Stream) {
		defer st.Reset()
		nonce, _ := newNonce()
		writeFrame(st, &message{Type: msgChallenge, Nonce: base64.StdEncoding.EncodeToString(nonce)})
		m, err := readFrame(st, MaxControlFrame)
		if err != nil || m.Type != msgRegister {
			return
		}
		registers.Add(1)
		writeFrame(st, &message{Type: msgWelcome, ID: 1, SessionKey: base64.StdEncoding.EncodeToString(make([]byte, 32)),
			UDPPort: 9, KeepaliveMs: 1000, RelayProof: base64.StdEncoding.EncodeToString(make([]byte, 32))})
		writeFrame(st, &message{Type: msgDirectory, Nodes: []DirEntry{{Name: "evil", ID: 2,
			WireGuardKey: base64.StdEncoding.EncodeToString(make([]byte, 32))}}})
		readFrame(st, MaxControlFrame)
	})
	return h, registers
}

func TestRelayAuthentication(t *testing.T) {
	t.Run("host:port relay proves the token", func(t *testing.T) {
		s := startServer(t, "", 0, nil)
		n := newNode(t, "hp")
		n.start(t, testToken, fmt.Sprintf("127.0.0.1:%d", s.Port()))
		sess := waitSession(t, n, 0)
		if sess.Addr != fmt.Sprintf("127.0.0.1:%d", s.Port()) || sess.UDPAddr.String() != sess.Addr {
			t.Fatalf("session %+v: want Addr and UDPAddr 127.0.0.1:%d", sess, s.Port())
		}
	})
	t.Run("relay with another token", func(t *testing.T) {
		s := startServer(t, "", 0, func(c *ServerConfig) { c.JoinToken = "another-token" })
		n := newNode(t, "hp")
		n.start(t, testToken, fmt.Sprintf("127.0.0.1:%d", s.Port()))
		eventually(t, 5*time.Second, "two refused attempts", func() bool { return s.metrics.refused[refuseBadProof].Load() >= 2 })
		if n.upCount() != 0 || n.dirNames(0) != nil {
			t.Fatal("client registered with a relay of another cluster")
		}
	})
	for _, form := range []string{"host:port", "multiaddr"} {
		t.Run("impostor via "+form, func(t *testing.T) {
			h, registers := impostor(t)
			addr := h.Addrs()[0]
			relay := addr.String() + "/p2p/" + h.ID().String()
			if form == "host:port" {
				port, _ := addr.ValueForProtocol(ma.P_TCP)
				relay = "127.0.0.1:" + port
			}
			n := newNode(t, "victim")
			n.start(t, testToken, relay)
			eventually(t, 5*time.Second, "two attempts at the impostor", func() bool { return registers.Load() >= 2 })
			if n.upCount() != 0 || n.dirNames(0) != nil {
				t.Fatalf("client trusted an impostor: directory %v", n.dirNames(0))
			}
		})
	}
	t.Run("wrong peer ID in multiaddr", func(t *testing.T) {
		s := startServer(t, "", 0, nil)
		other := newRawHost(t, false)
		n := newNode(t, "w")
		n.start(t, testToken, fmt.Sprintf("/ip4/127.0.0.1/tcp/%d/p2p/%s", s.Port(), other.ID()))
		// The Noise handshake fails, so the relay never sees a register.
		eventually(t, 5*time.Second, "client retried", func() bool { return n.c.attempts(0) >= 2 })
		if n.upCount() != 0 || s.metrics.registered.Load() != 0 {
			t.Fatal("registered with a relay whose peer ID does not match")
		}
	})
}

func TestClientReregisters(t *testing.T) {
	dir := t.TempDir()
	s1 := startServer(t, dir, 0, nil)
	port := s1.Port()
	n := newNode(t, "rr")
	n.start(t, testToken, p2pAddr(s1))
	first := waitSession(t, n, 0)
	s1.Close()
	eventually(t, 5*time.Second, "session down", func() bool { _, ok := n.session(0); return !ok })

	start := time.Now()
	startServer(t, dir, port, nil)
	second := waitSession(t, n, 0)
	t.Logf("re-registered %v after the relay came back", time.Since(start).Round(time.Millisecond))
	if second.ID != first.ID || slices.Equal(second.Key, first.Key) {
		t.Fatalf("after restart ID %d (want %d), key changed: %v", second.ID, first.ID, !slices.Equal(second.Key, first.Key))
	}
	if got := n.c.Sessions(); len(got) != 1 || got[0].ID != first.ID {
		t.Fatalf("Sessions() = %+v", got)
	}
}

func TestTwoRelays(t *testing.T) {
	r1, r2 := startServer(t, "", 0, nil), startServer(t, "", 0, nil)
	a, b := newNode(t, "a"), newNode(t, "b")
	a.start(t, testToken, p2pAddr(r1), fmt.Sprintf("127.0.0.1:%d", r2.Port()))
	b.start(t, testToken, p2pAddr(r1), p2pAddr(r2))
	sa, sb := waitSession(t, a, 1), waitSession(t, b, 1)
	waitSession(t, a, 0)
	r1.Close()
	eventually(t, 5*time.Second, "relay 0 down", func() bool { _, ok := a.session(0); return !ok })
	// Relay 1 still relays between them.
	ua, ub := bindUDP(t, sa), bindUDP(t, sb)
	if _, err := ua.WriteToUDPAddrPort(append(AppendDataHeader(nil, sb.ID), 4, 0, 0, 0), sa.UDPAddr); err != nil {
		t.Fatal(err)
	}
	if id, _, err := recvData(ub, 5*time.Second); err != nil || id != sa.ID {
		t.Fatalf("via the surviving relay: id %d, err %v", id, err)
	}
	if got := a.c.Sessions(); len(got) != 1 || got[0].Relay != 1 {
		t.Fatalf("Sessions() = %+v, want relay 1 only", got)
	}
}

func TestMalformedControl(t *testing.T) {
	s := startServer(t, "", 0, nil)
	raw := newRawHost(t, false)
	relayID, err := peer.Decode(s.PeerID())
	if err != nil {
		t.Fatal(err)
	}
	relayInfo := peer.AddrInfo{ID: relayID, Addrs: []ma.Multiaddr{ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", s.Port()))}}
	lengthOnly := func(n uint32) []byte { return binary.BigEndian.AppendUint32(nil, n) }
	frame := func(body string) []byte { return append(lengthOnly(uint32(len(body))), body...) }
	goodRegister := func(st network.Stream, challenge *message) []byte {
		nonce, _ := decodeNonce(challenge.Nonce)
		f, _ := encodeFrame(&message{Type: msgRegister, Name: "raw", WireGuardKey: base64.StdEncoding.EncodeToString(make([]byte, 32)),
			Nonce: base64.StdEncoding.EncodeToString(make([]byte, 32)),
			Proof: base64.StdEncoding.EncodeToString(proof(testToken, labelRegister, s.PeerID(), raw.ID().String(), nonce))})
		return f
	}
	tests := []struct {
		name       string
		register   bool   // send a valid register first
		send       []byte // then this
		wantReason string // refusal reason counted, or "" for a malformed frame after registering
	}{
		{name: "oversize frame", send: lengthOnly(MaxControlFrame + 1), wantReason: refuseTooLarge},
		{name: "over the pre-auth cap", send: lengthOnly(maxPreAuthFrame + 1), wantReason: refuseTooLarge},
		{name: "not JSON", send: frame("{nope"), wantReason: refuseMalformed},
		{name: "no type", send: frame(`{"name":"x"}`), wantReason: refuseMalformed},
		{name: "punch before register", send: frame(`{"type":"punch","peer":"a"}`), wantReason: refuseMalformed},
		{name: "register without proof", send: frame(`{"type":"register","name":"x"}`), wantReason: refuseBadProof},
		{name: "truncated", send: lengthOnly(100)[:3], wantReason: refuseNoRegister},
		{name: "garbage after register", register: true, send: frame(`[1,2,3]`)},
		{name: "oversize after register", register: true, send: lengthOnly(1 << 30)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			defer cancel()
			// Each case gets a fresh connection: a refusal closes it.
			raw.Network().ClosePeer(relayID)
			if err := raw.Connect(network.WithForceDirectDial(ctx, "test"), relayInfo); err != nil {
				t.Fatal(err)
			}
			st, err := raw.NewStream(ctx, relayID, ProtocolID)
			if err != nil {
				t.Fatal(err)
			}
			defer st.Reset()
			st.SetDeadline(time.Now().Add(15 * time.Second))
			challenge, err := readFrame(st, MaxControlFrame)
			if err != nil || challenge.Type != msgChallenge {
				t.Fatalf("challenge: %v %v", challenge, err)
			}
			refusedBefore := s.metrics.refused[tc.wantReason]
			var before uint64
			if refusedBefore != nil {
				before = refusedBefore.Load()
			}
			badBefore := s.metrics.streamBad.Load()
			if tc.register {
				st.Write(goodRegister(st, challenge))
				if m, err := readFrame(st, MaxControlFrame); err != nil || m.Type != msgWelcome {
					t.Fatalf("welcome: %v %v", m, err)
				}
			}
			st.Write(tc.send)
			if tc.wantReason == refuseNoRegister {
				st.CloseWrite()
			}
			// The relay may answer with an error frame; either way it ends the stream.
			for {
				if _, err := readFrame(st, MaxControlFrame); err != nil {
					break
				}
			}
			if tc.register {
				eventually(t, 5*time.Second, "malformed frame counted", func() bool { return s.metrics.streamBad.Load() > badBefore })
			} else {
				eventually(t, 5*time.Second, tc.wantReason+" counted", func() bool { return refusedBefore.Load() > before })
			}
		})
	}
	// The relay still serves well-behaved nodes.
	n := newNode(t, "good")
	n.start(t, testToken, p2pAddr(s))
	waitSession(t, n, 0)
}
