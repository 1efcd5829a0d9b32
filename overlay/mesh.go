package overlay

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	wgtun "golang.zx2c4.com/wireguard/tun"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/overlay/forward"
	"github.com/edgewire/edgewire/overlay/identity"
	"github.com/edgewire/edgewire/overlay/internal/trim"
	"github.com/edgewire/edgewire/overlay/path"
	"github.com/edgewire/edgewire/relay"
)

// PersistentKeepalive keeps NAT and conntrack state of idle peers alive, in seconds.
const PersistentKeepalive = 25

// peer is a node of the directory this agent keeps a WireGuard peer for.
type peer struct {
	name      string
	key       identity.Key
	overlay   netip.Addr
	lan       []netip.AddrPort // the node's WireGuard socket addresses, LAN first
	reflexive netip.AddrPort   // as a relay saw it; zero: unknown
	relays    []path.RelayRoute
}

// directory is the node directory derived from one snapshot: immutable once built.
type directory struct {
	byName map[string]*peer
	// local are the endpoint targets (address:port, per protocol) of known services on this node: the
	// only targets the forward listener dials.
	local map[localTarget]struct{}
}

type localTarget struct {
	proto discovery.Protocol
	addr  netip.AddrPort
}

// buildDirectory derives the directory from s for the node self. Nodes without a valid key are not
// peers; self is never a peer.
func buildDirectory(s *discovery.Snapshot, self string, prefix netip.Prefix, logger *slog.Logger) *directory {
	d := &directory{byName: make(map[string]*peer), local: make(map[localTarget]struct{})}
	for _, n := range s.Nodes {
		if n.Name == self || n.WireGuardKey == "" {
			continue
		}
		key, err := identity.ParseKey(n.WireGuardKey)
		if err != nil {
			logger.Warn("node ignored: bad WireGuard key", "node", n.Name, "err", err)
			continue
		}
		addr, err := identity.OverlayAddr(prefix, key)
		if err != nil {
			logger.Warn("node ignored: overlay address", "node", n.Name, "err", err)
			continue
		}
		d.byName[n.Name] = &peer{name: n.Name, key: key, overlay: addr, lan: n.Endpoints}
	}
	for _, svc := range s.Services {
		for i := range svc.Endpoints {
			ep := &svc.Endpoints[i]
			if ep.NodeName != self {
				continue
			}
			for _, sp := range svc.Ports {
				port, ok := sp.TargetFor(ep)
				if !ok {
					continue
				}
				for _, a := range ep.Addresses {
					d.local[localTarget{sp.Protocol, netip.AddrPortFrom(a, port)}] = struct{}{}
				}
			}
		}
	}
	return d
}

// mesh is the WireGuard side of the agent: the wireguard-go device on mesh0's overlay range, its peers,
// the UAPI socket, and agent-to-agent forwarding.
type mesh struct {
	root     *slog.Logger // for the components the mesh creates
	logger   *slog.Logger
	self     string
	id       *identity.Identity
	overlay  netip.Addr
	prefix   netip.Prefix
	wgName   string
	tunName  string
	fwdPort  uint16
	listenPt uint16
	// maxBuffers bounds wireguard-go's message buffers (wgbuffers.go); buffers counts them.
	maxBuffers uint32
	buffers    bufferStats
	// trim gives the pages of the idle batches of the TUN reader and the receivers back after a
	// load (releaseMemory asks).
	trim trim.Trimmer
	// udpIdle is the forward listener's UDP idle timeout: the agent's, as the client's side closes
	// a flow after it and the listener cannot tell.
	udpIdle time.Duration
	// maxTCP and maxUDP are the forward listener's flow caps (Config.MaxTCPFlows, MaxUDPFlows).
	maxTCP, maxUDP int

	dir    atomic.Pointer[directory]
	dialer forward.Dialer

	// The host's parts (Config): the WireGuard socket under the path Bind, the UAPI listener,
	// the forward listener and the dialer of local endpoints.
	socket      conn.Bind
	listenUAPI  func(name string) (net.Listener, error)
	newListener func(forward.ListenerConfig) (ForwardListener, error)
	dialLocal   func(ctx context.Context, network, address string) (net.Conn, error)

	// Set by start, before the agent publishes the mesh; read without a lock after that.
	bind     *path.Bind
	paths    *path.Manager
	relays   *relay.Client // nil without --relay
	dev      *device.Device
	uapi     net.Listener
	listener ForwardListener // nil: Config.ForwardListener gave none
	wg       sync.WaitGroup

	relayAddrs []string
	joinToken  string

	closeOnce sync.Once

	mu        sync.Mutex // guards all following fields
	peers     map[identity.Key]*peer
	snap      *discovery.Snapshot      // the catalog's last snapshot
	relayDirs map[int][]relay.DirEntry // each relay's last directory
	keepalive map[identity.Key]*keepaliveState
	done      chan struct{} // closed by close: stops the keepalive loop
}

