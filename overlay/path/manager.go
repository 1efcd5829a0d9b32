package path

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/curve25519"
)

// Kind is the kind of a path to a peer.
type Kind string

// Path kinds, best first.
const (
	KindLAN    Kind = "lan"    // one of the peer's LAN addresses answered
	KindDirect Kind = "direct" // a reflexive, peer-reflexive or punched address answered
	KindRelay  Kind = "relay"  // through a relay
	KindNone   Kind = "none"   // nothing answered and no relay: an unconfirmed guess, or nothing
)

// RelayRoute names a peer on one relay: its node ID there.
type RelayRoute struct {
	Relay int // index of the relay in the agent's list (0..MaxRelays-1)
	ID    uint32
}

// PeerInfo is what the directory says about a peer.
type PeerInfo struct {
	Name      string
	Key       [32]byte // WireGuard public key
	LAN       []netip.AddrPort
	Reflexive netip.AddrPort // of the peer's WireGuard socket, as a relay saw it; zero: unknown
	Relays    []RelayRoute
}

// RelaySession is this node's registration with one relay (from the relay client).
type RelaySession struct {
	Relay   int // index of the relay in the agent's list (0..MaxRelays-1)
	UDPAddr netip.AddrPort
	ID      uint32 // this node's ID on the relay
	Key     []byte // session key that MACs BIND frames; never logged
}

// Punch is a relay's signal to punch towards a peer after Delay (identical to relay.Punch).
type Punch struct {
	Peer          string
	PeerReflexive netip.AddrPort
	PeerLAN       []netip.AddrPort
	Delay         time.Duration
}

// PingResult is the outcome of one probe of Manager.Ping.
type PingResult struct {
	Seq  int
	Kind Kind
	Addr string
	RTT  time.Duration
	Err  error
}

// Candidate is one candidate path to a peer, as Paths reports it.
type Candidate struct {
	Addr     string
	Kind     Kind
	Source   string // "lan", "reflexive", "peer-reflexive", "punch", "relay"
	Alive    bool
	RTT      time.Duration
	LastPong time.Time
}

// PeerPath is a peer's current path and candidates, as Paths reports it.
type PeerPath struct {
	Name       string
	Key        [32]byte
	Kind       Kind
	Addr       string // the endpoint given to WireGuard; "" when none
	RTT        time.Duration
	LastPong   time.Time
	Candidates []Candidate
}

// ManagerStats are the Manager's counters since NewManager.
type ManagerStats struct {
	PingsSent     uint64
	PingsReceived uint64 // valid PINGs from peers
	PongsReceived uint64 // valid PONGs that matched a probe
	Malformed     uint64 // datagrams that are no path frame, or fail to parse
	BadMAC        uint64 // PING/PONG/BINDACK that failed authentication or matched nothing sent
	UnknownSender uint64 // PING/PONG from a key that is not a peer
	QueueDropped  uint64 // datagrams dropped because the manager's queue was full
	BindAcks      uint64
	PathChanges   uint64 // endpoints applied with SetEndpoint
	Punches       uint64 // punches carried out (OnPunch)
	// Suspicions counts the chosen paths probed at once because WireGuard data to them went
	// unanswered, the peer's datagrams came through a relay instead, or a send failed.
	Suspicions uint64
	// SendErrors counts probes and WireGuard datagrams that could not leave (EPERM, ENETUNREACH,
	// ...), each counted as a lost probe at once.
	SendErrors uint64
	// PathsDead counts alive paths declared dead (missesToDead lost probes in a row).
	PathsDead uint64
}

// ManagerConfig configures a Manager. Zero durations take the defaults.
type ManagerConfig struct {
	// Logger receives the Manager's logs; nil discards them.
	Logger *slog.Logger
	// Bind is the node's WireGuard Bind; required.
	Bind *Bind
	// PrivateKey and PublicKey are the node's WireGuard static keys. The PING/PONG MAC key of a
	// peer is derived from X25519(PrivateKey, peer's key) (see the package doc).
	PrivateKey, PublicKey [32]byte
	// SetEndpoint gives wireguard-go a peer's endpoint (the agent calls IpcSet); required. kind is
	// the path's kind: KindNone for a guess that has not answered yet.
	SetEndpoint func(peer [32]byte, endpoint string, kind Kind) error
	// Endpoint, when set, returns the endpoint wireguard-go uses now for peer (from IpcGet): the
	// chosen one is re-applied only if wireguard-go roamed away from it. nil: the chosen endpoint
	// is re-applied at every roaming check.
	Endpoint func(peer [32]byte) (string, error)
	// RequestPunch asks relay to coordinate a punch with peer; nil: never punch on our own
	// initiative (OnPunch still works).
	RequestPunch func(ctx context.Context, relay int, peer string) error
	// ProbeInterval is how often unconfirmed candidates are probed (default 2s). Alive paths are
	// re-checked every 2.5 intervals (5s), a probe is missed after half an interval without PONG,
	// relays get a BIND every 10 intervals (20s; an unanswered one is repeated after an eighth of
	// an interval, doubling up to one), and punches are requested at most every 5. The first
	// request for a new peer goes out a sixteenth of an interval (125ms) after it appeared, or
	// half an interval (1s) when one of its LAN addresses is on one of this node's subnets, so
	// that its LAN candidates, probed at once, answer first. A punch waits an eighth of an
	// interval (250ms) between priming the own NAT mapping and its first full-TTL PING: longer
	// than the error of the relay's timing, so that neither side's PINGs reach the other's NAT
	// before the other side has primed.
	ProbeInterval time.Duration
	// PunchTTL is the TTL of the datagrams that open the own NAT mapping before a punch (default
	// 2: one routed hop past the own router; see DESIGN.md).
	PunchTTL int
}

