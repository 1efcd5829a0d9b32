package relay

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

const testToken = "test-join-token"

var loopback = netip.MustParseAddr("127.0.0.1")

// startServer starts a relay on loopback with state in dir (a new temporary directory if "").
func startServer(t testing.TB, dir string, port uint16, mod func(*ServerConfig)) *Server {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	cfg := ServerConfig{JoinToken: testToken, StateDir: dir, ListenAddr: loopback, ListenPort: port,
		Limits: Limits{KeepAlive: time.Second}}
	if mod != nil {
		mod(&cfg)
	}
	s, err := NewServer(cfg)
	if err != nil {
		t.Fatalf("NewServer: %v", err)
	}
	if err := s.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// p2pAddr is the server's loopback multiaddr with its peer ID.
func p2pAddr(s *Server) string {
	return fmt.Sprintf("/ip4/127.0.0.1/tcp/%d/p2p/%s", s.Port(), s.PeerID())
}

// node is a test node: its keys and a recorder of its client's callbacks.
type node struct {
	name  string
	key   ed25519.PrivateKey
	wgKey string
	c     *Client

	mu       sync.Mutex // guards all following fields
	dirs     map[int][]DirEntry
	punches  []Punch
	sessions map[int]Session
	ups      int
}

func newNode(t testing.TB, name string) *node {
	t.Helper()
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	wg := make([]byte, 32)
	rand.Read(wg)
	return &node{name: name, key: key, wgKey: base64.StdEncoding.EncodeToString(wg),
		dirs: map[int][]DirEntry{}, sessions: map[int]Session{}}
}

// again returns a fresh node with n's name and keys (the same node after a restart).
func (n *node) again() *node {
	return &node{name: n.name, key: n.key, wgKey: n.wgKey, dirs: map[int][]DirEntry{}, sessions: map[int]Session{}}
}

// start runs a client for n against relays.
func (n *node) start(t testing.TB, token string, relays ...string) {
	t.Helper()
	c, err := NewClient(ClientConfig{
		Relays:    relays,
		JoinToken: token,
		Key:       n.key,
		Self: Registration{Name: n.name, WireGuardKey: n.wgKey, Overlay: netip.MustParseAddr("fd65:7765:7769::1"),
			LAN: []netip.AddrPort{netip.MustParseAddrPort("192.168.1.10:51820")}},
		OnDirectory: func(relay int, nodes []DirEntry) {
			n.mu.Lock()
			n.dirs[relay] = nodes
			n.mu.Unlock()
		},
		OnPunch: func(relay int, p Punch) {
			n.mu.Lock()
			n.punches = append(n.punches, p)
			n.mu.Unlock()
		},
		OnSession: func(s Session, up bool) {
			n.mu.Lock()
			if up {
				n.sessions[s.Relay] = s
				n.ups++
			} else {
				delete(n.sessions, s.Relay)
			}
			n.mu.Unlock()
		},
	})
	if err != nil {
		t.Fatalf("NewClient: %v", err)
	}
	if err := c.Start(); err != nil {
		t.Fatalf("client Start: %v", err)
	}
	n.c = c
	t.Cleanup(func() { c.Close() })
}

func (n *node) session(relay int) (Session, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	s, ok := n.sessions[relay]
	return s, ok
}

func (n *node) upCount() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ups
}

// dirNames returns the names in n's last directory from relay, or nil.
func (n *node) dirNames(relay int) []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var names []string
	for _, e := range n.dirs[relay] {
		names = append(names, e.Name)
	}
	return names
}

func (n *node) dirEntry(relay int, name string) (DirEntry, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, e := range n.dirs[relay] {
		if e.Name == name {
			return e, true
		}
	}
	return DirEntry{}, false
}

func (n *node) punchList() []Punch {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]Punch(nil), n.punches...)
}

// eventually polls cond every 10 ms until it holds or d passes.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitSession waits until n is registered with relay and returns the session.
func waitSession(t testing.TB, n *node, relay int) Session {
	t.Helper()
	var s Session
	eventually(t, 10*time.Second, n.name+" registered", func() bool {
		var ok bool
		s, ok = n.session(relay)
		return ok
	})
	return s
}

// bindUDP opens a loopback UDP socket, binds it to the node of session s with BIND and returns it.
func bindUDP(t testing.TB, s Session) *net.UDPConn {
	t.Helper()
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_, observed := bind(t, conn, s)
	if want := conn.LocalAddr().(*net.UDPAddr).AddrPort(); observed != want {
		t.Fatalf("BINDACK observed %v, want the socket's address %v", observed, want)
	}
	return conn
}

// bind sends BIND from conn until a BINDACK answers and returns its nonce and observed address.
func bind(t testing.TB, conn *net.UDPConn, s Session) (uint64, netip.AddrPort) {
	t.Helper()
	buf := make([]byte, 1500)
	for try := range 20 {
		nonce := uint64(try + 1000)
		if _, err := conn.WriteToUDPAddrPort(AppendBind(nil, s.ID, nonce, s.Key), s.UDPAddr); err != nil {
			t.Fatal(err)
		}
		conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		n, _, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			continue
		}
		got, observed, err := ParseBindAck(buf[:n])
		if err != nil {
			t.Fatalf("BINDACK: %v", err)
		}
		if got != nonce {
			continue
		}
		conn.SetReadDeadline(time.Time{})
		return got, observed
	}
	t.Fatal("no BINDACK")
	return 0, netip.AddrPort{}
}

// recvData reads one DATA frame from conn within d.
func recvData(conn *net.UDPConn, d time.Duration) (uint32, []byte, error) {
	buf := make([]byte, 1<<16)
	conn.SetReadDeadline(time.Now().Add(d))
	defer conn.SetReadDeadline(time.Time{})
	n, _, err := conn.ReadFromUDPAddrPort(buf)
	if err != nil {
		return 0, nil, err
	}
	id, payload, err := ParseData(buf[:n])
	return id, append([]byte(nil), payload...), err
}

func counter(s *Server, reason string) uint64 { return s.metrics.udpDropped[reason].Load() }
