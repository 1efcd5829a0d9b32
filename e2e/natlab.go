package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The NAT lab: an "internet" that is one routed hop, with public hosts and NAT routers hanging off
// it on point-to-point links, and private sites (a LAN bridge behind each NAT router):
//
//	               ┌── relay1 203.0.113.2        ┌── natA (easy) 203.0.113.x ── LAN 192.168.1.0/24
//	inet (router) ─┼── relay2 203.0.113.6   ─────┼── natB (easy) ...          ── LAN 192.168.2.0/24
//	               └── cloud  203.0.113.10       └── natC (hard) ...  natD (hard) ...
//
// inet routes only public addresses: a private address of another site is unreachable, as on the
// internet, and there is no hairpin on the NAT routers. Packets between two sites cross exactly three
// routers (NAT, inet, NAT), so a packet sent with TTL 2 opens the sender's own NAT mapping and dies at
// inet (the priming DESIGN.md describes).

// NATKind is how a site's router translates.
type NATKind int

const (
	// NATEasy is plain MASQUERADE: Linux keeps the source port when it is free (endpoint-independent
	// mapping in practice).
	NATEasy NATKind = iota
	// NATHard is MASQUERADE --random-fully: every mapping gets a random source port.
	NATHard
)

func (k NATKind) String() string {
	if k == NATHard {
		return "hard"
	}
	return "easy"
}

// Internet is the routed public segment: the router namespace "inet" and the /30 links it hands
// out, one per public host or NAT router, from 203.0.113.0/24 (inet .4k+1, the host .4k+2).
type Internet struct {
	lab *Lab
	// Router is the "inet" namespace.
	Router *Node

	mu    sync.Mutex // guards links
	links int
}

// NewInternet creates the inet router of lab.
func NewInternet(t testing.TB, lab *Lab) *Internet {
	t.Helper()
	return &Internet{lab: lab, Router: lab.Router(t, "inet")}
}

// attach links n to inet with the next /30 and makes inet n's default gateway. It returns n's
// public address and its interface towards inet.
func (in *Internet) attach(t testing.TB, n *Node) (netip.Addr, string) {
	t.Helper()
	in.mu.Lock()
	k := in.links
	in.links++
	in.mu.Unlock()
	if k >= 63 {
		t.Fatalf("internet: no /30 left in 203.0.113.0/24 for %s", n.Role)
	}
	gw := netip.AddrFrom4([4]byte{203, 0, 113, byte(4*k + 1)})
	addr := netip.AddrFrom4([4]byte{203, 0, 113, byte(4*k + 2)})
	_, nIf := in.lab.Link(t, in.Router, netip.PrefixFrom(gw, 30), n, netip.PrefixFrom(addr, 30))
	n.SetDefaultRoute(t, gw)
	return addr, nIf
}

// PublicHost creates a host called role with a public address on the internet and returns it and
// its address.
func (in *Internet) PublicHost(t testing.TB, role string) (*Node, netip.Addr) {
	t.Helper()
	n := in.lab.Node(t, role)
	addr, _ := in.attach(t, n)
	return n, addr
}

// Site is a private network behind a NAT router: a LAN bridge with the router at .1 and hosts from
// .11 on.
type Site struct {
	Name string
	Kind NATKind
	// Router is the NAT router; Public its address on the internet, OutIf its interface there.
	Router *Node
	Public netip.Addr
	OutIf  string
	LAN    *LAN
	// Gateway is the router's address on the LAN.
	Gateway netip.Addr

	mu    sync.Mutex // guards hosts
	hosts int
}

// NATSite creates the site name: a NAT router "nat<name>" of kind on the internet and a LAN
// "lan<name>" with prefix (a /24 or shorter) behind it.
func (in *Internet) NATSite(t testing.TB, name string, kind NATKind, prefix netip.Prefix) *Site {
	t.Helper()
	s := &Site{Name: name, Kind: kind, Router: in.lab.Router(t, "nat"+name)}
	s.Public, s.OutIf = in.attach(t, s.Router)
	s.LAN = in.lab.LAN(t, "lan"+name, prefix)
	s.Gateway = prefix.Masked().Addr().Next()
	s.LAN.Attach(t, s.Router, s.Gateway)
	s.Router.Masquerade(t, s.OutIf, kind == NATHard)
	return s
}