// Defaults of ManagerConfig.
const (
	DefaultProbeInterval = 2 * time.Second
	DefaultPunchTTL      = 2
)

const (
	missesToDead     = 3   // consecutive missed probes after which an alive path is dead
	maxPeerReflexive = 4   // peer-reflexive candidates kept per peer
	queueLen         = 512 // datagrams waiting for the manager goroutine
	maxFrameLen      = 128 // larger datagrams are no path frame the manager handles
	primeCount       = 3   // TTL-limited datagrams sent to open the own mapping
	punchEvery       = 75 * time.Millisecond
)

// timing holds the intervals derived from ProbeInterval.
type timing struct {
	probe, alive, pongTimeout, tick, bind, bindRetry, punchBackoff, punchFor, ping, primeLead time.Duration
	// retrigger is how often at most a PING from a candidate that has not answered triggers a
	// probe of it while another probe waits for its PONG.
	retrigger time.Duration
	// punchFirst and punchFirstLAN are how long after a peer appeared its first punch is
	// requested: without and with a LAN address on one of this node's subnets.
	punchFirst, punchFirstLAN time.Duration
	// suspectAfter is how long WireGuard data to a chosen path may go unanswered before the path
	// is probed at once; suspectTimeout the shortest wait for the PONG of such a probe, and
	// suspectGap the shortest time between two of them (a probe that fails to leave is missed at
	// once).
	suspectAfter, suspectTimeout, suspectGap time.Duration
	// holdMax is how long a new peer's endpoint stays its hold endpoint while no path answers;
	// crossWaitMin and crossWaitMax bound how long the node with the higher key waits for the
	// peer's initiation before it releases its own (hold.go).
	holdMax, crossWaitMin, crossWaitMax time.Duration
}

func newTiming(probe time.Duration) timing {
	return timing{
		probe:          probe,
		alive:          probe * 5 / 2,
		pongTimeout:    probe / 2,
		tick:           probe / 4,
		bind:           probe * 10,
		bindRetry:      probe / 8,
		punchBackoff:   probe * 5,
		punchFor:       max(probe, 20*punchEvery),
		ping:           probe / 2,
		primeLead:      probe / 8,
		retrigger:      probe / 40,
		punchFirst:     probe / 16,
		punchFirstLAN:  probe / 2,
		suspectAfter:   probe / 8,
		suspectTimeout: probe / 20,
		suspectGap:     probe / 40,
		holdMax:        probe,
		crossWaitMin:   probe / 20,
		crossWaitMax:   probe / 4,
	}
}

// Manager keeps the candidate paths of every peer, probes them from the WireGuard socket, punches
// holes, and tells wireguard-go which endpoint to use. Its methods are safe for concurrent use.
//
// States: new (NewManager) → started (Start) → closed (Close). SetPeers and SetRelays work in
// every state; probing, punching and Ping need started.
type Manager struct {
	log   *slog.Logger
	cfg   ManagerConfig
	t     timing
	bind  *Bind
	prime func(srcPort uint16, dst netip.AddrPort, ttl int, payload []byte) error

	queue  chan rxPacket
	wake   chan struct{}
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	stats struct {
		pingsSent, pingsIn, pongsIn, malformed, badMAC, unknown, queueDropped, bindAcks,
		pathChanges, punches, suspicions, sendErrors, pathsDead atomic.Uint64
	}
	setLog logLimiter

	mu        sync.Mutex // guards all following fields
	onLink    onLinkCache
	started   bool
	closed    bool
	peers     map[[32]byte]*peerState
	byName    map[string]*peerState
	relays    map[int]*relayState
	txs       map[uint64]*tx
	nextTx    uint64
	reflexive netip.AddrPort
	watched   map[netip.AddrPort]*activity // the Bind's watch table (detect.go); immutable
	nextHold  uint32                       // the last hold ID given out (hold.go)
}

