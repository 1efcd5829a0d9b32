package relay

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/sec"
	ma "github.com/multiformats/go-multiaddr"
)

// ClientConfig configures a Client.
type ClientConfig struct {
	// Logger receives the client's logs; nil discards them.
	Logger *slog.Logger
	// Relays are the relays to register with, each "host:port" or a multiaddr ending in
	// /p2p/<peer ID>. At least one.
	Relays []string
	// JoinToken is the cluster's join token. Required.
	JoinToken string
	// Key is the node's libp2p identity (Ed25519). Required.
	Key ed25519.PrivateKey
	// Self is what the node registers.
	Self Registration
	// OnDirectory is called with the full directory on every push from relay number relay (an
	// index in Relays). OnPunch is called when a relay asks the node to punch. OnSession is called
	// when a registration comes up (up = true) and when it goes down. The callbacks of one relay are
	// called one at a time from that relay's goroutine; they must not block for long and must not
	// call Close. Nil callbacks are skipped.
	OnDirectory func(relay int, nodes []DirEntry)
	OnPunch     func(relay int, p Punch)
	OnSession   func(s Session, up bool)
}

// Session is a live registration with one relay.
type Session struct {
	// Relay is the index of the relay in ClientConfig.Relays; Addr the entry itself.
	Relay int
	Addr  string
	// UDPAddr is where the relay's UDP frames go: the relay's IP on the control connection and the
	// UDP port it announced.
	UDPAddr netip.AddrPort
	// ID is the node's ID at this relay; Key the session key that MACs BIND frames.
	ID  uint32
	Key []byte
}

// Client keeps the node registered with every relay. States:
//
//	new ──Start──► running ──Close──► closed
//	 └───────────Close────────────────┘
type Client struct {
	log     *slog.Logger
	cfg     ClientConfig
	priv    crypto.PrivKey
	targets []target
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	tries   []atomic.Uint64 // attempts to reach each relay

	mu      sync.Mutex // guards all following fields
	started bool
	closed  bool
	host    host.Host
	conns   []*clientConn // current registration per relay; nil while down
}

// target is one parsed entry of ClientConfig.Relays.
type target struct {
	raw string
	// id and addrs are set for a multiaddr with /p2p/; hostPort otherwise.
	id       peer.ID
	addrs    []ma.Multiaddr
	hostPort string
}

// clientConn is one registration's control stream.
type clientConn struct {
	stream  network.Stream
	session Session
	wmu     sync.Mutex // serializes writes on stream

	mu    sync.Mutex // guards peers
	peers map[string]bool
}

// Client back-off between attempts to reach a relay.
const (
	backoffMin = 200 * time.Millisecond
	backoffMax = 5 * time.Second
	// dialTimeout bounds dialling and registering with a relay.
	dialTimeout = 10 * time.Second
)

// NewClient validates cfg. It starts nothing.
func NewClient(cfg ClientConfig) (*Client, error) {
	if len(cfg.Relays) == 0 {
		return nil, errors.New("relay client: no relays")
	}
	if cfg.JoinToken == "" {
		return nil, errors.New("relay client: no join token")
	}
	if len(cfg.Key) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("relay client: libp2p key of %d bytes, want %d", len(cfg.Key), ed25519.PrivateKeySize)
	}
	if err := cfg.Self.validate(); err != nil {
		return nil, fmt.Errorf("relay client: %w", err)
	}
	priv, err := crypto.UnmarshalEd25519PrivateKey(cfg.Key)
	if err != nil {
		return nil, fmt.Errorf("relay client: libp2p key: %w", err)
	}
	targets := make([]target, len(cfg.Relays))
	for i, r := range cfg.Relays {
		t, err := parseTarget(r)
		if err != nil {
			return nil, fmt.Errorf("relay client: relay %q: %w", r, err)
		}
		targets[i] = t
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Client{
		log:     log.With("component", "relay-client"),
		cfg:     cfg,
		priv:    priv,
		targets: targets,
		ctx:     ctx,
		cancel:  cancel,
		conns:   make([]*clientConn, len(targets)),
		tries:   make([]atomic.Uint64, len(targets)),
	}, nil
}

