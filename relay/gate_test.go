package relay

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	ma "github.com/multiformats/go-multiaddr"
)

// newStranger is a libp2p host that never registers. It listens on src (a loopback address), so
// its connections to a relay on 127.0.0.1 come from src.
func newStranger(t *testing.T, src string) host.Host {
	t.Helper()
	h, err := libp2p.New(append([]libp2p.Option{libp2p.ListenAddrStrings("/ip4/" + src + "/tcp/0")}, hostOptions()...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

func relayAddrInfo(t *testing.T, s *Server) peer.AddrInfo {
	t.Helper()
	id, err := peer.Decode(s.PeerID())
	if err != nil {
		t.Fatal(err)
	}
	return peer.AddrInfo{ID: id, Addrs: []ma.Multiaddr{ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", s.Port()))}}
}

// connectTo connects h to the relay on a fresh connection and checks it came from src.
func connectTo(t *testing.T, h host.Host, s *Server) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	info := relayAddrInfo(t, s)
	if err := h.Connect(network.WithForceDirectDial(ctx, "test"), info); err != nil {
		return err
	}
	for _, c := range h.Network().ConnsToPeer(info.ID) {
		local, _ := remoteIP(c.LocalMultiaddr())
		listen, _ := remoteIP(h.Network().ListenAddresses()[0])
		if local != listen {
			t.Fatalf("connection from %v, want the stranger's address %v", local, listen)
		}
	}
	return nil
}

// openControl opens a control stream from h and reports whether the relay admitted it: whether
// its challenge arrived.
func openControl(t *testing.T, h host.Host, s *Server) (network.Stream, bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	info := relayAddrInfo(t, s)
	h.Peerstore().AddAddrs(info.ID, info.Addrs, time.Minute)
	st, err := h.NewStream(network.WithForceDirectDial(ctx, "test"), info.ID, ProtocolID)
	if err != nil {
		t.Logf("open stream: %v", err)
		return nil, false
	}
	t.Cleanup(func() { st.Reset() })
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	m, err := readFrame(st, maxPreAuthFrame)
	st.SetReadDeadline(time.Time{})
	if err != nil {
		t.Logf("read challenge: %v", err)
	}
	return st, err == nil && m.Type == msgChallenge
}

func gateCounts(s *Server) (conns, streams int) { return s.gate.counts() }

func TestUnauthStreamCaps(t *testing.T) {
	tests := []struct {
		name   string
		limits Limits
		srcs   []string // one stranger per entry, each opening one control stream, in order
		admit  []bool
		reason string // counted once per refused stream
	}{
		{
			name:   "in total",
			limits: Limits{MaxUnauthStreams: 3, MaxUnauthStreamsPerIP: 100},
			srcs:   []string{"127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.1"},
			admit:  []bool{true, true, true, false, false},
			reason: gateStreamsTotal,
		},
		{
			name:   "per source address",
			limits: Limits{MaxUnauthStreams: 100, MaxUnauthStreamsPerIP: 2},
			srcs:   []string{"127.0.0.2", "127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3", "127.0.0.3"},
			admit:  []bool{true, true, false, true, true, false},
			reason: gateStreamsPerIP,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, "", 0, func(c *ServerConfig) { c.Limits = tc.limits })
			var held []network.Stream
			wantRefused := 0
			for i, src := range tc.srcs {
				st, ok := openControl(t, newStranger(t, src), s)
				if ok != tc.admit[i] {
					t.Fatalf("stream %d from %s: admitted %v, want %v", i, src, ok, tc.admit[i])
				}
				if ok {
					held = append(held, st)
				} else {
					wantRefused++
				}
			}
			if got := s.metrics.unauthRefused[tc.reason].Load(); got != uint64(wantRefused) {
				t.Errorf("%s refusals counted %d, want %d", tc.reason, got, wantRefused)
			}
			if _, streams := gateCounts(s); streams != len(held) {
				t.Errorf("gate counts %d streams, want the %d held", streams, len(held))
			}
			// The held streams leave (the relay refuses them and closes their connections): the
			// slots come back and a node registers.
			for _, st := range held {
				st.Reset()
			}
			eventually(t, 5*time.Second, "stream slots released", func() bool {
				_, streams := gateCounts(s)
				return streams == 0
			})
			n := newNode(t, "after")
			n.start(t, testToken, p2pAddr(s))
			waitSession(t, n, 0)
		})
	}
}

func TestRegisterTimeout(t *testing.T) {
	const timeout = 300 * time.Millisecond
	tests := []struct {
		name   string
		stream bool                          // open a control stream (else only connect)
		send   func(st network.Stream) error // what the stream sends, until an error
		reason func(s *Server) uint64
	}{
		{
			name: "silent stream", stream: true,
			send:   func(network.Stream) error { return nil },
			reason: func(s *Server) uint64 { return s.metrics.refused[refuseTimeout].Load() },
		},
		{
			name: "trickling stream", stream: true,
			send: func(st network.Stream) error {
				if _, err := st.Write(binary.BigEndian.AppendUint32(nil, 1000)); err != nil {
					return err
				}
				for {
					if _, err := st.Write([]byte{' '}); err != nil {
						return err
					}
					select {
					case <-time.After(20 * time.Millisecond):
					case <-t.Context().Done():
						return t.Context().Err()
					}
				}
			},
			reason: func(s *Server) uint64 { return s.metrics.refused[refuseTimeout].Load() },
		},
		{
			name:   "connection without a stream",
			reason: func(s *Server) uint64 { return s.metrics.unauthRefused[gateConnTimeout].Load() },
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, "", 0, func(c *ServerConfig) { c.Limits = Limits{RegisterTimeout: timeout} })
			h := newStranger(t, "127.0.0.1")
			start := time.Now()
			if err := connectTo(t, h, s); err != nil {
				t.Fatal(err)
			}
			relayID := relayAddrInfo(t, s).ID
			if tc.stream {
				st, ok := openControl(t, h, s)
				if !ok {
					t.Fatal("control stream not admitted")
				}
				sent := make(chan error, 1)
				go func() { sent <- tc.send(st) }()
				st.SetReadDeadline(time.Now().Add(10 * timeout))
				if m, err := readFrame(st, maxPreAuthFrame); err == nil && m.Type != msgError {
					t.Fatalf("relay sent %q to a stream that never registered", m.Type)
				}
				st.Reset()
				<-sent
			}
			eventually(t, 10*timeout, "connection closed by the relay", func() bool {
				return h.Network().Connectedness(relayID) != network.Connected
			})
			if took := time.Since(start); took < timeout || took > timeout+2*time.Second {
				t.Errorf("closed after %v, want about %v", took, timeout)
			}
			eventually(t, 5*time.Second, "timeout counted", func() bool { return tc.reason(s) == 1 })
			eventually(t, 5*time.Second, "gate empty", func() bool {
				conns, streams := gateCounts(s)
				return conns == 0 && streams == 0
			})
		})
	}
}

