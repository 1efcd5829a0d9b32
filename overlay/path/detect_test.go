package path

import (
	"bytes"
	"cmp"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"github.com/edgewire/edgewire/overlay/path/pathtest"
)

func TestPathError(t *testing.T) {
	wrap := func(e syscall.Errno) error {
		return &net.OpError{Op: "write", Net: "udp", Err: os.NewSyscallError("sendmmsg", e)}
	}
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"firewall EPERM", wrap(syscall.EPERM), true},
		{"EACCES", wrap(syscall.EACCES), true},
		{"no route", wrap(syscall.ENETUNREACH), true},
		{"host unreachable", wrap(syscall.EHOSTUNREACH), true},
		{"address gone", wrap(syscall.EADDRNOTAVAIL), true},
		{"interface gone", wrap(syscall.ENODEV), true},
		{"wrapped by SendTo", fmt.Errorf("path: send to 1.2.3.4:5: %w", wrap(syscall.EPERM)), true},
		{"buffer full is transient", wrap(syscall.ENOBUFS), false},
		{"would block is transient", wrap(syscall.EAGAIN), false},
		{"closed socket", net.ErrClosed, false},
		{"no relay session", errNoRelay, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := pathError(tc.err); got != tc.want {
				t.Errorf("pathError(%v) = %v, want %v", tc.err, got, tc.want)
			}
		})
	}
}

// failBind is an inner Bind whose sends to the addresses in fail fail with that error, as a
// firewall's OUTPUT rule makes sendmmsg fail.
type failBind struct {
	conn.Bind
	mu   sync.Mutex // guards fail
	fail map[netip.AddrPort]syscall.Errno
}

func (f *failBind) set(to netip.AddrPort, e syscall.Errno) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail == nil {
		f.fail = map[netip.AddrPort]syscall.Errno{}
	}
	f.fail[to] = e
}

func (f *failBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	if to, ok := endpointAddr(ep); ok {
		f.mu.Lock()
		e := f.fail[to]
		f.mu.Unlock()
		if e != 0 {
			return &net.OpError{Op: "write", Net: "udp", Err: os.NewSyscallError("sendmmsg", e)}
		}
	}
	return f.Bind.Send(bufs, ep)
}

// TestWatchNotes drives the Bind's watch of one endpoint by hand: what raises a suspicion, what
// clears the unanswered data, what counts a send error.
func TestWatchNotes(t *testing.T) {
	watched := netip.MustParseAddrPort("192.0.2.7:51820")
	other := netip.MustParseAddrPort("192.0.2.8:51820")
	type step struct {
		send    []byte // sent to to (nil: received from to)
		to      netip.AddrPort
		sendErr syscall.Errno
	}
	data := wgMsg(wgTypeTransport, 100)
	keepalive := wgMsg(wgTypeTransport, wgSizeTransportMin)
	initiation := wgMsg(wgTypeInitiation, wgSizeInitiation)
	tests := []struct {
		name        string
		steps       []step
		wantSuspect bool
		wantErrs    uint32
		wantWakes   int
	}{
		{"data twice unanswered", []step{{send: data, to: watched}, {send: data, to: watched}}, true, 0, 1},
		{"initiations twice unanswered", []step{{send: initiation, to: watched}, {send: initiation, to: watched}}, true, 0, 1},
		{"one data datagram is not yet a suspicion", []step{{send: data, to: watched}}, false, 0, 0},
		{"keepalives ask for no answer", []step{{send: keepalive, to: watched}, {send: keepalive, to: watched}}, false, 0, 0},
		{"an answer in between", []step{{send: data, to: watched}, {to: watched}, {send: data, to: watched}}, false, 0, 0},
		{"an answer from elsewhere does not count", []step{{send: data, to: watched}, {to: other}, {send: data, to: watched}}, true, 0, 1},
		{"unwatched endpoint", []step{{send: data, to: other}, {send: data, to: other}}, false, 0, 0},
		{"one suspicion per episode", []step{{send: data, to: watched}, {send: data, to: watched}, {send: data, to: watched}}, true, 0, 1},
		{"firewall", []step{{send: data, to: watched, sendErr: syscall.EPERM}, {send: keepalive, to: watched, sendErr: syscall.EPERM}}, false, 2, 2},
		{"full buffer is no path error", []step{{send: data, to: watched, sendErr: syscall.ENOBUFS}}, false, 0, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			inner := &failBind{Bind: &recordBind{Bind: conn.NewStdNetBind()}}
			b := NewBind(Config{Inner: inner})
			a := &activity{}
			var wakes atomic.Int32
			// suspectAfter 0: the second unanswered data send is a suspicion.
			w := &watchTable{byAddr: map[netip.AddrPort]*activity{watched: a}, wake: func() { wakes.Add(1) }}
			b.setWatch(w)
			for _, s := range tc.steps {
				if s.send == nil {
					w.noteReceive(s.to)
					continue
				}
				inner.set(s.to, s.sendErr)
				ep, err := b.ParseEndpoint(s.to.String())
				if err != nil {
					t.Fatal(err)
				}
				if err := b.Send([][]byte{s.send}, ep); (err != nil) != (s.sendErr != 0) {
					t.Fatalf("Send to %s: %v, want an error: %v", s.to, err, s.sendErr != 0)
				}
			}
			if got := a.suspect.Load(); got != tc.wantSuspect {
				t.Errorf("suspect = %v, want %v", got, tc.wantSuspect)
			}
			if got := a.sendErr.Load(); got != tc.wantErrs {
				t.Errorf("send errors noted = %d, want %d", got, tc.wantErrs)
			}
			if got := int(wakes.Load()); got != tc.wantWakes {
				t.Errorf("Manager woken %d times, want %d", got, tc.wantWakes)
			}
			st := b.Stats()
			if st.SendPathErrors != uint64(tc.wantErrs) || (st.Suspicions > 0) != tc.wantSuspect {
				t.Errorf("stats %+v, want %d path errors, suspicions=%v", st, tc.wantErrs, tc.wantSuspect)
			}
		})
	}
}