func parseTarget(s string) (target, error) {
	if len(s) > 0 && s[0] == '/' {
		m, err := ma.NewMultiaddr(s)
		if err != nil {
			return target{}, err
		}
		info, err := peer.AddrInfoFromP2pAddr(m)
		if err != nil {
			return target{}, fmt.Errorf("multiaddr needs /p2p/<peer ID>: %w", err)
		}
		if len(info.Addrs) == 0 {
			return target{}, errors.New("multiaddr has no transport address")
		}
		return target{raw: s, id: info.ID, addrs: info.Addrs}, nil
	}
	h, p, err := net.SplitHostPort(s)
	if err != nil {
		return target{}, err
	}
	if h == "" {
		return target{}, errors.New("no host")
	}
	if _, err := strconv.ParseUint(p, 10, 16); err != nil {
		return target{}, fmt.Errorf("port %q: %w", p, err)
	}
	return target{raw: s, hostPort: s}, nil
}

// Start creates the node's libp2p host and starts one goroutine per relay that dials it,
// registers, serves the session and dials again with back-off (200 ms doubling to 5 s) whenever
// the session ends, until Close.
func (c *Client) Start() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errors.New("relay client: start after close")
	}
	if c.started {
		return errors.New("relay client: already started")
	}
	c.started = true
	h, err := libp2p.New(append([]libp2p.Option{libp2p.Identity(c.priv), libp2p.NoListenAddrs}, hostOptions()...)...)
	if err != nil {
		return fmt.Errorf("relay client: libp2p host: %w", err)
	}
	c.host = h
	for i := range c.targets {
		c.wg.Go(func() { c.run(i) })
	}
	return nil
}

// Close ends every registration, waits for the client's goroutines and closes its libp2p host.
// It is idempotent.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	h := c.host
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
	if h != nil {
		if err := h.Close(); err != nil {
			return fmt.Errorf("relay client: close host: %w", err)
		}
	}
	return nil
}

// Sessions returns the registrations that are up.
func (c *Client) Sessions() []Session {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []Session
	for _, cc := range c.conns {
		if cc != nil {
			s := cc.session
			s.Key = append([]byte(nil), s.Key...)
			out = append(out, s)
		}
	}
	return out
}

// RequestPunch asks relay number relay to coordinate a hole punch with the node named peer. Both
// nodes then get OnPunch. It fails if the node is not registered with that relay or peer is not
// in its directory.
func (c *Client) RequestPunch(ctx context.Context, relay int, peer string) error {
	c.mu.Lock()
	var cc *clientConn
	if relay >= 0 && relay < len(c.conns) {
		cc = c.conns[relay]
	}
	c.mu.Unlock()
	if cc == nil {
		return fmt.Errorf("relay client: punch %s: not registered with relay %d", peer, relay)
	}
	cc.mu.Lock()
	known := cc.peers[peer]
	cc.mu.Unlock()
	if !known {
		return fmt.Errorf("relay client: punch %s: not in the directory of relay %s", peer, cc.session.Addr)
	}
	if err := cc.write(ctx, &message{Type: msgPunch, Peer: peer}); err != nil {
		return fmt.Errorf("relay client: punch %s via %s: %w", peer, cc.session.Addr, err)
	}
	return nil
}

// write sends m on the control stream, bounded by ctx's deadline or writeTimeout.
func (cc *clientConn) write(ctx context.Context, m *message) error {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(writeTimeout)
	}
	cc.wmu.Lock()
	defer cc.wmu.Unlock()
	cc.stream.SetWriteDeadline(deadline)
	return writeFrame(cc.stream, m)
}

// run keeps relay i registered until Close.
func (c *Client) run(i int) {
	backoff := backoffMin
	t := time.NewTimer(time.Hour)
	t.Stop()
	defer t.Stop()
	for {
		registered, err := c.session(i)
		if c.ctx.Err() != nil {
			return
		}
		c.log.Warn("relay session ended", "relay", c.targets[i].raw, "err", err)
		if registered {
			backoff = backoffMin
		}
		t.Reset(backoff)
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
		backoff = min(2*backoff, backoffMax)
	}
}