func TestRegisteredConnectionOutlivesTimeout(t *testing.T) {
	const timeout = 200 * time.Millisecond
	s := startServer(t, "", 0, func(c *ServerConfig) {
		c.Limits = Limits{RegisterTimeout: timeout, MaxUnauthConns: 1, KeepAlive: 100 * time.Millisecond}
	})
	n := newNode(t, "stays")
	n.start(t, testToken, p2pAddr(s))
	first := waitSession(t, n, 0)
	eventually(t, 5*time.Second, "the node's connection left the unauthenticated count", func() bool {
		conns, _ := gateCounts(s)
		return conns == 0
	})
	// With MaxUnauthConns 1, a stranger gets the one slot the registered node does not take.
	h := newStranger(t, "127.0.0.1")
	if err := connectTo(t, h, s); err != nil {
		t.Fatal(err)
	}
	relayID := relayAddrInfo(t, s).ID
	eventually(t, 10*timeout, "stranger closed at the timeout", func() bool {
		return s.metrics.unauthRefused[gateConnTimeout].Load() == 1 && h.Network().Connectedness(relayID) != network.Connected
	})
	// The node, registered all along, still has its first session: the timeout closed only the
	// stranger, and the caps refused nothing.
	if got, ok := n.session(0); !ok || got.ID != first.ID || n.upCount() != 1 {
		t.Fatalf("node session %+v up=%v after %d registrations", got, ok, n.upCount())
	}
	if c := s.metrics.unauthRefused[gateConnsTotal].Load(); c != 0 {
		t.Fatalf("%d connections refused for the total cap", c)
	}
}