// rxPacket is a datagram copied off a receive goroutine (fixed size: no allocation).
type rxPacket struct {
	buf  [maxFrameLen]byte
	n    int
	from netip.AddrPort
}

// NewManager returns a Manager that starts nothing; it installs itself as cfg.Bind's handler of
// datagrams that are not WireGuard.
func NewManager(cfg ManagerConfig) *Manager {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.ProbeInterval <= 0 {
		cfg.ProbeInterval = DefaultProbeInterval
	}
	if cfg.PunchTTL <= 0 {
		cfg.PunchTTL = DefaultPunchTTL
	}
	ctx, cancel := context.WithCancel(context.Background())
	var seed [8]byte
	_, _ = rand.Read(seed[:]) // crypto/rand.Read never fails
	m := &Manager{
		log:    log.With("component", "path"),
		cfg:    cfg,
		t:      newTiming(cfg.ProbeInterval),
		bind:   cfg.Bind,
		prime:  primeRaw,
		queue:  make(chan rxPacket, queueLen),
		wake:   make(chan struct{}, 1),
		ctx:    ctx,
		cancel: cancel,
		peers:  make(map[[32]byte]*peerState),
		byName: make(map[string]*peerState),
		relays: make(map[int]*relayState),
		txs:    make(map[uint64]*tx),
		nextTx: binary.BigEndian.Uint64(seed[:]),
	}
	if m.bind != nil {
		m.bind.setHandler(m.onPacket)
	}
	return m
}

// Start starts the manager goroutine.
func (m *Manager) Start() error {
	switch {
	case m.bind == nil:
		return errors.New("path: manager: no Bind")
	case m.cfg.SetEndpoint == nil:
		return errors.New("path: manager: no SetEndpoint")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return fmt.Errorf("path: manager start: %w", errClosed)
	}
	if m.started {
		return errors.New("path: manager already started")
	}
	m.started = true
	m.wg.Add(1)
	go m.run()
	return nil
}

var errClosed = errors.New("manager closed")

// Close stops probing and punching, waits for every goroutine the Manager started, and detaches
// it from the Bind (whose other datagrams are then dropped and counted). Paths already given to
// wireguard-go stay. Close may be called any number of times.
func (m *Manager) Close() error {
	m.mu.Lock()
	already := m.closed
	m.closed = true
	m.mu.Unlock()
	if already {
		return nil
	}
	m.cancel()
	m.wg.Wait()
	if m.bind != nil {
		m.bind.setHandler(nil)
	}
	return nil
}

// Stats returns the Manager's counters.
func (m *Manager) Stats() ManagerStats {
	s := &m.stats
	return ManagerStats{
		PingsSent: s.pingsSent.Load(), PingsReceived: s.pingsIn.Load(), PongsReceived: s.pongsIn.Load(),
		Malformed: s.malformed.Load(), BadMAC: s.badMAC.Load(), UnknownSender: s.unknown.Load(),
		QueueDropped: s.queueDropped.Load(), BindAcks: s.bindAcks.Load(),
		PathChanges: s.pathChanges.Load(), Punches: s.punches.Load(),
		Suspicions: s.suspicions.Load(), SendErrors: s.sendErrors.Load(), PathsDead: s.pathsDead.Load(),
	}
}

// SetPeers replaces the set of peers: new ones are added, known ones updated (candidate state
// for addresses that remain is kept), missing ones removed.
func (m *Manager) SetPeers(peers []PeerInfo) {
	m.mu.Lock()
	seen := make(map[[32]byte]bool, len(peers))
	for _, info := range peers {
		if info.Key == m.cfg.PublicKey || info.Key == ([32]byte{}) || seen[info.Key] {
			continue
		}
		seen[info.Key] = true
		p := m.peers[info.Key]
		if p == nil {
			key, err := macKey(m.cfg.PrivateKey, info.Key)
			if err != nil {
				m.log.Warn("peer skipped", "peer", info.Name, "err", err)
				continue
			}
			p = &peerState{macKey: key, added: time.Now(), hold: m.nextHoldLocked()}
			m.peers[info.Key] = p
		}
		if p.info.Name != info.Name {
			delete(m.byName, p.info.Name)
		}
		p.info = clonePeerInfo(info)
		m.byName[info.Name] = p
		m.rebuildLocked(p)
	}
	for k, p := range m.peers {
		if !seen[k] {
			delete(m.peers, k)
			if m.byName[p.info.Name] == p {
				delete(m.byName, p.info.Name)
			}
		}
	}
	m.mu.Unlock()
	m.poke()
}

