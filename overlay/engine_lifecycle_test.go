package overlay

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/edgewire/edgewire/overlay/tun"
)

// TestEnginePeerKeyChange gives node b a new key while a and c run: once the catalog says so, a
// and c drop the old WireGuard peer, add the new one, and reach b at its new overlay address.
func TestEnginePeerKeyChange(t *testing.T) {
	tr := newTrio(t)
	tr.startAll(t)
	a, b, c := tr.a, tr.b, tr.c
	a.waitReach(t, b, echoPort)
	old := b.id.WireGuardPublic

	b.stop(t)
	b.newKey(t)
	b.src.snaps <- tr.catalog()
	b.start(t, b.config(t, tr.net))
	b.waitUp(t)
	b.echoOn(t, echoPort)
	for _, ta := range []*testAgent{a, c} {
		ta.src.snaps <- tr.catalog()
	}

	for _, from := range []*testAgent{a, c} {
		t.Run(from.name, func(t *testing.T) {
			from.waitReach(t, b, echoPort)
			m := from.agent.meshP.Load()
			m.mu.Lock()
			_, hasOld := m.peers[old]
			_, hasNew := m.peers[b.id.WireGuardPublic]
			n := len(m.peers)
			m.mu.Unlock()
			if hasOld || !hasNew || n != 2 {
				t.Errorf("peers: old key %v, new key %v, %d in all; want the new key only, 2 peers", hasOld, hasNew, n)
			}
			di, err := (*backend)(from.agent).WireGuard()
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range di.Peers {
				if p.PublicKey == old.String() {
					t.Errorf("wireguard-go still has b's old key")
				}
			}
		})
	}
}

// TestEngineShutdown stops an agent in each of its states (see the package doc) and when a part
// fails to start: Run returns (nil when stopped, the part's error when it failed) and leaves no
// goroutine behind.
func TestEngineShutdown(t *testing.T) {
	errTUN := errors.New("no TUN for this test")
	errUAPI := errors.New("no UAPI socket for this test")
	tests := []struct {
		name string
		// run starts agent a of tr (and the others it needs) and stops it in the state under
		// test; it returns what a's Run returned.
		run     func(t *testing.T, tr *trio) error
		wantErr error
		// nat runs the case on natTrio (each node behind its own NAT) instead of newTrio.
		nat bool
	}{
		{
			name: "waiting for the first catalog",
			run: func(t *testing.T, tr *trio) error {
				a := tr.a
				a.start(t, a.config(t, tr.net))
				<-a.src.running
				return a.cancelAndWait(t)
			},
		},
		{
			name: "starting the data plane",
			run: func(t *testing.T, tr *trio) error {
				a := tr.a
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				cfg := a.config(t, tr.net)
				open := cfg.OpenTUN
				cfg.OpenTUN = func(c tun.Config) (TUNDevice, error) {
					cancel() // Run is between the DNS server and the TUN
					return open(c)
				}
				a.src.snaps <- tr.catalog()
				a.startCtx(t, ctx, cfg)
				return a.wait(t)
			},
		},
		{
			name: "starting the mesh",
			run: func(t *testing.T, tr *trio) error {
				a := tr.a
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				cfg := a.config(t, tr.net)
				listen := cfg.ListenUAPI
				cfg.ListenUAPI = func(name string) (net.Listener, error) {
					cancel() // wireguard-go is up, the paths and the forward listener not yet
					return listen(name)
				}
				a.src.snaps <- tr.catalog()
				a.startCtx(t, ctx, cfg)
				return a.wait(t)
			},
		},
		{
			name: "up, with traffic between nodes",
			run: func(t *testing.T, tr *trio) error {
				tr.startAll(t)
				tr.b.waitReach(t, tr.a, echoPort)
				stop := make(chan struct{})
				done := make(chan struct{})
				go func() {
					defer close(done)
					for {
						select {
						case <-stop:
							return
						default:
						}
						_ = tr.b.roundTrip(netip.AddrPortFrom(tr.a.overlay, echoPort), "traffic", time.Second)
					}
				}()
				defer func() {
					close(stop)
					<-done
				}()
				return tr.a.cancelAndWait(t)
			},
		},
		{
			name: "up, during a storm of catalog updates",
			run: func(t *testing.T, tr *trio) error {
				a := tr.a
				full := tr.catalog()
				without := tr.catalog()
				without.Nodes = without.Nodes[:1]
				src := &stormSource{first: full, without: without, agent: func() *Agent { return a.agent },
					stop: make(chan struct{}), done: make(chan struct{})}
				cfg := a.config(t, tr.net)
				cfg.Source = src
				a.start(t, cfg)
				a.waitUp(t)
				err := a.cancelAndWait(t)
				<-src.done
				return err
			},
		},
		{
			name: "the TUN fails to open",
			run: func(t *testing.T, tr *trio) error {
				a := tr.a
				cfg := a.config(t, tr.net)
				cfg.OpenTUN = func(tun.Config) (TUNDevice, error) { return nil, errTUN }
				a.src.snaps <- tr.catalog()
				a.start(t, cfg)
				return a.wait(t)
			},
			wantErr: errTUN,
		},
		{
			name: "the UAPI socket fails to open",
			run: func(t *testing.T, tr *trio) error {
				a := tr.a
				cfg := a.config(t, tr.net)
				cfg.ListenUAPI = func(string) (net.Listener, error) { return nil, errUAPI }
				a.src.snaps <- tr.catalog()
				a.start(t, cfg)
				return a.wait(t)
			},
			wantErr: errUAPI,
		},
		{
			name: "while registering with a relay",
			nat:  true,
			run: func(t *testing.T, tr *trio) error {
				r := startWithRelay(t, tr)
				defer r.close()
				tr.a.waitUp(t)
				return tr.a.cancelAndWait(t)
			},
		},
		{
			name: "while a path fails over to the relay",
			nat:  true,
			run: func(t *testing.T, tr *trio) error {
				r := startWithRelay(t, tr)
				defer r.close()
				for _, ta := range tr.agents() {
					ta.waitUp(t)
					ta.echoOn(t, echoPort)
				}
				tr.a.waitReach(t, tr.b, echoPort)
				waitCond(t, "a's path to b direct", func() bool { return tr.a.pathTo(tr.b) == "direct" })
				tr.net.SetDrop(func(from, to netip.AddrPort) bool { return to.Addr() == addr("203.0.113.2") })
				// Data unanswered starts the failover at once.
				_ = tr.a.roundTrip(netip.AddrPortFrom(tr.b.overlay, echoPort), "cut", 300*time.Millisecond)
				return tr.a.cancelAndWait(t)
			},
		},
		{
			name: "during a peer's key change",
			run: func(t *testing.T, tr *trio) error {
				tr.startAll(t)
				tr.a.waitReach(t, tr.b, echoPort)
				tr.b.newKey(t)
				tr.a.src.snaps <- tr.catalog()
				return tr.a.cancelAndWait(t)
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tr := newTrio(t)
			if tc.nat {
				tr = natTrio(t)
			}
			err := tc.run(t, tr)
			for _, ta := range tr.agents() {
				ta.stop(t)
			}
			switch {
			case tc.wantErr == nil && err != nil:
				t.Errorf("Run: %v, want nil", err)
			case tc.wantErr != nil && !errors.Is(err, tc.wantErr):
				t.Errorf("Run: %v, want %v", err, tc.wantErr)
			}
			if h := tr.a.host.Load(); h != nil {
				if _, err := h.TUN().Read(make([][]byte, 1), make([]int, 1), 0); err == nil || !strings.Contains(err.Error(), "closed") {
					t.Errorf("the TUN is still open after Run returned: read: %v", err)
				}
			}
			goleak.VerifyNone(t)
		})
	}
}