// Host creates a host called role on the site's LAN (the next address from .11), with the NAT
// router as its default gateway, and returns it and its address.
func (s *Site) Host(t testing.TB, role string) (*Node, netip.Addr) {
	t.Helper()
	s.mu.Lock()
	i := s.hosts
	s.hosts++
	s.mu.Unlock()
	addr := s.LAN.Prefix.Addr()
	for range 11 + i {
		addr = addr.Next()
	}
	n := s.LAN.Switch.lab.Node(t, role)
	s.LAN.Attach(t, n, addr)
	n.SetDefaultRoute(t, s.Gateway)
	return n, addr
}

// MasqueradedPackets returns the packet count of the router's MASQUERADE rule (from
// `iptables -t nat -L POSTROUTING -v -n -x`): how many connections it has translated.
func (s *Site) MasqueradedPackets(t testing.TB) int {
	t.Helper()
	out := s.Router.MustExec(t, "iptables", "-t", "nat", "-L", "POSTROUTING", "-v", "-n", "-x")
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) > 2 && f[2] == "MASQUERADE" {
			var n int
			if _, err := fmt.Sscan(f[0], &n); err == nil {
				return n
			}
		}
	}
	t.Fatalf("nat%s: no MASQUERADE rule in\n%s", s.Name, out)
	return 0
}

// AddPod creates a "pod" namespace called role behind host n, on prefix (a /24: n is .1, the pod
// .10) that only n routes to. It returns the pod and its address.
func AddPod(t testing.TB, n *Node, role string, prefix netip.Prefix) (*Node, netip.Addr) {
	t.Helper()
	pod := n.lab.Node(t, role)
	gw := prefix.Masked().Addr().Next()
	addr := prefix.Masked().Addr()
	for range 10 {
		addr = addr.Next()
	}
	n.lab.Link(t, n, netip.PrefixFrom(gw, prefix.Bits()), pod, netip.PrefixFrom(addr, prefix.Bits()))
	pod.SetDefaultRoute(t, gw)
	return pod, addr
}

// BuildMeshRelay builds cmd/mesh-relay into dir (BuildBinaries does not build it) and returns the
// binary's path.
func BuildMeshRelay(t testing.TB, dir string) string {
	t.Helper()
	out := filepath.Join(dir, "mesh-relay")
	start := time.Now()
	if err := goBuild(out, "github.com/edgewire/edgewire/cmd/mesh-relay"); err != nil {
		t.Fatalf("build mesh-relay: %v", err)
	}
	t.Logf("built mesh-relay in %v", time.Since(start).Round(time.Millisecond))
	return out
}

// RelayPort is the port mesh-relay listens on in the lab, TCP (libp2p) and UDP (path frames).
const RelayPort = 4001

// Relay is a mesh-relay on a public host. Start runs it; it can be killed and started again with
// the same state directory (and so the same peer ID).
type Relay struct {
	Name   string
	Node   *Node
	Public netip.Addr
	// Bin, TokenFile and StateDir are the binary, --join-token-file and --state-dir.
	Bin, TokenFile, StateDir string
	// Proc is the running (or last) process; PeerID its libp2p peer ID, read from its log.
	Proc   *Proc
	PeerID string
	// Extra flags, appended as they are.
	Extra []string
}

// NewRelay describes a relay on public host n; it starts nothing.
func NewRelay(n *Node, public netip.Addr, bin, tokenFile string) *Relay {
	return &Relay{Name: n.Role, Node: n, Public: public, Bin: bin, TokenFile: tokenFile,
		StateDir: filepath.Join(n.lab.Dir, n.Role+"-state")}
}

// HostPort is the relay's address in `meshctl up --relay host:port` form.
func (r *Relay) HostPort() string {
	return netip.AddrPortFrom(r.Public, RelayPort).String()
}

