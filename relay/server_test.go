package relay

import (
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type denyACL struct{ name string }

func (a denyACL) Register(name, _ string) error {
	if name == a.name {
		return errors.New("not on the list")
	}
	return nil
}

func TestRegistration(t *testing.T) {
	tests := []struct {
		name     string
		token    string
		prepare  func(t *testing.T, s *Server) // before the node under test starts
		wantUp   bool
		refusedB string // refusal counter that must rise when !wantUp
	}{
		{name: "ok", token: testToken, wantUp: true},
		{name: "bad token", token: "wrong", refusedB: refuseBadProof},
		{
			name: "name bound to other keys", token: testToken, refusedB: refuseBound,
			prepare: func(t *testing.T, s *Server) {
				first := newNode(t, "edge-1")
				first.start(t, testToken, p2pAddr(s))
				waitSession(t, first, 0)
				first.c.Close()
			},
		},
		{name: "refused by ACL", token: testToken, refusedB: refuseACL},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, "", 0, func(c *ServerConfig) {
				if tc.refusedB == refuseACL {
					c.ACL = denyACL{name: "edge-1"}
				}
			})
			if tc.prepare != nil {
				tc.prepare(t, s)
			}
			// A bystander that is registered must see nothing of a refused node.
			watcher := newNode(t, "watcher")
			watcher.start(t, testToken, p2pAddr(s))
			waitSession(t, watcher, 0)

			n := newNode(t, "edge-1")
			n.start(t, tc.token, p2pAddr(s))
			if tc.wantUp {
				sess := waitSession(t, n, 0)
				if sess.ID == 0 || len(sess.Key) != 32 || sess.UDPAddr.Port() != s.Port() {
					t.Fatalf("session %+v: want an ID, a 32-byte key and UDP port %d", sess, s.Port())
				}
				eventually(t, 5*time.Second, "directory with both nodes", func() bool {
					return slices.Equal(n.dirNames(0), []string{"watcher", "edge-1"}) &&
						slices.Equal(watcher.dirNames(0), []string{"watcher", "edge-1"})
				})
				return
			}
			eventually(t, 5*time.Second, "refusal "+tc.refusedB, func() bool {
				return s.metrics.refused[tc.refusedB].Load() > 0
			})
			// Let the client retry a few times: it must never come up nor see a directory.
			eventually(t, 5*time.Second, "retries", func() bool { return s.metrics.refused[tc.refusedB].Load() >= 2 })
			if _, ok := n.session(0); ok || n.upCount() != 0 || n.dirNames(0) != nil {
				t.Fatalf("refused node got a session or a directory: %v", n.dirNames(0))
			}
			if slices.Contains(watcher.dirNames(0), "edge-1") {
				t.Fatalf("refused node is in the directory: %v", watcher.dirNames(0))
			}
		})
	}
}

func TestRestartKeepsIdentity(t *testing.T) {
	dir := t.TempDir()
	s1 := startServer(t, dir, 0, nil)
	a, b := newNode(t, "a"), newNode(t, "b")
	a.start(t, testToken, p2pAddr(s1))
	b.start(t, testToken, p2pAddr(s1))
	idA, idB := waitSession(t, a, 0).ID, waitSession(t, b, 0).ID
	peerID, port := s1.PeerID(), s1.Port()
	a.c.Close()
	b.c.Close()
	s1.Close()

	s2 := startServer(t, dir, port, nil)
	if s2.PeerID() != peerID {
		t.Fatalf("peer ID after restart %s, want %s", s2.PeerID(), peerID)
	}
	// b comes back first: node IDs are bound to names, not to arrival order.
	b2, a2 := b.again(), a.again()
	b2.start(t, testToken, p2pAddr(s2))
	if got := waitSession(t, b2, 0).ID; got != idB {
		t.Fatalf("b's ID after restart %d, want %d", got, idB)
	}
	a2.start(t, testToken, p2pAddr(s2))
	if got := waitSession(t, a2, 0).ID; got != idA {
		t.Fatalf("a's ID after restart %d, want %d", got, idA)
	}
	impostor := newNode(t, "a")
	impostor.start(t, testToken, p2pAddr(s2))
	eventually(t, 5*time.Second, "impostor refused", func() bool { return s2.metrics.refused[refuseBound].Load() > 0 })
}

func TestDirectoryPush(t *testing.T) {
	s := startServer(t, "", 0, nil)
	nodes := []*node{newNode(t, "n1"), newNode(t, "n2"), newNode(t, "n3")}
	for _, n := range nodes {
		n.start(t, testToken, p2pAddr(s))
	}
	all := []string{"n1", "n2", "n3"}
	eventually(t, 5*time.Second, "join pushed to all", func() bool {
		for _, n := range nodes {
			names := n.dirNames(0)
			slices.Sort(names)
			if !slices.Equal(names, all) {
				return false
			}
		}
		return true
	})

	// Reflexive change: n1 binds a UDP socket, everyone learns its address.
	conn := bindUDP(t, waitSession(t, nodes[0], 0))
	want := conn.LocalAddr().String()
	eventually(t, 5*time.Second, "reflexive pushed", func() bool {
		for _, n := range nodes {
			e, ok := n.dirEntry(0, "n1")
			if !ok || e.Reflexive.String() != want {
				return false
			}
		}
		return true
	})

	// Leave: n3 goes away.
	nodes[2].c.Close()
	eventually(t, 5*time.Second, "leave pushed", func() bool {
		for _, n := range nodes[:2] {
			names := n.dirNames(0)
			slices.Sort(names)
			if !slices.Equal(names, []string{"n1", "n2"}) {
				return false
			}
		}
		return true
	})
}