// forwardSpares is how many connected forward connections the agent keeps ready per node it forwards
// flows to: a new flow then waits one round trip over the overlay (header, status) instead of two.
const forwardSpares = 2

func newMesh(cfg *Config, id *identity.Identity, overlay netip.Addr) *mesh {
	m := &mesh{
		root:       cfg.Logger,
		logger:     cfg.Logger.With("component", "wireguard"),
		self:       cfg.NodeName,
		id:         id,
		overlay:    overlay,
		prefix:     cfg.OverlayPrefix,
		wgName:     cfg.WGInterface,
		tunName:    cfg.TUNName,
		fwdPort:    cfg.ForwardPort,
		listenPt:   cfg.ListenPort,
		maxBuffers: uint32(cfg.WireGuardBuffers),
		udpIdle:    cfg.UDPIdleTimeout,
		maxTCP:     cfg.MaxTCPFlows,
		maxUDP:     cfg.MaxUDPFlows,
		dialer:     forward.Dialer{Port: cfg.ForwardPort, Spares: forwardSpares},

		socket:      cfg.WireGuardSocket,
		listenUAPI:  cfg.ListenUAPI,
		newListener: cfg.ForwardListener,
		dialLocal:   cfg.DialLocal,
		peers:       make(map[identity.Key]*peer),

		relayAddrs: slices.Clone(cfg.Relays),
		joinToken:  cfg.JoinToken,
		snap:       &discovery.Snapshot{},
		relayDirs:  make(map[int][]relay.DirEntry),
		keepalive:  make(map[identity.Key]*keepaliveState),
		done:       make(chan struct{}),
	}
	m.dir.Store(&directory{byName: map[string]*peer{}, local: map[localTarget]struct{}{}})
	return m
}

// deviceLogger converts the agent's logger to wireguard-go's, in this one place. wireguard-go's
// verbose lines are debug logs; formatting is skipped when debug is off.
func deviceLogger(l *slog.Logger) *device.Logger {
	return &device.Logger{
		Verbosef: func(format string, args ...any) {
			if l.Enabled(context.Background(), slog.LevelDebug) {
				l.Debug(fmt.Sprintf(format, args...))
			}
		},
		Errorf: func(format string, args ...any) {
			l.Warn(fmt.Sprintf(format, args...))
		},
	}
}