// flow sends a WireGuard data datagram from n to the endpoint n's Manager applied for peer every
// interval, as wireguard-go carries a flow, until the returned stop is called.
func (n *labNode) flow(tb testing.TB, peer *labNode, every time.Duration) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
			}
			to := n.applied(peer)
			if to == "" {
				continue
			}
			ep, err := n.bind.ParseEndpoint(to)
			if err != nil {
				tb.Errorf("parse %s: %v", to, err)
				return
			}
			_ = n.bind.Send([][]byte{wgMsg(wgTypeTransport, 120)}, ep) // errors are what some tests are about
		}
	})
	var once sync.Once
	return func() { once.Do(func() { close(done); wg.Wait() }) }
}

// TestFailoverOnFailure breaks the path two nodes use, in each way a path fails, and measures how
// long each side takes to fall back to the relay. With the default probe interval (2 s) an alive
// path is checked every 5 s and needs 3 missed probes: without traffic-driven detection a side
// falls back after 3 s at best, 7 s at worst. With a flow, it must be within 1.5 s (the issue's
// goal in the NAT lab; the design is 1 s). Without a flow, a firewall still fails the path over:
// every probe that cannot leave is a loss at once (before, such a path stayed up for good).
func TestFailoverOnFailure(t *testing.T) {
	const goal = 1500 * time.Millisecond
	tests := []struct {
		name   string
		probe  time.Duration // 0: the default
		direct bool          // behind two easy NATs (punched direct), else one LAN
		flow   bool          // both sides send data every 20ms
		cut    func(l *lab, a, b *labNode, fail map[string]*failBind)
		within time.Duration // from the cut until both sides are on the relay
	}{
		{
			name: "lan, silent loss, traffic", flow: true, within: goal,
			cut: func(l *lab, a, b *labNode, _ map[string]*failBind) { l.dropAllButRelay() },
		},
		{
			name: "direct, silent loss, traffic", direct: true, flow: true, within: goal,
			cut: func(l *lab, a, b *labNode, _ map[string]*failBind) { l.dropAllButRelay() },
		},
		{
			name: "lan, EPERM on one side, traffic", flow: true, within: goal,
			cut: func(l *lab, a, b *labNode, fail map[string]*failBind) { fail[a.name].set(b.lan(), syscall.EPERM) },
		},
		{
			name: "lan, EPERM on one side, idle", probe: 400 * time.Millisecond, within: waitTimeout / 2,
			cut: func(l *lab, a, b *labNode, fail map[string]*failBind) { fail[a.name].set(b.lan(), syscall.EPERM) },
		},
		{
			name: "lan, interface gone on one side, traffic", flow: true, within: goal,
			cut: func(l *lab, a, b *labNode, fail map[string]*failBind) { fail[a.name].set(b.lan(), syscall.ENODEV) },
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			l.probe = cmp.Or(tc.probe, DefaultProbeInterval)
			fail := map[string]*failBind{}
			l.inner = func(name string, b conn.Bind) conn.Bind {
				fail[name] = &failBind{Bind: b}
				return fail[name]
			}
			l.addRelay("192.0.2.1:3478")
			var a, b *labNode
			want := KindLAN
			if tc.direct {
				n1 := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Easy)
				n2 := l.net.AddNAT(netip.MustParseAddr("203.0.113.2"), pathtest.Easy)
				a, b = l.addNode("a", "10.0.1.1", n1), l.addNode("b", "10.0.2.1", n2)
				want = KindDirect
			} else {
				nat := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Easy)
				a, b = l.addNode("a", "10.0.0.1", nat), l.addNode("b", "10.0.0.2", nat)
			}
			l.connect()
			waitPath(t, a, b, want)
			waitPath(t, b, a, want)
			waitUntil(t, "both relayed candidates answer", func() bool {
				return relayAlive(a.path(b)) && relayAlive(b.path(a))
			})
			if tc.flow {
				stopA, stopB := a.flow(t, b, 20*time.Millisecond), b.flow(t, a, 20*time.Millisecond)
				defer stopA()
				defer stopB()
			}
			if tc.flow {
				// The cut comes mid-flow.
				in := [2]uint64{a.bind.Stats().WireGuardIn, b.bind.Stats().WireGuardIn}
				waitUntil(t, "data both ways", func() bool {
					return a.bind.Stats().WireGuardIn > in[0]+5 && b.bind.Stats().WireGuardIn > in[1]+5
				})
			}
			cut := time.Now()
			tc.cut(l, a, b, fail)
			var took [2]time.Duration
			for i, d := range [][2]*labNode{{a, b}, {b, a}} {
				waitPath(t, d[0], d[1], KindRelay)
				took[i] = time.Since(cut)
			}
			t.Logf("on the relay %v (a) and %v (b) after the cut; a: %+v", took[0].Round(time.Millisecond),
				took[1].Round(time.Millisecond), a.mgr.Stats())
			for i, d := range took {
				if d > tc.within {
					t.Errorf("side %d fell back to the relay %v after the cut, want within %v", i, d.Round(time.Millisecond), tc.within)
				}
			}
			if st := a.mgr.Stats(); st.PathsDead == 0 {
				t.Errorf("a declared no path dead: %+v", st)
			}
			if tc.flow && a.bind.Stats().Replayed+b.bind.Stats().Replayed == 0 {
				t.Errorf("nothing sent into the dead path was replayed on the relay: %+v, %+v", a.bind.Stats(), b.bind.Stats())
			}
		})
	}
}