func TestUnauthConnCaps(t *testing.T) {
	tests := []struct {
		name   string
		limits Limits
		srcs   []string
		keep   []bool // whether each stranger's connection stays open
		reason string
	}{
		{
			name:   "in total",
			limits: Limits{MaxUnauthConns: 2, MaxUnauthConnsPerIP: 100},
			srcs:   []string{"127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.1"},
			keep:   []bool{true, true, false, false},
			reason: gateConnsTotal,
		},
		{
			name:   "per source address",
			limits: Limits{MaxUnauthConns: 100, MaxUnauthConnsPerIP: 2, ConnRatePerIP: 1000},
			srcs:   []string{"127.0.0.2", "127.0.0.2", "127.0.0.2", "127.0.0.3"},
			keep:   []bool{true, true, false, true},
			reason: gateConnsPerIP,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, "", 0, func(c *ServerConfig) { c.Limits = tc.limits })
			relayID := relayAddrInfo(t, s).ID
			kept, refused := 0, uint64(0)
			for i, src := range tc.srcs {
				h := newStranger(t, src)
				// The handshake completes; the gate decides when libp2p reports the connection.
				if err := connectTo(t, h, s); err != nil {
					t.Fatalf("stranger %d: %v", i, err)
				}
				if tc.keep[i] {
					kept++
				} else {
					refused++
				}
				eventually(t, 5*time.Second, "the gate decided", func() bool {
					conns, _ := gateCounts(s)
					return conns == kept && s.metrics.unauthRefused[tc.reason].Load() == refused
				})
				if tc.keep[i] {
					if h.Network().Connectedness(relayID) != network.Connected {
						t.Fatalf("stranger %d from %s: connection closed, want it kept", i, src)
					}
					continue
				}
				eventually(t, 5*time.Second, "connection closed", func() bool {
					return h.Network().Connectedness(relayID) != network.Connected
				})
			}
		})
	}
}

func TestLibp2pLimits(t *testing.T) {
	tests := []struct {
		name   string
		limits Limits
		conns  int // strangers connecting from 127.0.0.1
		admit  int // how many connect
		scope  string
	}{
		{
			name:   "connections per address",
			limits: Limits{MaxConnsPerIP: 2, ConnRatePerIP: 1000, MaxUnauthConnsPerIP: 100},
			conns:  3, admit: 2, scope: rmConnPerIP,
		},
		{
			name:   "connection rate per address",
			limits: Limits{MaxConnsPerIP: 100, ConnRatePerIP: 0.001, MaxUnauthConnsPerIP: 2},
			conns:  3, admit: 2, scope: rmConnRate,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, "", 0, func(c *ServerConfig) { c.Limits = tc.limits })
			admitted := 0
			for range tc.conns {
				if err := connectTo(t, newStranger(t, "127.0.0.1"), s); err == nil {
					admitted++
				}
			}
			if admitted != tc.admit {
				t.Errorf("%d of %d connections admitted, want %d", admitted, tc.conns, tc.admit)
			}
			if got := s.metrics.libp2pRefused[tc.scope].Load(); got != uint64(tc.conns-tc.admit) {
				t.Errorf("libp2p refusals in scope %s: %d, want %d", tc.scope, got, tc.conns-tc.admit)
			}
		})
	}
	t.Run("control streams per peer", func(t *testing.T) {
		s := startServer(t, "", 0, nil)
		h := newStranger(t, "127.0.0.1")
		admitted := 0
		for range peerControlStreams + 2 {
			if _, ok := openControl(t, h, s); ok {
				admitted++
			}
		}
		if admitted != peerControlStreams {
			t.Errorf("%d control streams admitted from one peer, want %d", admitted, peerControlStreams)
		}
		if got := s.metrics.libp2pRefused[rmProtocolPeer].Load(); got != 2 {
			t.Errorf("protocol_peer refusals %d, want 2", got)
		}
	})
}