// Multiaddr is the relay's address in multiaddr form, with its peer ID (known once started).
func (r *Relay) Multiaddr() string {
	return fmt.Sprintf("/ip4/%s/tcp/%d/p2p/%s", r.Public, RelayPort, r.PeerID)
}

// MetricsAddr is where the relay serves metrics, inside its namespace.
func (r *Relay) MetricsAddr() string { return "127.0.0.1:9464" }

var peerIDRe = regexp.MustCompile(`(?:peer ID: |/p2p/)(12D3Koo[1-9A-HJ-NP-Za-km-z]+|Qm[1-9A-HJ-NP-Za-km-z]{44})`)

// Start runs the relay and waits up to timeout until it listens on TCP and UDP RelayPort and has
// logged its peer ID. A restart must keep the peer ID (the state directory holds the key).
func (r *Relay) Start(t testing.TB, timeout time.Duration) {
	t.Helper()
	if r.Proc != nil && !r.Proc.Exited() {
		t.Fatalf("%s: already running", r.Name)
	}
	var offset int
	if r.Proc != nil {
		offset = len(r.Proc.Log())
	}
	args := []string{r.Bin,
		"--listen", fmt.Sprint(RelayPort),
		"--join-token-file", r.TokenFile,
		"--state-dir", r.StateDir,
		"--advertise-addr", r.HostPort(),
		"--metrics-addr", r.MetricsAddr()}
	r.Proc = r.Node.Start(t, "relay", append(args, r.Extra...)...)
	start := time.Now()
	Eventually(t, timeout, 50*time.Millisecond, r.Name+" listens and logs its peer ID", func() error {
		if r.Proc.Exited() {
			return fmt.Errorf("exited: %v\n%s", r.Proc.Wait(0), r.Proc.Tail(20))
		}
		log := r.Proc.Log()
		if offset > len(log) {
			offset = 0
		}
		m := peerIDRe.FindStringSubmatch(log[offset:])
		if m == nil {
			return errors.New(`no "peer ID: <ID>" or /p2p/<ID> in its log yet`)
		}
		out, err := r.Node.Exec("ss", "-Hlntu", "sport", "=", fmt.Sprint(RelayPort))
		if err != nil {
			return err
		}
		if !strings.Contains(out, "tcp") || !strings.Contains(out, "udp") {
			return fmt.Errorf("not listening on TCP and UDP %d: %q", RelayPort, out)
		}
		if r.PeerID != "" && r.PeerID != m[1] {
			return fmt.Errorf("restarted with peer ID %s, was %s: the state directory did not keep its key", m[1], r.PeerID)
		}
		r.PeerID = m[1]
		return nil
	})
	t.Logf("%s ready in %v: %s", r.Name, time.Since(start).Round(time.Millisecond), r.Multiaddr())
}

// Kill ends the relay with SIGKILL: a crash, no goodbye to anyone.
func (r *Relay) Kill(t testing.TB) {
	t.Helper()
	if err := r.Proc.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("kill %s: %v", r.Name, err)
	}
	if err := r.Proc.Wait(5 * time.Second); !r.Proc.Exited() {
		t.Fatalf("%s survived SIGKILL: %v", r.Name, err)
	}
}

// Metrics returns the relay's metrics lines whose name contains substr (without comments).
func (r *Relay) Metrics(substr string) (string, error) {
	out, err := r.Node.Exec("curl", "-sS", "-m", "3", "http://"+r.MetricsAddr()+"/metrics")
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for line := range strings.Lines(out) {
		if !strings.HasPrefix(line, "#") && strings.Contains(line, substr) {
			b.WriteString(line)
		}
	}
	return b.String(), nil
}

// PeerPath is how an agent reaches one peer, from `meshctl status --json` (peers[].path).
type PeerPath struct {
	Peer string
	// Kind is lan, direct, relay or none ("" when the agent does not say).
	Kind string
	Addr string
	// Handshake is the peer's latest WireGuard handshake.
	Handshake time.Time
}