// TestIdleAndOneWayCost: an idle peer starts no suspicion; a one-way flow, which the peer never
// answers, costs about one PING per suspicion delay and keeps its path.
func TestIdleAndOneWayCost(t *testing.T) {
	const window = 2 * time.Second
	tests := []struct {
		name     string
		oneWay   bool
		maxPings uint64 // PINGs a sends in window
		minSusp  uint64
		maxSusp  uint64
	}{
		// An alive path is re-checked every 5 s: at most one PING in 2 s.
		{name: "idle", maxPings: 1},
		// suspectAfter is 250ms: 8 suspicions in 2 s, each answered by one PONG; one more probe.
		{name: "one-way flow", oneWay: true, maxPings: 10, minSusp: 2, maxSusp: 9},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			l.probe = DefaultProbeInterval
			l.addRelay("192.0.2.1:3478")
			nat := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Easy)
			a, b := l.addNode("a", "10.0.0.1", nat), l.addNode("b", "10.0.0.2", nat)
			l.connect()
			waitPath(t, a, b, KindLAN)
			// Let the start-up probes (new candidates, relays) settle: a's next probes are the
			// alive re-checks.
			waitUntil(t, "a's candidates all answered", func() bool {
				p := a.path(b)
				return relayAlive(p) && p.Candidates[0].Alive
			})
			if tc.oneWay {
				stop := a.flow(t, b, 20*time.Millisecond)
				defer stop()
			}
			s0 := a.mgr.Stats()
			time.Sleep(window) // a span of time to count probes in, not a wait for a condition
			s1 := a.mgr.Stats()
			pings, susp := s1.PingsSent-s0.PingsSent, s1.Suspicions-s0.Suspicions
			t.Logf("%v: %d PINGs, %d suspicions", window, pings, susp)
			if pings > tc.maxPings {
				t.Errorf("%d PINGs in %v, want at most %d", pings, window, tc.maxPings)
			}
			if susp < tc.minSusp || susp > tc.maxSusp {
				t.Errorf("%d suspicions in %v, want %d..%d", susp, window, tc.minSusp, tc.maxSusp)
			}
			if p := a.path(b); p.Kind != KindLAN {
				t.Errorf("path %s after the window, want lan", p.Kind)
			}
		})
	}
}