// start brings up wireguard-go on tunDev (the overlay side of mesh0), its UAPI socket and the forward
// listener on the overlay address. tunDevice is the kernel interface name for SO_BINDTODEVICE.
func (m *mesh) start(tunDev wgtun.Device, tunDevice string) error {
	m.bind = path.NewBind(path.Config{Logger: m.root, Inner: m.socket, Trim: &m.trim})
	if err := m.newPaths(); err != nil {
		return err
	}
	gate := newGatedTUN(tunDev, &m.trim)
	m.dev = device.NewDevice(gate, m.bind, deviceLogger(m.logger))
	if err := boundBuffers(m.dev, m.maxBuffers, &m.buffers); err != nil {
		m.logger.Error("wireguard-go's message buffers stay unbounded: memory may grow under load", "err", err)
	}
	gate.open()
	conf := fmt.Sprintf("private_key=%s\nlisten_port=%d\n", hex.EncodeToString(m.id.WireGuard[:]), m.listenPt)
	if err := m.dev.IpcSet(conf); err != nil {
		return fmt.Errorf("wireguard: configure device (is UDP port %d in use? set --listen-port): %w", m.listenPt, err)
	}
	if err := m.dev.Up(); err != nil {
		return fmt.Errorf("wireguard: up (is UDP port %d in use? set --listen-port): %w", m.listenPt, err)
	}
	uapi, err := m.listenUAPI(m.wgName)
	if err != nil {
		return err
	}
	m.uapi = uapi
	m.wg.Add(3)
	go m.serveUAPI()
	go m.keepaliveLoop()
	go m.relieveBuffers()

	ln, err := m.newListener(forward.ListenerConfig{
		Logger: m.root,
		Addr:   m.overlay,
		Port:   m.fwdPort,
		Device: tunDevice,
		Allow:  m.allow,

		UDPIdleTimeout: m.udpIdle,
		// 0: the listener's defaults, from RLIMIT_NOFILE.
		MaxTCPFlows: m.maxTCP,
		MaxUDPFlows: m.maxUDP,
	})
	if err != nil {
		return fmt.Errorf("forward listener: %w", err)
	}
	if ln != nil {
		m.listener = ln
		if err := ln.Start(); err != nil {
			return fmt.Errorf("forward listener on [%s]:%d: %w", m.overlay, m.fwdPort, err)
		}
	}
	if err := m.paths.Start(); err != nil {
		return fmt.Errorf("path manager: %w", err)
	}
	if m.relays != nil {
		if err := m.relays.Start(); err != nil {
			return fmt.Errorf("relay client: %w", err)
		}
	}
	m.logger.Info("wireguard up", "public_key", m.id.WireGuardPublic.String(), "overlay", m.overlay,
		"listen_port", m.bind.Port(), "uapi", m.uapi.Addr().String())
	return nil
}

func (m *mesh) serveUAPI() {
	defer m.wg.Done()
	var conns sync.WaitGroup
	defer conns.Wait()
	for {
		c, err := m.uapi.Accept()
		if err != nil {
			return
		}
		conns.Add(1)
		go func() {
			defer conns.Done()
			m.dev.IpcHandle(c)
		}()
	}
}

// close stops the forward listener, the UAPI socket and the device (which closes the kernel TUN), and
// waits. It is safe on a partly started mesh.
func (m *mesh) close() error {
	var errs []error
	m.closeOnce.Do(func() { close(m.done) })
	if m.relays != nil {
		errs = append(errs, m.relays.Close())
	}
	if m.paths != nil {
		errs = append(errs, m.paths.Close())
	}
	errs = append(errs, m.dialer.Close())
	if m.listener != nil {
		errs = append(errs, m.listener.Close())
	}
	if m.uapi != nil {
		errs = append(errs, m.uapi.Close())
	}
	if m.dev != nil {
		m.dev.Close()
	}
	m.wg.Wait()
	return errors.Join(errs...)
}

// allow is the forward listener's check: only endpoints of known services on this node.
func (m *mesh) allow(proto discovery.Protocol, target netip.AddrPort) bool {
	_, ok := m.dir.Load().local[localTarget{proto, target}]
	return ok
}

// apply takes the catalog's snapshot s.
func (m *mesh) apply(s *discovery.Snapshot) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.dev != nil && !slices.Equal(s.Relays, m.snap.Relays) {
		for _, r := range s.Relays {
			if !slices.Contains(m.relayAddrs, r) {
				m.logger.Warn("the catalog names a relay this agent does not use yet: restart the agent to register with it", "relay", r)
			}
		}
	}
	m.snap = s
	m.rebuildLocked()
}