// statusPaths is the part of `meshctl status --json` with the peers' paths. The path is accepted
// both as a string with a separate pathAddr and as an object {kind, addr}.
type statusPaths struct {
	Node  string `json:"node"`
	Peers []struct {
		Node            string          `json:"node"`
		PublicKey       string          `json:"publicKey"`
		Path            json.RawMessage `json:"path"`
		PathAddr        string          `json:"pathAddr"`
		LatestHandshake time.Time       `json:"latestHandshake"`
	} `json:"peers"`
}

// ParseStatusPaths returns the peers' paths in `meshctl status --json` output, keyed by node name
// (or public key for a peer without a name).
func ParseStatusPaths(b []byte) (map[string]PeerPath, error) {
	var st statusPaths
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("status JSON: %w", err)
	}
	m := make(map[string]PeerPath, len(st.Peers))
	for _, p := range st.Peers {
		pp := PeerPath{Peer: p.Node, Addr: p.PathAddr, Handshake: p.LatestHandshake}
		if pp.Peer == "" {
			pp.Peer = p.PublicKey
		}
		switch raw := bytes.TrimSpace(p.Path); {
		case len(raw) == 0 || string(raw) == "null":
		case raw[0] == '"':
			if err := json.Unmarshal(raw, &pp.Kind); err != nil {
				return nil, fmt.Errorf("status JSON: peer %s: path: %w", pp.Peer, err)
			}
		default:
			var obj struct {
				Kind string `json:"kind"`
				Addr string `json:"addr"`
			}
			if err := json.Unmarshal(raw, &obj); err != nil {
				return nil, fmt.Errorf("status JSON: peer %s: path: %w", pp.Peer, err)
			}
			pp.Kind = obj.Kind
			if obj.Addr != "" {
				pp.Addr = obj.Addr
			}
		}
		m[pp.Peer] = pp
	}
	return m, nil
}

// Paths returns the agent's peers' paths from `meshctl status --json`.
func (a *Agent) Paths() (map[string]PeerPath, error) {
	out, err := a.Ctl("status", "--json")
	if err != nil {
		return nil, fmt.Errorf("%v: %w\n%s", a, err, out)
	}
	return ParseStatusPaths([]byte(out))
}

// PingProbe is one line of `meshctl ping --json`.
type PingProbe struct {
	Seq   int     `json:"seq"`
	Node  string  `json:"node"`
	Path  string  `json:"path"`
	Addr  string  `json:"addr"`
	RTTMs float64 `json:"rttMs"`
	Error string  `json:"error"`
}

// ParsePing decodes `meshctl ping --json` output: one JSON object a probe (a JSON array of them is
// accepted too).
func ParsePing(b []byte) ([]PingProbe, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	var probes []PingProbe
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			if errors.Is(err, io.EOF) {
				return probes, nil
			}
			return probes, fmt.Errorf("ping JSON: %w", err)
		}
		raw = bytes.TrimSpace(raw)
		if len(raw) > 0 && raw[0] == '[' {
			var ps []PingProbe
			if err := json.Unmarshal(raw, &ps); err != nil {
				return probes, fmt.Errorf("ping JSON: %w", err)
			}
			probes = append(probes, ps...)
			continue
		}
		var p PingProbe
		if err := json.Unmarshal(raw, &p); err != nil {
			return probes, fmt.Errorf("ping JSON: %w", err)
		}
		probes = append(probes, p)
	}
}

// Ping runs `meshctl ping node --json` with extra flags (e.g. --count 3, --until-direct) and
// returns its probes; err is the command's failure, with its output.
func (a *Agent) Ping(timeout time.Duration, node string, extra ...string) ([]PingProbe, error) {
	args := append([]string{a.Meshctl, "ping", node, "--json", "--control-socket", a.ControlSocket}, extra...)
	out, err := a.Node.ExecTimeout(timeout, args...)
	probes, perr := ParsePing([]byte(out))
	if err != nil {
		return probes, fmt.Errorf("%w\n%s", err, tailLines(out, 10))
	}
	if perr != nil {
		return probes, fmt.Errorf("%w\n%s", perr, tailLines(out, 10))
	}
	return probes, nil
}

