package relay

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"
)

// ServerConfig configures a Server.
type ServerConfig struct {
	// Logger receives the server's logs; nil discards them.
	Logger *slog.Logger
	// ListenPort is the TCP port of the libp2p host and the UDP port of the datagram relay (the
	// same number). 0 picks a free port for both.
	ListenPort uint16
	// ListenAddr is the address to listen on; the zero value means all addresses (IPv4 and IPv6).
	ListenAddr netip.Addr
	// JoinToken is the secret a node proves it knows to register. Required.
	JoinToken string
	// StateDir holds relay.key (the relay's libp2p identity, so its peer ID survives restarts) and
	// bindings.json (node name → keys → node ID). Required; created 0700 when missing.
	StateDir string
	// AdvertiseAddrs are the addresses the relay announces instead of its listen addresses, each
	// "host:port" (an IP or a DNS name) or a multiaddr; empty means the listen addresses.
	AdvertiseAddrs []string
	// Limits bounds each node; zero fields take DefaultLimits.
	Limits Limits
	// ACL is consulted after the token check; nil allows every token holder.
	ACL ACL
	// MetricsAddr, when set, is the host:port of an HTTP listener serving /metrics in the
	// Prometheus text format.
	MetricsAddr string
}

// Server is the rendezvous and relay server. Its states are
//
//	new ──Start──► running ──Close──► closed
//	 └───────────Close────────────────┘
type Server struct {
	log     *slog.Logger
	cfg     ServerConfig
	limits  Limits
	priv    crypto.PrivKey
	id      peer.ID
	binds   *bindings
	metrics *metrics
	gate    *gate
	epoch   time.Time
	adverts []ma.Multiaddr
	dirty   chan struct{} // a directory push is due
	done    chan struct{} // closed by Close
	wg      sync.WaitGroup

	mu         sync.Mutex // guards all following fields
	started    bool
	closed     bool
	host       host.Host
	udp        *net.UDPConn
	udpPC      batchConn // udp for batched I/O; set by Start before readUDP starts
	udpGSO     bool      // the kernel segments UDP sends (GSO) on udp
	metricsLn  net.Listener
	metricsSrv *http.Server
	sessions   map[string]*session         // registered nodes by name
	streams    map[network.Stream]struct{} // every stream being served, registered or not

	udpMu  sync.RWMutex // guards all following fields and the addr and ua fields of every udpNode
	byID   map[uint32]*udpNode
	byAddr map[netip.AddrPort]*udpNode
}

// udpNode is a registered node as the UDP path sees it.
type udpNode struct {
	id   uint32
	key  []byte
	addr netip.AddrPort // bound (reflexive) address; guarded by Server.udpMu
	ua   *net.UDPAddr   // addr for sendmmsg, nil when addr is not valid; guarded by Server.udpMu
	// data is the node's DATA rate limit; only the UDP reader goroutine touches it.
	data bucket
}

// NewServer validates cfg and loads (or creates) the relay's identity and bindings from the state
// directory. It starts nothing.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.JoinToken == "" {
		return nil, errors.New("relay server: no join token")
	}
	if cfg.StateDir == "" {
		return nil, errors.New("relay server: no state directory")
	}
	if cfg.ListenAddr.IsValid() && cfg.ListenAddr.Zone() != "" {
		return nil, fmt.Errorf("relay server: listen address %s has a zone", cfg.ListenAddr)
	}
	adverts := make([]ma.Multiaddr, 0, len(cfg.AdvertiseAddrs))
	for _, a := range cfg.AdvertiseAddrs {
		m, err := advertiseMultiaddr(a)
		if err != nil {
			return nil, fmt.Errorf("relay server: advertise address %q: %w", a, err)
		}
		adverts = append(adverts, m)
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("relay server: state directory: %w", err)
	}
	priv, err := loadOrCreateKey(cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("relay server: %w", err)
	}
	id, err := peer.IDFromPrivateKey(priv)
	if err != nil {
		return nil, fmt.Errorf("relay server: peer ID: %w", err)
	}
	binds, err := loadBindings(cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("relay server: %w", err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "relay")
	limits := cfg.Limits.withDefaults()
	m := newMetrics()
	return &Server{
		log:      log,
		cfg:      cfg,
		limits:   limits,
		priv:     priv,
		id:       id,
		binds:    binds,
		metrics:  m,
		gate:     newGate(limits, m, log),
		epoch:    time.Now(),
		adverts:  adverts,
		dirty:    make(chan struct{}, 1),
		done:     make(chan struct{}),
		sessions: map[string]*session{},
		streams:  map[network.Stream]struct{}{},
		byID:     map[uint32]*udpNode{},
		byAddr:   map[netip.AddrPort]*udpNode{},
	}, nil
}