func TestPunch(t *testing.T) {
	s := startServer(t, "", 0, nil)
	a, b := newNode(t, "a"), newNode(t, "b")
	a.start(t, testToken, p2pAddr(s))
	b.start(t, testToken, p2pAddr(s))
	connB := bindUDP(t, waitSession(t, b, 0))
	connA := bindUDP(t, waitSession(t, a, 0))
	eventually(t, 5*time.Second, "a sees b's reflexive address", func() bool {
		e, ok := a.dirEntry(0, "b")
		return ok && e.Reflexive.IsValid()
	})
	if err := a.c.RequestPunch(t.Context(), 0, "nobody"); err == nil {
		t.Fatal("punch to a node not in the directory succeeded")
	}
	if err := a.c.RequestPunch(t.Context(), 0, "b"); err != nil {
		t.Fatalf("RequestPunch: %v", err)
	}
	eventually(t, 5*time.Second, "punch reaches both", func() bool {
		return len(a.punchList()) == 1 && len(b.punchList()) == 1
	})
	pa, pb := a.punchList()[0], b.punchList()[0]
	if pa.Peer != "b" || pb.Peer != "a" {
		t.Fatalf("punch peers %q and %q, want b and a", pa.Peer, pb.Peer)
	}
	if pa.PeerReflexive.String() != connB.LocalAddr().String() || pb.PeerReflexive.String() != connA.LocalAddr().String() {
		t.Fatalf("punch reflexive %v / %v, want %v / %v", pa.PeerReflexive, pb.PeerReflexive, connB.LocalAddr(), connA.LocalAddr())
	}
	if len(pa.PeerLAN) != 1 || len(pb.PeerLAN) != 1 {
		t.Fatalf("punch LAN %v / %v, want one address each", pa.PeerLAN, pb.PeerLAN)
	}
	// On loopback both round trips are tiny: neither side waits long, and at most one waits at all.
	for _, p := range []Punch{pa, pb} {
		if p.Delay < 0 || p.Delay > 100*time.Millisecond {
			t.Fatalf("punch delay %v, want 0..100ms on loopback", p.Delay)
		}
	}
	if s.metrics.punches.Load() != 1 {
		t.Fatalf("punches counted %d, want 1", s.metrics.punches.Load())
	}
}

func TestMetricsEndpoint(t *testing.T) {
	s := startServer(t, "", 0, func(c *ServerConfig) { c.MetricsAddr = "127.0.0.1:0" })
	n := newNode(t, "m1")
	n.start(t, testToken, p2pAddr(s))
	waitSession(t, n, 0)
	resp, err := http.Get("http://" + s.metricsLn.Addr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"edgewire_relay_nodes 1\n",
		"edgewire_relay_registrations_total 1\n",
		`edgewire_relay_udp_frames_dropped_total{reason="rate_limited"} 0`,
		"# TYPE edgewire_relay_bytes_relayed_total counter\n",
		"edgewire_relay_unauth_conns 0\n",
		"edgewire_relay_unauth_streams 0\n",
		`edgewire_relay_unauth_refused_total{reason="streams_per_ip"} 0`,
		`edgewire_relay_libp2p_refused_total{scope="conn_per_ip"} 0`,
		`edgewire_relay_registrations_refused_total{reason="frame_too_large"} 0`,
		`edgewire_relay_control_dropped_total{reason="queue_full"} 0`,
		"edgewire_relay_directory_superseded_total ",
		"\ngo_goroutines ",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q:\n%s", want, body)
		}
	}
}

func TestServerLifecycle(t *testing.T) {
	tests := []struct {
		name string
		cfg  ServerConfig
		ok   bool
	}{
		{name: "no token", cfg: ServerConfig{StateDir: t.TempDir()}},
		{name: "no state dir", cfg: ServerConfig{JoinToken: "x"}},
		{name: "bad advertise", cfg: ServerConfig{JoinToken: "x", StateDir: t.TempDir(), AdvertiseAddrs: []string{"nope"}}},
		{name: "ok", cfg: ServerConfig{JoinToken: "x", StateDir: t.TempDir(), ListenAddr: loopback,
			AdvertiseAddrs: []string{"relay.example.com:4001", "192.0.2.1:4001"}}, ok: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := NewServer(tc.cfg)
			if !tc.ok {
				if err == nil {
					t.Fatal("NewServer succeeded")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Start(); err != nil {
				t.Fatal(err)
			}
			if err := s.Start(); err == nil {
				t.Error("second Start succeeded")
			}
			got := s.Multiaddrs()
			slices.Sort(got)
			want := []string{"/dns/relay.example.com/tcp/4001/p2p/" + s.PeerID(), "/ip4/192.0.2.1/tcp/4001/p2p/" + s.PeerID()}
			if !slices.Equal(got, want) {
				t.Errorf("Multiaddrs %v, want %v", got, want)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatalf("second Close: %v", err)
			}
		})
	}
}
