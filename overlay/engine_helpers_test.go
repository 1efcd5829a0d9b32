package overlay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/forward"
	"github.com/edgewire/edgewire/overlay/identity"
	"github.com/edgewire/edgewire/overlay/overlaytest"
	"github.com/edgewire/edgewire/overlay/path/pathtest"
	"github.com/edgewire/edgewire/overlay/tun"
)

// engineWait bounds every wait on the engine: generous, as the tests run under the race detector
// on two shared cores.
const engineWait = 30 * time.Second

// waitCond polls cond until it holds, failing tb after engineWait.
func waitCond(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(engineWait)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s", engineWait, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// feed is a discovery.Source the test drives: Run applies the snapshots sent on it, in order, and
// calls onApplied after each.
type feed struct {
	snaps   chan *discovery.Snapshot
	running chan struct{} // closed when Run is first called
	once    sync.Once
}

func newFeed() *feed {
	return &feed{snaps: make(chan *discovery.Snapshot, 64), running: make(chan struct{})}
}

func (f *feed) Run(ctx context.Context, update func(*discovery.Snapshot)) error {
	f.once.Do(func() { close(f.running) })
	for {
		select {
		case <-ctx.Done():
			return nil
		case s := <-f.snaps:
			update(s)
		}
	}
}

// testAgent is one agent of an engine test: its keys, its WireGuard socket's place on the
// in-memory network, the Host that stands in for its kernel, and the running agent.
type testAgent struct {
	name string
	id   *identity.Identity
	// sock is the WireGuard socket's address on the in-memory network, behind nat (nil: public);
	// with real set, the address of a real UDP socket (wireguard-go's StdNetBind, all addresses).
	sock netip.AddrPort
	nat  *pathtest.NAT
	real bool
	// lanIP is the host's IPv4 address, the source of its flows to service IPs.
	lanIP   netip.Addr
	overlay netip.Addr
	dir     string
	src     *feed
	local   localEndpointDialer // the endpoints on this node

	host  atomic.Pointer[overlaytest.Host]
	agent *Agent
	cfg   Config

	cancel context.CancelFunc
	done   chan error
}

// newTestAgent makes an agent's identity and place; start runs it.
func newTestAgent(t *testing.T, name string, sock netip.AddrPort, nat *pathtest.NAT, lanIP netip.Addr) *testAgent {
	t.Helper()
	ta := &testAgent{name: name, sock: sock, nat: nat, lanIP: lanIP, dir: t.TempDir(), src: newFeed()}
	ta.newKey(t)
	return ta
}

// newKey gives the agent a new identity (the next start uses it).
func (ta *testAgent) newKey(t *testing.T) {
	t.Helper()
	id, _, err := identity.LoadOrCreate(filepath.Join(t.TempDir(), "state"))
	if err != nil {
		t.Fatal(err)
	}
	ta.id = id
	ta.overlay, err = identity.OverlayAddr(identity.DefaultOverlayPrefix, id.WireGuardPublic)
	if err != nil {
		t.Fatal(err)
	}
}

// node is the agent's Node object in the catalog.
func (ta *testAgent) node() *discovery.Node {
	return &discovery.Node{Name: ta.name, WireGuardKey: ta.id.WireGuardPublic.String(), Endpoints: []netip.AddrPort{ta.sock}}
}

// config is the agent's Config on net: everything the host would give comes from the test.
func (ta *testAgent) config(t *testing.T, n *pathtest.Network) Config {
	return Config{
		Logger:        testLogger(t, ta.name),
		NodeName:      ta.name,
		StateDir:      ta.dir,
		ControlSocket: filepath.Join(ta.dir, "ctl.sock"),
		HealthAddr:    "127.0.0.1:0",
		ListenPort:    ta.sock.Port(),
		Source:        ta.src,
		SourceName:    "test feed",
		Identity:      ta.id,
		OpenTUN: func(c tun.Config) (TUNDevice, error) {
			h, err := overlaytest.NewHost(c, ta.lanIP)
			if err != nil {
				return nil, err
			}
			ta.host.Store(h)
			return h, nil
		},
		WireGuardSocket: ta.socket(n),
		ListenUAPI: func(name string) (net.Listener, error) {
			return net.Listen("unix", filepath.Join(ta.dir, name+".sock"))
		},
		ForwardListener: func(forward.ListenerConfig) (ForwardListener, error) { return nil, nil },
		DialLocal:       ta.local.dial,
	}
}

// socket is the agent's WireGuard socket: on n, or nil (real sockets) for a real agent.
func (ta *testAgent) socket(n *pathtest.Network) conn.Bind {
	if ta.real {
		return nil
	}
	return n.NewBind(ta.sock.Addr(), ta.nat)
}

// start runs the agent with cfg; stop ends it.
func (ta *testAgent) start(t *testing.T, cfg Config) {
	t.Helper()
	ta.startCtx(t, context.Background(), cfg)
}

// startCtx runs the agent with cfg under ctx.
func (ta *testAgent) startCtx(t *testing.T, ctx context.Context, cfg Config) {
	t.Helper()
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ta.agent, ta.cfg = a, cfg
	ctx, cancel := context.WithCancel(ctx)
	ta.cancel = cancel
	ta.done = make(chan error, 1)
	go func() { ta.done <- a.Run(ctx) }()
	t.Cleanup(func() { ta.stop(t) })
}

// stop cancels the agent's Run and waits for it; later calls do nothing.
func (ta *testAgent) stop(t *testing.T) {
	t.Helper()
	if ta.cancel == nil {
		return
	}
	ta.cancel()
	ta.cancel = nil
	select {
	case err := <-ta.done:
		if err != nil {
			t.Errorf("%s: Run: %v", ta.name, err)
		}
	case <-time.After(engineWait):
		t.Fatalf("%s: Run did not return %v after its context was cancelled", ta.name, engineWait)
	}
}

// waitUp waits until the agent's mesh is up.
func (ta *testAgent) waitUp(t *testing.T) *mesh {
	t.Helper()
	waitCond(t, ta.name+" up", func() bool {
		select {
		case err := <-ta.done:
			ta.done <- err
			t.Fatalf("%s: Run returned before the agent was up: %v", ta.name, err)
		default:
		}
		return ta.agent.meshP.Load() != nil
	})
	return ta.agent.meshP.Load()
}

// echoOn serves a TCP echo on the agent's host at [overlay]:port until the test ends.
func (ta *testAgent) echoOn(t *testing.T, port uint16) {
	t.Helper()
	ln, err := ta.host.Load().ListenTCP(netip.AddrPortFrom(ta.overlay, port))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { serveEcho(ln) })
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
}