// advertiseMultiaddr turns "host:port" or a multiaddr into a TCP multiaddr.
func advertiseMultiaddr(s string) (ma.Multiaddr, error) {
	if len(s) > 0 && s[0] == '/' {
		return ma.NewMultiaddr(s)
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return nil, err
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return nil, fmt.Errorf("port %q: %w", port, err)
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Unmap().Is4() {
			return ma.NewMultiaddr("/ip4/" + ip.Unmap().String() + "/tcp/" + port)
		}
		return ma.NewMultiaddr("/ip6/" + ip.String() + "/tcp/" + port)
	}
	return ma.NewMultiaddr("/dns/" + host + "/tcp/" + port)
}

// PeerID returns the relay's libp2p peer ID.
func (s *Server) PeerID() string { return s.id.String() }

// Multiaddrs returns the relay's addresses, each ending in /p2p/<peer ID>. Before Start it
// returns the advertised addresses only.
func (s *Server) Multiaddrs() []string {
	s.mu.Lock()
	h := s.host
	s.mu.Unlock()
	addrs := s.adverts
	if h != nil {
		addrs = h.Addrs()
	}
	out := make([]string, 0, len(addrs))
	for _, a := range addrs {
		out = append(out, a.String()+"/p2p/"+s.id.String())
	}
	return out
}

// Port returns the port the server listens on (TCP and UDP), 0 before Start.
func (s *Server) Port() uint16 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.udp == nil {
		return 0
	}
	return uint16(s.udp.LocalAddr().(*net.UDPAddr).Port)
}

// Start opens the UDP socket, the libp2p host and the metrics listener, and starts serving.
func (s *Server) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("relay server: start after close")
	}
	if s.started {
		return errors.New("relay server: already started")
	}
	s.started = true
	udp, h, err := s.listen()
	if err != nil {
		return fmt.Errorf("relay server: %w", err)
	}
	if s.cfg.MetricsAddr != "" {
		ln, err := net.Listen("tcp", s.cfg.MetricsAddr)
		if err != nil {
			udp.Close()
			h.Close()
			return fmt.Errorf("relay server: metrics listener: %w", err)
		}
		s.metricsLn = ln
		s.metricsSrv = &http.Server{Handler: s.metricsHandler(), ReadHeaderTimeout: 10 * time.Second}
		s.wg.Go(func() {
			if err := s.metricsSrv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Error("metrics server", "err", err)
			}
		})
	}
	s.udp, s.host = udp, h
	var gro bool
	s.udpGSO, gro = setupSocket(udp)
	s.udpPC = newBatchConn(udp)
	// The host accepts connections from the moment it exists: those that came before the gate
	// was told about connections are handed to it too (connected ignores a repeat).
	h.Network().Notify(&network.NotifyBundle{
		ConnectedF:    func(_ network.Network, c network.Conn) { s.gate.connected(c) },
		DisconnectedF: func(_ network.Network, c network.Conn) { s.gate.disconnected(c) },
	})
	for _, c := range h.Network().Conns() {
		s.gate.connected(c)
	}
	h.SetStreamHandler(ProtocolID, s.handleStream)
	s.wg.Go(s.readUDP)
	s.wg.Go(s.pushDirectory)
	s.log.Info("relay started", "peer", s.id.String(), "port", s.udp.LocalAddr().(*net.UDPAddr).Port,
		"udp_gso", s.udpGSO, "udp_gro", gro)
	return nil
}

// listen opens the UDP socket and the libp2p host on the same port number. With port 0 the UDP
// socket picks one and the host takes the same TCP port; a few ports are tried if that one is taken.
func (s *Server) listen() (*net.UDPConn, host.Host, error) {
	ip := net.IP(nil)
	if s.cfg.ListenAddr.IsValid() {
		ip = s.cfg.ListenAddr.AsSlice()
	}
	var lastErr error
	for range 8 {
		udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: ip, Port: int(s.cfg.ListenPort)})
		if err != nil {
			return nil, nil, fmt.Errorf("udp socket: %w", err)
		}
		port := udp.LocalAddr().(*net.UDPAddr).Port
		if s.cfg.ListenPort == 0 && !tcpPortFree(ip, port) {
			// libp2p leaks the goroutines of a host that fails to listen: try another port
			// before asking it.
			udp.Close()
			lastErr = fmt.Errorf("tcp port %d in use", port)
			continue
		}
		h, err := s.newHost(port)
		if err == nil {
			return udp, h, nil
		}
		udp.Close()
		lastErr = err
		if s.cfg.ListenPort != 0 {
			break
		}
	}
	return nil, nil, lastErr
}

// tcpPortFree reports whether a TCP listener on ip (nil: all addresses) and port can be opened.
func tcpPortFree(ip net.IP, port int) bool {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: ip, Port: port})
	if err != nil {
		return false
	}
	ln.Close()
	return true
}