// rebuildLocked derives the directory from the catalog and the relays' directories and installs it:
// WireGuard peers added, changed and removed without restarting the device, and the path manager
// told every peer's candidates. wireguard-go gets no endpoint here: the path manager sets one once a
// path answers.
func (m *mesh) rebuildLocked() {
	dir := buildDirectory(m.snap, m.self, m.prefix, m.logger)
	m.mergeRelaysLocked(dir)
	m.dir.Store(dir)
	if m.dev == nil {
		return
	}
	var b strings.Builder
	want := make(map[identity.Key]*peer, len(dir.byName))
	infos := make([]path.PeerInfo, 0, len(dir.byName))
	for _, p := range dir.byName {
		want[p.key] = p
		infos = append(infos, path.PeerInfo{Name: p.name, Key: p.key, LAN: p.lan, Reflexive: p.reflexive, Relays: p.relays})
		if old, ok := m.peers[p.key]; ok && old.overlay == p.overlay {
			continue
		}
		// No endpoint and no keepalive yet: see setEndpoint.
		fmt.Fprintf(&b, "public_key=%s\nreplace_allowed_ips=true\nallowed_ip=%s/128\n", hex.EncodeToString(p.key[:]), p.overlay)
		m.logger.Info("peer added", "node", p.name, "key", p.key.String(), "overlay", p.overlay, "lan", p.lan)
	}
	for k, old := range m.peers {
		if _, ok := want[k]; !ok {
			fmt.Fprintf(&b, "public_key=%s\nremove=true\n", hex.EncodeToString(k[:]))
			delete(m.keepalive, k)
			m.logger.Info("peer removed", "node", old.name, "key", k.String())
		}
	}
	if b.Len() > 0 {
		if err := m.dev.IpcSet(b.String()); err != nil {
			m.logger.Error("wireguard: set peers", "err", err)
			return
		}
	}
	m.peers = want
	if m.paths != nil {
		m.paths.SetPeers(infos)
	}
}

// DialEndpoint implements proxy.EndpointDialer: endpoints on other mesh nodes are reached through
// their forward listener over WireGuard; local endpoints, and endpoints of nodes outside the mesh
// directory, with a plain kernel socket.
func (m *mesh) DialEndpoint(ctx context.Context, proto discovery.Protocol, ep *discovery.Endpoint, addr netip.AddrPort) (net.Conn, error) {
	if ep.NodeName != "" && ep.NodeName != m.self {
		if p, ok := m.dir.Load().byName[ep.NodeName]; ok {
			return m.dialer.Dial(ctx, proto, p.overlay, addr)
		}
	}
	network := "tcp"
	if proto == discovery.UDP {
		network = "udp"
	}
	return m.dialLocal(ctx, network, addr.String())
}

// PeerInfo is one WireGuard peer as the device reports it.
type PeerInfo struct {
	Node          string
	PublicKey     string
	Endpoint      string
	AllowedIPs    []string
	LastHandshake int64 // unix seconds; 0 never
	RxBytes       uint64
	TxBytes       uint64
	Keepalive     int
}

// DeviceInfo is the device as `wg show` sees it.
type DeviceInfo struct {
	Interface  string
	PublicKey  string
	ListenPort int
	Overlay    string
	Peers      []PeerInfo
}

// info reads the device's state through the same UAPI `wg` uses.
func (m *mesh) info() (DeviceInfo, error) {
	di := DeviceInfo{Interface: m.wgName, PublicKey: m.id.WireGuardPublic.String(), Overlay: m.overlay.String()}
	if m.dev == nil {
		return di, errors.New("wireguard device not running")
	}
	raw, err := m.dev.IpcGet()
	if err != nil {
		return di, fmt.Errorf("wireguard: read device state: %w", err)
	}
	names := make(map[string]string)
	for _, p := range m.dir.Load().byName {
		names[hex.EncodeToString(p.key[:])] = p.name
	}
	var cur *PeerInfo
	for line := range strings.SplitSeq(raw, "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		if k == "listen_port" {
			di.ListenPort, _ = strconv.Atoi(v)
			continue
		}
		if k != "public_key" && cur == nil {
			continue
		}
		switch k {
		case "public_key":
			di.Peers = append(di.Peers, PeerInfo{Node: names[v]})
			cur = &di.Peers[len(di.Peers)-1]
			if b, err := hex.DecodeString(v); err == nil {
				cur.PublicKey = base64.StdEncoding.EncodeToString(b)
			}
		case "endpoint":
			cur.Endpoint = v
		case "allowed_ip":
			cur.AllowedIPs = append(cur.AllowedIPs, v)
		case "last_handshake_time_sec":
			cur.LastHandshake, _ = strconv.ParseInt(v, 10, 64)
		case "rx_bytes":
			cur.RxBytes, _ = strconv.ParseUint(v, 10, 64)
		case "tx_bytes":
			cur.TxBytes, _ = strconv.ParseUint(v, 10, 64)
		case "persistent_keepalive_interval":
			cur.Keepalive, _ = strconv.Atoi(v)
		}
	}
	return di, nil
}