// PathEvent is a change of one agent's path to one peer, as a PathWatcher saw it.
type PathEvent struct {
	At         time.Time
	Agent      string
	Peer, Kind string
	Addr       string
}

// PathWatcher polls the control sockets of agents (directly, with HTTP over the Unix socket, which
// costs far less than a meshctl process per poll) and records every change of path per peer, so that
// scenarios can tell when a path first became direct without polling for it themselves.
type PathWatcher struct {
	cancel context.CancelFunc
	done   chan struct{}

	mu     sync.Mutex // guards all following fields
	last   map[string]PeerPath
	events []PathEvent
	errs   int
	lastEr error
}

// WatchPaths starts polling every interval the control sockets (agent name → socket path) and
// stops at t's cleanup.
func WatchPaths(t testing.TB, interval time.Duration, sockets map[string]string) *PathWatcher {
	ctx, cancel := context.WithCancel(context.Background())
	w := &PathWatcher{cancel: cancel, done: make(chan struct{}), last: map[string]PeerPath{}}
	clients := make(map[string]*http.Client, len(sockets))
	for name, sock := range sockets {
		clients[name] = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			},
		}}
	}
	go func() {
		defer close(w.done)
		ticker := time.NewTicker(interval)
		defer ticker.Stop()
		for {
			for name, c := range clients {
				w.poll(ctx, name, c)
			}
			select {
			case <-ctx.Done():
				for _, c := range clients {
					c.CloseIdleConnections()
				}
				return
			case <-ticker.C:
			}
		}
	}()
	t.Cleanup(w.Stop)
	return w
}

func (w *PathWatcher) poll(ctx context.Context, name string, c *http.Client) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent/v1/status", nil)
	if err != nil {
		return
	}
	now := time.Now()
	resp, err := c.Do(req)
	var paths map[string]PeerPath
	if err == nil {
		var b bytes.Buffer
		_, err = b.ReadFrom(resp.Body)
		resp.Body.Close()
		if err == nil {
			paths, err = ParseStatusPaths(b.Bytes())
		}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if err != nil {
		if ctx.Err() == nil {
			w.errs++
			w.lastEr = fmt.Errorf("%s: %w", name, err)
		}
		return
	}
	for peer, p := range paths {
		key := name + "→" + peer
		if old, ok := w.last[key]; ok && old.Kind == p.Kind && old.Addr == p.Addr {
			continue
		}
		w.last[key] = p
		w.events = append(w.events, PathEvent{At: now, Agent: name, Peer: peer, Kind: p.Kind, Addr: p.Addr})
	}
}

// Stop stops polling and waits for the poller; it is idempotent.
func (w *PathWatcher) Stop() {
	w.cancel()
	<-w.done
}

// First returns when agent first saw kind as its path to peer, and whether it has.
func (w *PathWatcher) First(agent, peer, kind string) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, e := range w.events {
		if e.Agent == agent && e.Peer == peer && e.Kind == kind {
			return e.At, true
		}
	}
	return time.Time{}, false
}

// FirstSince returns when agent first saw kind as its path to peer at or after since, and whether
// it has.
func (w *PathWatcher) FirstSince(agent, peer, kind string, since time.Time) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, e := range w.events {
		if e.Agent == agent && e.Peer == peer && e.Kind == kind && !e.At.Before(since) {
			return e.At, true
		}
	}
	return time.Time{}, false
}

// History describes every path change of agent to peer, relative to since.
func (w *PathWatcher) History(agent, peer string, since time.Time) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var parts []string
	for _, e := range w.events {
		if e.Agent == agent && e.Peer == peer {
			parts = append(parts, fmt.Sprintf("%+v %s %s", e.At.Sub(since).Round(10*time.Millisecond), orNone(e.Kind), e.Addr))
		}
	}
	if len(parts) == 0 {
		return "(no path seen)"
	}
	return strings.Join(parts, "; ")
}

// Errors returns how many polls failed and the last failure.
func (w *PathWatcher) Errors() (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.errs, w.lastEr
}