func (s *Server) newHost(port int) (host.Host, error) {
	var listen []string
	switch a := s.cfg.ListenAddr; {
	case !a.IsValid():
		listen = []string{fmt.Sprintf("/ip4/0.0.0.0/tcp/%d", port), fmt.Sprintf("/ip6/::/tcp/%d", port)}
	case a.Unmap().Is4():
		listen = []string{fmt.Sprintf("/ip4/%s/tcp/%d", a.Unmap(), port)}
	default:
		listen = []string{fmt.Sprintf("/ip6/%s/tcp/%d", a, port)}
	}
	opts := []libp2p.Option{
		libp2p.Identity(s.priv),
		libp2p.ListenAddrStrings(listen...),
		libp2p.AddrsFactory(func(addrs []ma.Multiaddr) []ma.Multiaddr {
			if len(s.adverts) > 0 {
				return s.adverts
			}
			return addrs
		}),
	}
	server, err := serverHostOptions(s.limits, s.metrics)
	if err != nil {
		return nil, err
	}
	h, err := libp2p.New(append(opts, server...)...)
	if err != nil {
		return nil, fmt.Errorf("libp2p host on port %d: %w", port, err)
	}
	return h, nil
}

// hostOptions are the libp2p options of the client's host: TCP, Noise, yamux, and nothing else
// (naming a transport, a security protocol and a muxer replaces libp2p's default lists). The
// relay's host has its own muxer settings and resources (serverHostOptions).
func hostOptions() []libp2p.Option {
	return append(commonHostOptions(), libp2p.Muxer(yamux.ID, yamux.DefaultTransport))
}

// commonHostOptions are the libp2p options both ends use.
func commonHostOptions() []libp2p.Option {
	return []libp2p.Option{
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.Security(noise.ID, noise.New),
		libp2p.DisableRelay(),
		libp2p.DisableMetrics(),
		libp2p.Ping(false),
		libp2p.UserAgent("edgewire-relay"),
	}
}

// Close stops the server and waits for every goroutine it started. It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.done)
	h, udp, msrv := s.host, s.udp, s.metricsSrv
	for st := range s.streams {
		st.Reset()
	}
	for _, sess := range s.sessions {
		sess.close()
	}
	s.mu.Unlock()

	var errs []error
	if h != nil {
		h.RemoveStreamHandler(ProtocolID)
		if err := h.Close(); err != nil {
			errs = append(errs, fmt.Errorf("libp2p host: %w", err))
		}
	}
	if udp != nil {
		if err := udp.Close(); err != nil {
			errs = append(errs, fmt.Errorf("udp socket: %w", err))
		}
	}
	if msrv != nil {
		if err := msrv.Close(); err != nil {
			errs = append(errs, fmt.Errorf("metrics server: %w", err))
		}
	}
	s.gate.close()
	s.wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("relay server: close: %w", err)
	}
	return nil
}

// nodeCount is the number of registered nodes.
func (s *Server) nodeCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

// now is monotonic nanoseconds since the server was made.
func (s *Server) now() int64 { return int64(time.Since(s.epoch)) }

// markDirty schedules a directory push.
func (s *Server) markDirty() {
	select {
	case s.dirty <- struct{}{}:
	default:
	}
}

// directoryDebounce is how long the server gathers changes before pushing the directory.
const directoryDebounce = 50 * time.Millisecond

// pushDirectory sends the full directory to every registered node after each change.
func (s *Server) pushDirectory() {
	t := time.NewTimer(time.Hour)
	t.Stop()
	for {
		select {
		case <-s.done:
			return
		case <-s.dirty:
		}
		t.Reset(directoryDebounce)
		select {
		case <-s.done:
			t.Stop()
			return
		case <-t.C:
		}
		frame, sessions, err := s.directoryFrame()
		if err != nil {
			s.log.Error("encode directory", "err", err)
			continue
		}
		for _, sess := range sessions {
			sess.sendDirectory(frame)
		}
	}
}

// directoryFrame encodes the directory and returns it with the sessions to send it to.
func (s *Server) directoryFrame() ([]byte, []*session, error) {
	s.mu.Lock()
	sessions := make([]*session, 0, len(s.sessions))
	for _, sess := range s.sessions {
		sessions = append(sessions, sess)
	}
	s.mu.Unlock()
	nodes := make([]DirEntry, 0, len(sessions))
	s.udpMu.RLock()
	for _, sess := range sessions {
		e := DirEntry{Name: sess.reg.Name, WireGuardKey: sess.reg.WireGuardKey, Overlay: sess.reg.Overlay,
			LAN: sess.reg.LAN, ID: sess.id}
		if n := s.byID[sess.id]; n != nil && n == sess.udp {
			e.Reflexive = n.addr
		}
		nodes = append(nodes, e)
	}
	s.udpMu.RUnlock()
	sortEntries(nodes)
	frame, err := encodeFrame(&message{Type: msgDirectory, Nodes: nodes})
	return frame, sessions, err
}

// reflexive returns the bound address of node id.
func (s *Server) reflexive(id uint32) netip.AddrPort {
	s.udpMu.RLock()
	defer s.udpMu.RUnlock()
	if n := s.byID[id]; n != nil {
		return n.addr
	}
	return netip.AddrPort{}
}