// relayAlive reports whether p has an alive relayed candidate.
func relayAlive(p PeerPath) bool {
	for _, c := range p.Candidates {
		if c.Kind == KindRelay && c.Alive {
			return true
		}
	}
	return false
}

// dropAllButRelay drops every datagram between the nodes that does not go to or come from a
// relay: silent loss of the direct and LAN paths.
func (l *lab) dropAllButRelay() {
	relays := map[netip.AddrPort]bool{}
	for _, r := range l.relays {
		relays[r.Addr()] = true
	}
	l.net.SetDrop(func(from, to netip.AddrPort) bool { return !relays[from] && !relays[to] })
}

// TestReplayRing: what the ring keeps for a replay, and what a replay hands back.
func TestReplayRing(t *testing.T) {
	small := func(i int) []byte { p := wgMsg(wgTypeTransport, 100); p[50] = byte(i); return p }
	tests := []struct {
		name string
		sent [][]byte
		age  time.Duration // how long ago they were sent
		want int           // datagrams handed back
	}{
		{"small data", [][]byte{small(1), small(2)}, 0, 2},
		{"full-size data is not kept", [][]byte{wgMsg(wgTypeTransport, 1400)}, 0, 0},
		{"keepalives are not kept", [][]byte{wgMsg(wgTypeTransport, wgSizeTransportMin)}, 0, 0},
		{"initiations are kept", [][]byte{wgMsg(wgTypeInitiation, wgSizeInitiation)}, 0, 1},
		{"too old", [][]byte{small(1)}, replayMaxAge + time.Second, 0},
		{"the last replayLen", func() (b [][]byte) {
			for i := range replayLen + 5 {
				b = append(b, small(i))
			}
			return b
		}(), 0, replayLen},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := &activity{}
			at := time.Now().Add(-tc.age).UnixNano()
			for _, p := range tc.sent {
				a.keep([][]byte{p}, at)
			}
			got := a.takeReplay(time.Now())
			if len(got) != tc.want {
				t.Fatalf("replayed %d datagrams, want %d", len(got), tc.want)
			}
			// Oldest first, the newest last.
			if tc.want > 0 && !bytes.Equal(got[len(got)-1], tc.sent[len(tc.sent)-1]) {
				t.Errorf("last replayed datagram is not the last sent")
			}
			if again := a.takeReplay(time.Now()); len(again) != 0 {
				t.Errorf("a second replay handed back %d datagrams", len(again))
			}
		})
	}
}

// TestDirectSourcesNotRewritten: only relayed datagrams are presented as coming from the chosen
// path. A direct source is left alone even when a preferred path is installed for that very
// address: behind one NAT, the address and port a peer's datagrams come from can be another
// peer's reflexive address (Linux masquerade keeps the source port per destination when it can),
// and presenting them as that other peer's path sent the first peer's replies to the second (a
// bulk transfer between the sites of TestNATLab fell from 2.1 to 0.98 Gbit/s).
func TestDirectSourcesNotRewritten(t *testing.T) {
	shared := netip.MustParseAddrPort("203.0.113.6:51820")
	other := netip.MustParseAddrPort("203.0.113.6:6914")
	b := NewBind(Config{Inner: pathtest.NewNetwork().NewBind(netip.MustParseAddr("10.0.0.1"), nil)})
	b.preferred.Store(&map[netip.AddrPort]netip.AddrPort{shared: other})
	bufs, sizes, eps := batch(1)
	sizes[0] = copy(bufs[0], wgMsg(wgTypeTransport, 100))
	eps[0] = &conn.StdNetEndpoint{AddrPort: shared}
	b.demux(bufs, sizes, eps)
	if got, _ := endpointAddr(eps[0]); got != shared || sizes[0] != 100 {
		t.Errorf("datagram from %s presented as from %s (size %d), want it left alone", shared, got, sizes[0])
	}
}