// serveEcho echoes every connection ln accepts until ln is closed; then it closes the connections
// still open (a client whose path went away never closes its end) and waits for them.
func serveEcho(ln net.Listener) {
	var wg sync.WaitGroup
	var mu sync.Mutex // guards conns
	conns := make(map[net.Conn]struct{})
	defer func() {
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		mu.Lock()
		conns[c] = struct{}{}
		mu.Unlock()
		wg.Go(func() {
			defer func() {
				mu.Lock()
				delete(conns, c)
				mu.Unlock()
				c.Close()
			}()
			_, _ = io.Copy(c, c)
		})
	}
}

// roundTrip dials addr from the agent's host, writes msg and reads it back, within timeout.
func (ta *testAgent) roundTrip(addr netip.AddrPort, msg string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	h := ta.host.Load()
	if h == nil {
		return errors.New("no host yet")
	}
	c, err := h.DialContext(ctx, "tcp", addr.String())
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if _, err := io.WriteString(c, msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

// waitReach waits until a round trip from ta to [to's overlay]:port succeeds.
func (ta *testAgent) waitReach(t *testing.T, to *testAgent, port uint16) {
	t.Helper()
	var last error
	deadline := time.Now().Add(engineWait)
	for {
		if last = ta.roundTrip(netip.AddrPortFrom(to.overlay, port), "ping "+ta.name, 2*time.Second); last == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s cannot reach %s over the overlay within %v: %v", ta.name, to.name, engineWait, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// pathTo is the kind of ta's path to peer as its path manager sees it ("" while it has none).
func (ta *testAgent) pathTo(peer *testAgent) string {
	m := ta.agent.meshP.Load()
	if m == nil {
		return ""
	}
	for _, p := range m.paths.Paths() {
		if p.Key == peer.id.WireGuardPublic {
			return string(p.Kind)
		}
	}
	return ""
}

// localEndpointDialer stands in for this host's kernel when the agent dials an endpoint on its own
// node: every endpoint is an in-memory TCP echo, and dials are counted.
type localEndpointDialer struct{ dials atomic.Uint64 }

func (d *localEndpointDialer) dial(ctx context.Context, network, address string) (net.Conn, error) {
	if network != "tcp" {
		return nil, fmt.Errorf("local endpoint %s %s: only tcp in this test", network, address)
	}
	d.dials.Add(1)
	c, s := net.Pipe()
	go func() {
		defer s.Close()
		_, _ = io.Copy(s, s)
	}()
	return c, nil
}

// testLogger logs to a buffer that the test prints when it fails; logs written after the test (by
// goroutines that are stopping) land in the buffer too, where they harm nothing. The buffer keeps
// the last logKeep bytes.
func testLogger(t *testing.T, node string) *slog.Logger {
	lb := &logBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			lb.mu.Lock()
			t.Logf("log of %s:\n%s", node, lb.buf.String())
			lb.mu.Unlock()
		}
	})
	return slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelInfo})).With("node", node)
}

const logKeep = 4 << 20

type logBuffer struct {
	mu  sync.Mutex // guards buf
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.buf.Len()+len(p) > logKeep {
		rest := bytes.Clone(l.buf.Bytes()[l.buf.Len()/2:])
		l.buf.Reset()
		l.buf.WriteString("[earlier lines dropped]\n")
		l.buf.Write(rest)
	}
	return l.buf.Write(p)
}