// SetRelays replaces the node's relay sessions. The Bind wraps datagrams for the relays'
// synthetic endpoints from now on; the manager BINDs the WireGuard socket to each relay (at
// once, then every 10 probe intervals as keepalive) and learns the reflexive address from
// BINDACK.
func (m *Manager) SetRelays(sessions []RelaySession) {
	m.mu.Lock()
	next := make(map[int]*relayState, len(sessions))
	addrs := make(map[int]netip.AddrPort, len(sessions))
	for _, s := range sessions {
		if s.Relay < 0 || s.Relay >= MaxRelays || !s.UDPAddr.IsValid() || next[s.Relay] != nil {
			m.log.Warn("relay session skipped", "relay", s.Relay, "udp", s.UDPAddr)
			continue
		}
		s.UDPAddr = netip.AddrPortFrom(s.UDPAddr.Addr().Unmap(), s.UDPAddr.Port())
		old := m.relays[s.Relay]
		if old != nil && old.sess.UDPAddr == s.UDPAddr && old.sess.ID == s.ID && hmac.Equal(old.sess.Key, s.Key) {
			next[s.Relay] = old
		} else {
			s.Key = slices.Clone(s.Key)
			next[s.Relay] = &relayState{sess: s}
		}
		addrs[s.Relay] = s.UDPAddr
	}
	if err := m.bind.setRelays(addrs); err != nil {
		m.log.Warn("relay sessions", "err", err)
	}
	gone := false
	for r, old := range m.relays {
		gone = gone || next[r] != old
	}
	m.relays = next
	for _, p := range m.peers {
		m.rebuildLocked(p)
		p.reapply = p.reapply || gone
	}
	m.mu.Unlock()
	m.poke()
}

// Reflexive is the address of the WireGuard socket as the first relay to answer a BIND saw it
// (the lowest relay index that answered); zero while unknown.
func (m *Manager) Reflexive() netip.AddrPort {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.reflexive
}

// Paths returns every peer's path and candidates, by name.
func (m *Manager) Paths() []PeerPath {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]PeerPath, 0, len(m.peers))
	for _, p := range m.peers {
		pp := PeerPath{Name: p.info.Name, Key: p.info.Key, Kind: KindNone}
		if c := p.chosen; c != nil {
			pp.Kind, pp.Addr, pp.RTT, pp.LastPong = m.kindOfChoiceLocked(c), c.addr.String(), c.rtt, c.lastPong
		}
		for _, c := range p.cands {
			pp.Candidates = append(pp.Candidates, Candidate{
				Addr: c.addr.String(), Kind: c.kind(), Source: c.src.String(),
				Alive: c.alive, RTT: c.rtt, LastPong: c.lastPong,
			})
		}
		out = append(out, pp)
	}
	slices.SortFunc(out, func(a, b PeerPath) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// poke wakes the manager goroutine.
func (m *Manager) poke() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// onPacket is the Bind's handler: it runs on wireguard-go's receive goroutines, so it only copies
// the datagram into the bounded queue (dropping and counting when full).
func (m *Manager) onPacket(pkt []byte, from netip.AddrPort) {
	if len(pkt) > maxFrameLen {
		m.stats.malformed.Add(1)
		return
	}
	var rx rxPacket
	rx.n = copy(rx.buf[:], pkt)
	rx.from = from
	select {
	case m.queue <- rx:
	default:
		m.stats.queueDropped.Add(1)
	}
}

// run is the manager goroutine: datagrams, timers, and changes. step runs every tick, and sooner
// when it asks to (a BIND to repeat, a punch request that falls due between ticks).
func (m *Manager) run() {
	defer m.wg.Done()
	ticker := time.NewTicker(m.t.tick)
	defer ticker.Stop()
	soon := time.NewTimer(time.Hour)
	defer soon.Stop()
	arm := func(next time.Time) {
		soon.Stop()
		if !next.IsZero() {
			soon.Reset(max(time.Until(next), time.Millisecond))
		}
	}
	arm(m.step())
	for {
		select {
		case <-m.ctx.Done():
			return
		case rx := <-m.queue:
			m.handle(&rx)
		case <-m.wake:
			arm(m.step())
		case <-ticker.C:
			arm(m.step())
		case <-soon.C:
			arm(m.step())
		}
	}
}

// macKey derives the PING/PONG MAC key shared with a peer (see the package doc).
func macKey(priv, peer [32]byte) ([]byte, error) {
	shared, err := curve25519.X25519(priv[:], peer[:])
	if err != nil {
		return nil, fmt.Errorf("derive probe key: %w", err)
	}
	h := hmac.New(sha256.New, shared)
	h.Write([]byte("edgewire path probe v1"))
	return h.Sum(nil), nil
}

func clonePeerInfo(p PeerInfo) PeerInfo {
	p.LAN = slices.Clone(p.LAN)
	p.Relays = slices.Clone(p.Relays)
	return p
}