func TestResourceLimitsFinite(t *testing.T) {
	l := DefaultLimits()
	cfg := resourceLimits(l).ToPartialLimitConfig()
	scopes := map[string]rcmgr.ResourceLimits{
		"system": cfg.System, "transient": cfg.Transient, "peer": cfg.PeerDefault, "conn": cfg.Conn,
		"stream": cfg.Stream, "protocol": cfg.ProtocolDefault, "protocol-peer": cfg.ProtocolPeerDefault,
		"service": cfg.ServiceDefault, "service-peer": cfg.ServicePeerDefault,
		"control": cfg.Protocol[ProtocolID], "control-peer": cfg.ProtocolPeer[ProtocolID],
	}
	for name, r := range scopes {
		for field, v := range map[string]int64{"Streams": int64(r.Streams), "StreamsInbound": int64(r.StreamsInbound),
			"Conns": int64(r.Conns), "ConnsInbound": int64(r.ConnsInbound), "FD": int64(r.FD), "Memory": int64(r.Memory)} {
			if v == int64(rcmgr.Unlimited) || v >= 1<<40 {
				t.Errorf("%s %s is unlimited (%d)", name, field, v)
			}
		}
	}
	if got, want := int(cfg.System.ConnsInbound), l.MaxNodes+l.MaxUnauthConns; got != want {
		t.Errorf("system inbound connections %d, want MaxNodes+MaxUnauthConns = %d", got, want)
	}
	if got := int(cfg.Transient.StreamsInbound); got != l.MaxUnauthStreams {
		t.Errorf("transient inbound streams %d, want MaxUnauthStreams = %d", got, l.MaxUnauthStreams)
	}
	if got := int(cfg.ProtocolPeer[ProtocolID].StreamsInbound); got != peerControlStreams {
		t.Errorf("control streams per peer %d, want %d", got, peerControlStreams)
	}
}

func TestPreAuthFrameFitsRegister(t *testing.T) {
	lan := make([]netip.AddrPort, maxLAN)
	for i := range lan {
		lan[i] = netip.AddrPortFrom(netip.MustParseAddr("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff").WithZone("enp129s0f1np1xx"), 65535)
	}
	reg := Registration{
		Name:         strings.Repeat("a", maxNameLen),
		WireGuardKey: base64.StdEncoding.EncodeToString(make([]byte, 32)),
		Overlay:      netip.MustParseAddr("::ffff:255.255.255.255"),
		LAN:          lan,
	}
	if err := reg.validate(); err != nil {
		t.Fatalf("the largest registration is not valid: %v", err)
	}
	f, err := encodeFrame(&message{Type: msgRegister, Name: reg.Name, WireGuardKey: reg.WireGuardKey, Overlay: reg.Overlay,
		LAN: reg.LAN, Nonce: base64.StdEncoding.EncodeToString(make([]byte, nonceLen)),
		Proof: base64.StdEncoding.EncodeToString(make([]byte, 32))})
	if err != nil {
		t.Fatal(err)
	}
	if len(f)-4 > maxPreAuthFrame/2 {
		t.Fatalf("largest register is %d bytes; maxPreAuthFrame %d leaves less than half as margin", len(f)-4, maxPreAuthFrame)
	}
	m, err := readFrame(strings.NewReader(string(f)), maxPreAuthFrame)
	if err != nil || m.Name != reg.Name || len(m.LAN) != maxLAN {
		t.Fatalf("readFrame of the largest register: %+v, %v", m, err)
	}
}