// session dials relay i, registers and serves the registration until it fails.
func (c *Client) session(i int) (registered bool, err error) {
	tg := c.targets[i]
	c.tries[i].Add(1)
	ctx, cancel := context.WithTimeout(c.ctx, dialTimeout)
	defer cancel()
	ctx = network.WithForceDirectDial(ctx, "relay registration")
	id, addrs := tg.id, tg.addrs
	if tg.hostPort != "" {
		if id, addrs, err = c.learnPeer(ctx, tg.hostPort); err != nil {
			return false, fmt.Errorf("relay %s: %w", tg.raw, err)
		}
	}
	if err := c.host.Connect(ctx, peer.AddrInfo{ID: id, Addrs: addrs}); err != nil {
		return false, fmt.Errorf("relay %s: connect: %w", tg.raw, err)
	}
	st, err := c.host.NewStream(ctx, id, ProtocolID)
	if err != nil {
		return false, fmt.Errorf("relay %s: open stream: %w", tg.raw, err)
	}
	stop := context.AfterFunc(c.ctx, func() { st.Reset() })
	defer stop()
	defer st.Reset()
	cc, keepalive, err := c.register(ctx, i, st)
	if err != nil {
		return false, fmt.Errorf("relay %s: register: %w", tg.raw, err)
	}
	c.mu.Lock()
	c.conns[i] = cc
	c.mu.Unlock()
	c.log.Info("registered with relay", "relay", tg.raw, "peer", id.String(), "id", cc.session.ID)
	if c.cfg.OnSession != nil {
		c.cfg.OnSession(cc.session, true)
	}
	defer func() {
		c.mu.Lock()
		c.conns[i] = nil
		c.mu.Unlock()
		if c.cfg.OnSession != nil {
			c.cfg.OnSession(cc.session, false)
		}
	}()
	return true, c.serve(i, cc, keepalive)
}

// attempts returns how many times the client has tried to reach relay i.
func (c *Client) attempts(i int) uint64 { return c.tries[i].Load() }

// learnPeer finds the peer ID of the relay at hostPort by dialling it with a random peer ID: the
// Noise handshake fails with the relay's real (authenticated) ID. That only tells the client who
// is there; the relay is trusted once its welcome proves it knows the join token.
func (c *Client) learnPeer(ctx context.Context, hostPort string) (peer.ID, []ma.Multiaddr, error) {
	h, p, _ := net.SplitHostPort(hostPort)
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", h)
	if err != nil {
		return "", nil, fmt.Errorf("resolve %s: %w", h, err)
	}
	var addrs []ma.Multiaddr
	for _, ip := range ips {
		proto := "/ip4/"
		if !ip.Unmap().Is4() {
			proto = "/ip6/"
		}
		m, err := ma.NewMultiaddr(proto + ip.Unmap().WithZone("").String() + "/tcp/" + p)
		if err != nil {
			return "", nil, fmt.Errorf("address %s: %w", ip, err)
		}
		addrs = append(addrs, m)
	}
	_, pub, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		return "", nil, fmt.Errorf("probe key: %w", err)
	}
	probe, err := peer.IDFromPublicKey(pub)
	if err != nil {
		return "", nil, fmt.Errorf("probe ID: %w", err)
	}
	err = c.host.Connect(ctx, peer.AddrInfo{ID: probe, Addrs: addrs})
	c.host.Peerstore().RemovePeer(probe)
	c.host.Peerstore().ClearAddrs(probe)
	var mismatch sec.ErrPeerIDMismatch
	switch {
	case err == nil:
		c.host.Network().ClosePeer(probe)
		return "", nil, errors.New("learn peer ID: relay accepted a random peer ID")
	case errors.As(err, &mismatch):
		return mismatch.Actual, addrs, nil
	default:
		return "", nil, fmt.Errorf("learn peer ID: %w", err)
	}
}