// cancelAndWait cancels the agent's Run and returns what it returned.
func (ta *testAgent) cancelAndWait(t *testing.T) error {
	t.Helper()
	ta.cancel()
	return ta.wait(t)
}

// wait waits for the agent's Run to return and returns its error.
func (ta *testAgent) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-ta.done:
		ta.cancel()
		ta.cancel = nil
		return err
	case <-time.After(engineWait):
		t.Fatalf("%s: Run did not return within %v", ta.name, engineWait)
		return nil
	}
}

// startWithRelay starts a relay and the trio's agents registered with it.
func startWithRelay(t *testing.T, tr *trio) *testRelay {
	t.Helper()
	r := startRelay(t, tr.net, t.TempDir(), 0)
	for _, ta := range tr.agents() {
		cfg := ta.config(t, tr.net)
		cfg.Relays = []string{r.addr}
		cfg.JoinToken = testJoinToken
		ta.src.snaps <- tr.catalog()
		ta.start(t, cfg)
	}
	return r
}

// TestEngineServiceFlowsBeforeMeshUp holds the agent while its mesh starts: the service netstack
// already serves, and a flow to an endpoint on the node itself reaches it.
func TestEngineServiceFlowsBeforeMeshUp(t *testing.T) {
	tr := newTrio(t)
	a := tr.a
	reached, release := make(chan struct{}), make(chan struct{})
	cfg := a.config(t, tr.net)
	listen := cfg.ListenUAPI
	cfg.ListenUAPI = func(name string) (net.Listener, error) {
		close(reached)
		<-release
		return listen(name)
	}
	a.src.snaps <- tr.catalog()
	a.start(t, cfg)
	select {
	case <-reached:
	case <-time.After(engineWait):
		t.Fatal("the agent never started its mesh")
	}
	released := false
	defer func() {
		if !released {
			close(release)
		}
	}()
	if a.agent.meshP.Load() != nil {
		t.Fatal("the mesh is published while it starts")
	}
	svcIP := a.agent.snap.Load().Services[0].IP
	if err := a.roundTrip(netip.AddrPortFrom(svcIP, 80), "before the mesh", 10*time.Second); err != nil {
		t.Fatalf("flow to the local endpoint while the mesh starts: %v", err)
	}
	if n := a.local.dials.Load(); n < 1 {
		t.Errorf("%d local dials, want at least 1", n)
	}
	close(release)
	released = true
	a.waitUp(t)
}