// TestRoamOntoRefusedAddress: wireguard-go follows the peer's datagrams onto an address this node
// cannot send to (a firewall refuses it) after the Manager chose the relay. The failed send makes
// the Manager apply the relay again at once, not at the next roaming check.
func TestRoamOntoRefusedAddress(t *testing.T) {
	l := newLab(t)
	l.probe = DefaultProbeInterval
	fail := map[string]*failBind{}
	l.inner = func(name string, b conn.Bind) conn.Bind {
		fail[name] = &failBind{Bind: b}
		return fail[name]
	}
	l.addRelay("192.0.2.1:3478")
	nat := l.net.AddNAT(netip.MustParseAddr("203.0.113.1"), pathtest.Easy)
	a, b := l.addNode("a", "10.0.0.1", nat), l.addNode("b", "10.0.0.2", nat)
	l.connect()
	waitPath(t, a, b, KindLAN)
	waitUntil(t, "a's relayed candidate answers", func() bool { return relayAlive(a.path(b)) })
	fail["a"].set(b.lan(), syscall.EPERM)
	stop := a.flow(t, b, 20*time.Millisecond)
	defer stop()
	p := waitPath(t, a, b, KindRelay)
	// The Manager installs the watched endpoints after it applies a choice: until then b's LAN
	// address is still watched, and a failed send there counts against it instead of as a roam.
	waitUntil(t, "b's LAN address no longer watched", func() bool {
		w := a.bind.watch.Load()
		return w != nil && w.byAddr[b.lan()] == nil
	})
	before, replayedBefore := a.setCount(b), a.bind.Stats().Replayed
	// What wireguard-go does after a datagram from b's LAN address: it sends there.
	ep, err := a.bind.ParseEndpoint(b.lan().String())
	if err != nil {
		t.Fatal(err)
	}
	if err := a.bind.Send([][]byte{wgMsg(wgTypeTransport, 100)}, ep); err == nil {
		t.Fatal("the send to the refused address succeeded")
	}
	start := time.Now()
	waitUntil(t, "the relay applied again", func() bool { return a.setCount(b) > before })
	if got := a.applied(b); got != p.Addr {
		t.Errorf("applied %s after the failed send, want the relay %s", got, p.Addr)
	}
	if got := a.bind.Stats().Replayed; got <= replayedBefore {
		t.Errorf("the datagram that failed was not sent on the relay (Replayed %d before, %d after)", replayedBefore, got)
	}
	t.Logf("relay applied again %v after the failed send", time.Since(start).Round(time.Millisecond))
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("the relay was applied again %v after the failed send, want well before the 5 s roaming check", took)
	}
}

// nopBind is an inner Bind whose sends go nowhere.
type nopBind struct{ conn.Bind }

func (nopBind) Send([][]byte, conn.Endpoint) error { return nil }

// watchedBench returns a receive wrapper fed receiveBench's batch (120 transport datagrams of
// 1440 bytes, 8 probes) and a Send of 128 full-size transport datagrams, on a Bind that watches
// the batch's endpoint and has preferred paths installed for 64 other addresses: what a Manager
// with a flowing peer costs the data path (compare BenchmarkReceive).
func watchedBench() (recv func() error, send func() error) {
	src := netip.MustParseAddrPort("192.0.2.7:41641")
	b := NewBind(Config{Inner: nopBind{conn.NewStdNetBind()}, OnPacket: func([]byte, netip.AddrPort) {}})
	b.setWatch(&watchTable{byAddr: map[netip.AddrPort]*activity{src: {}}, suspectAfter: int64(time.Hour), wake: func() {}})
	pref := map[netip.AddrPort]netip.AddrPort{}
	for i := range 64 {
		pref[netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}), 51820)] = src
	}
	b.preferred.Store(&pref)
	const n = conn.IdealBatchSize
	bufs, sizes, eps := batch(n)
	transport := wgMsg(wgTypeTransport, 1440)
	ep := &conn.StdNetEndpoint{AddrPort: src}
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
	out := make([][]byte, n)
	for i := range out {
		out[i] = wgMsg(wgTypeTransport, 1440)
	}
	return func() error { _, err := fn(bufs, sizes, eps); return err },
		func() error { return b.Send(out, ep) }
}

func TestWatchedAllocs(t *testing.T) {
	recv, send := watchedBench()
	for name, f := range map[string]func() error{"receive": recv, "send": send} {
		allocs := testing.AllocsPerRun(100, func() {
			if err := f(); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("%s with a watched endpoint allocates %v times per batch, want 0", name, allocs)
		}
	}
}

func BenchmarkWatched(b *testing.B) {
	recv, send := watchedBench()
	for _, bc := range []struct {
		name string
		f    func() error
	}{{"receive", recv}, {"send", send}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if err := bc.f(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/conn.IdealBatchSize, "ns/datagram")
		})
	}
}