// register runs the registration handshake on st and authenticates the relay.
func (c *Client) register(ctx context.Context, i int, st network.Stream) (*clientConn, time.Duration, error) {
	deadline, _ := ctx.Deadline()
	st.SetDeadline(deadline)
	m, err := readFrame(st, maxPreAuthFrame)
	if err != nil {
		return nil, 0, fmt.Errorf("read challenge: %w", err)
	}
	if m.Type == msgError {
		return nil, 0, fmt.Errorf("refused: %s", m.Reason)
	}
	if m.Type != msgChallenge {
		return nil, 0, fmt.Errorf("%w: %q instead of challenge", ErrControl, m.Type)
	}
	relayNonce, err := decodeNonce(m.Nonce)
	if err != nil {
		return nil, 0, err
	}
	nonce, err := newNonce()
	if err != nil {
		return nil, 0, err
	}
	relayPeer, self := st.Conn().RemotePeer().String(), c.host.ID().String()
	reg := c.cfg.Self
	err = writeFrame(st, &message{
		Type:         msgRegister,
		Name:         reg.Name,
		WireGuardKey: reg.WireGuardKey,
		Overlay:      reg.Overlay,
		LAN:          reg.LAN,
		Nonce:        base64.StdEncoding.EncodeToString(nonce),
		Proof:        base64.StdEncoding.EncodeToString(proof(c.cfg.JoinToken, labelRegister, relayPeer, self, relayNonce)),
	})
	if err != nil {
		return nil, 0, err
	}
	m, err = readFrame(st, maxPreAuthFrame)
	if err != nil {
		return nil, 0, fmt.Errorf("read welcome: %w", err)
	}
	if m.Type == msgError {
		return nil, 0, fmt.Errorf("refused: %s", m.Reason)
	}
	if m.Type != msgWelcome {
		return nil, 0, fmt.Errorf("%w: %q instead of welcome", ErrControl, m.Type)
	}
	// Nothing the relay says is trusted before this check.
	if !checkProof(m.RelayProof, c.cfg.JoinToken, labelRelay, relayPeer, self, nonce) {
		return nil, 0, errors.New("relay failed to prove the join token: not our relay")
	}
	key, err := base64.StdEncoding.DecodeString(m.SessionKey)
	if err != nil || len(key) != 32 || m.ID == 0 || m.UDPPort == 0 || m.KeepaliveMs <= 0 {
		return nil, 0, fmt.Errorf("%w: bad welcome", ErrControl)
	}
	ip, err := remoteIP(st.Conn().RemoteMultiaddr())
	if err != nil {
		return nil, 0, err
	}
	st.SetDeadline(time.Time{})
	return &clientConn{
		stream: st,
		session: Session{Relay: i, Addr: c.targets[i].raw, UDPAddr: netip.AddrPortFrom(ip, m.UDPPort),
			ID: m.ID, Key: key},
		peers: map[string]bool{},
	}, time.Duration(m.KeepaliveMs) * time.Millisecond, nil
}

// remoteIP returns the IP of a /ip4 or /ip6 multiaddr.
func remoteIP(m ma.Multiaddr) (netip.Addr, error) {
	for _, code := range []int{ma.P_IP4, ma.P_IP6} {
		if v, err := m.ValueForProtocol(code); err == nil {
			if ip, err := netip.ParseAddr(v); err == nil {
				return ip.Unmap(), nil
			}
		}
	}
	return netip.Addr{}, fmt.Errorf("relay address %s has no IP", m)
}

// serve reads the relay's frames until the stream fails.
func (c *Client) serve(i int, cc *clientConn, keepalive time.Duration) error {
	for {
		cc.stream.SetReadDeadline(time.Now().Add(3 * keepalive))
		m, err := readFrame(cc.stream, MaxControlFrame)
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
		switch m.Type {
		case msgPing:
			if err := cc.write(c.ctx, &message{Type: msgPong, T: m.T}); err != nil {
				return fmt.Errorf("pong: %w", err)
			}
		case msgDirectory:
			nodes := make([]DirEntry, 0, len(m.Nodes))
			peers := make(map[string]bool, len(m.Nodes))
			for _, e := range m.Nodes {
				r := Registration{Name: e.Name, WireGuardKey: e.WireGuardKey, Overlay: e.Overlay, LAN: e.LAN}
				if err := r.validate(); err != nil || e.ID == 0 {
					c.log.Warn("relay sent a bad directory entry", "relay", cc.session.Addr, "node", e.Name, "err", err)
					continue
				}
				nodes = append(nodes, e)
				peers[e.Name] = true
			}
			cc.mu.Lock()
			cc.peers = peers
			cc.mu.Unlock()
			if c.cfg.OnDirectory != nil {
				c.cfg.OnDirectory(i, nodes)
			}
		case msgPunch:
			if validName(m.Peer) != nil || m.DelayMs < 0 || m.DelayMs > 10_000 || len(m.PeerLAN) > maxLAN {
				c.log.Warn("relay sent a bad punch", "relay", cc.session.Addr, "peer", m.Peer)
				continue
			}
			if c.cfg.OnPunch != nil {
				c.cfg.OnPunch(i, Punch{Peer: m.Peer, PeerReflexive: m.PeerReflexive, PeerLAN: m.PeerLAN,
					Delay: time.Duration(m.DelayMs) * time.Millisecond})
			}
		case msgError:
			return fmt.Errorf("relay closed the session: %s", m.Reason)
		case msgPong:
		default:
			c.log.Debug("unknown control message", "relay", cc.session.Addr, "type", m.Type)
		}
	}
}