// Result is one request of a RequestLoop.
type Result struct {
	Start, End time.Time
	OK         bool
	// Detail says why a failed request failed.
	Detail string
}

// RequestLoop runs one request after another until stopped and keeps every result: what a
// scenario runs across a failure to see whether the traffic above the mesh noticed.
type RequestLoop struct {
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex // guards results
	results []Result
}

// StartLoop calls request in a loop, in a goroutine of its own, until Stop.
func StartLoop(request func() Result) *RequestLoop {
	ctx, cancel := context.WithCancel(context.Background())
	lp := &RequestLoop{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(lp.done)
		for ctx.Err() == nil {
			r := request()
			lp.mu.Lock()
			lp.results = append(lp.results, r)
			lp.mu.Unlock()
		}
	}()
	return lp
}

// StartPacedLoop starts request every interval, each in a goroutine of its own, until Stop: a
// client that keeps its pace whatever the answers take. At most maxInFlight requests run at once;
// a start that finds them all busy is recorded as a failed Result.
func StartPacedLoop(interval time.Duration, maxInFlight int, request func() Result) *RequestLoop {
	ctx, cancel := context.WithCancel(context.Background())
	lp := &RequestLoop{cancel: cancel, done: make(chan struct{})}
	record := func(r Result) {
		lp.mu.Lock()
		lp.results = append(lp.results, r)
		lp.mu.Unlock()
	}
	go func() {
		defer close(lp.done)
		var wg sync.WaitGroup
		defer wg.Wait()
		slots := make(chan struct{}, maxInFlight)
		ticker := time.NewTicker(interval)
		defer ticker.Stop()
		for {
			select {
			case slots <- struct{}{}:
				wg.Go(func() {
					defer func() { <-slots }()
					record(request())
				})
			default:
				now := time.Now()
				record(Result{Start: now, End: now, Detail: fmt.Sprintf("not started: %d requests in flight", maxInFlight)})
			}
			select {
			case <-ctx.Done():
				return
			case <-ticker.C:
			}
		}
	}()
	return lp
}

// Stop ends the loop, waits for its goroutines (idempotent) and returns every result.
func (lp *RequestLoop) Stop() []Result {
	lp.cancel()
	<-lp.done
	return lp.Results()
}

// Results returns the results so far, in the order they started.
func (lp *RequestLoop) Results() []Result {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	rs := slices.Clone(lp.results)
	slices.SortStableFunc(rs, func(a, b Result) int { return a.Start.Compare(b.Start) })
	return rs
}

// WaitSuccess waits until a request started at or after since has succeeded (timeout after since),
// and returns how long after since it ended.
func (lp *RequestLoop) WaitSuccess(t testing.TB, what string, since time.Time, timeout time.Duration) time.Duration {
	t.Helper()
	var took time.Duration
	Eventually(t, timeout-time.Since(since), 50*time.Millisecond, what, func() error {
		rs := lp.Results()
		for _, r := range rs {
			if r.OK && !r.Start.Before(since) {
				took = r.End.Sub(since)
				return nil
			}
		}
		if len(rs) > 0 && !rs[len(rs)-1].OK {
			return errors.New(rs[len(rs)-1].Detail)
		}
		return errors.New("no request yet")
	})
	return took
}

// Summarize counts the results started in [from, to), describes the failed ones, and returns the
// longest time between the ends of two successive successes among them.
func Summarize(rs []Result, from, to time.Time) (n int, failed []string, gap time.Duration) {
	var last time.Time
	for _, r := range rs {
		if r.Start.Before(from) || !r.Start.Before(to) {
			continue
		}
		n++
		if !r.OK {
			failed = append(failed, fmt.Sprintf("%+v (after %v): %s", r.Start.Sub(from).Round(time.Millisecond),
				r.End.Sub(r.Start).Round(time.Millisecond), r.Detail))
			continue
		}
		if !last.IsZero() {
			gap = max(gap, r.End.Sub(last))
		}
		last = r.End
	}
	return n, failed, gap
}

// tailLines returns the last n lines of s.
func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func orNone(s string) string {
	if s == "" {
		return `""`
	}
	return s
}
