package overlay

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/edgewire/edgewire/overlay/control"
	"github.com/edgewire/edgewire/overlay/identity"
	"github.com/edgewire/edgewire/overlay/path"
	"github.com/edgewire/edgewire/relay"
)

// newPaths creates the path manager on the Bind and, with relays configured, the relay client that
// feeds it sessions, the relays' directories and punch signals.
func (m *mesh) newPaths() error {
	cfg := path.ManagerConfig{
		Logger:      m.root,
		Bind:        m.bind,
		PrivateKey:  m.id.WireGuard,
		PublicKey:   m.id.WireGuardPublic,
		SetEndpoint: m.setEndpoint,
		Endpoint:    m.currentEndpoint,
	}
	if len(m.relayAddrs) > 0 {
		rc, err := relay.NewClient(relay.ClientConfig{
			Logger:    m.root,
			Relays:    m.relayAddrs,
			JoinToken: m.joinToken,
			Key:       m.id.Libp2p,
			Self: relay.Registration{
				Name:         m.self,
				WireGuardKey: m.id.WireGuardPublic.String(),
				Overlay:      m.overlay,
				LAN:          m.lanEndpoints(),
			},
			OnDirectory: m.onRelayDirectory,
			OnPunch: func(i int, p relay.Punch) {
				m.paths.OnPunch(i, path.Punch{Peer: p.Peer, PeerReflexive: p.PeerReflexive, PeerLAN: p.PeerLAN, Delay: p.Delay})
			},
			OnSession: func(relay.Session, bool) { m.syncSessions() },
		})
		if err != nil {
			return fmt.Errorf("relay client: %w", err)
		}
		m.relays = rc
		cfg.RequestPunch = rc.RequestPunch
	}
	m.paths = path.NewManager(cfg)
	return nil
}

// currentEndpoint is the endpoint wireguard-go uses for peer now ("" when none).
func (m *mesh) currentEndpoint(peer [32]byte) (string, error) {
	di, err := m.info()
	if err != nil {
		return "", err
	}
	want := base64.StdEncoding.EncodeToString(peer[:])
	for _, p := range di.Peers {
		if p.PublicKey == want {
			return p.Endpoint, nil
		}
	}
	return "", nil
}

// syncSessions gives the path manager the relay registrations that are up.
func (m *mesh) syncSessions() {
	var out []path.RelaySession
	for _, s := range m.relays.Sessions() {
		out = append(out, path.RelaySession{Relay: s.Relay, UDPAddr: s.UDPAddr, ID: s.ID, Key: s.Key})
	}
	m.paths.SetRelays(out)
}

// addRelays adds relay addresses to the configured ones before start; duplicates are dropped.
// Relays that appear in the catalog later are logged and used after a restart.
func (m *mesh) addRelays(addrs []string) {
	for _, a := range addrs {
		if !slices.Contains(m.relayAddrs, a) {
			m.relayAddrs = append(m.relayAddrs, a)
		}
	}
}

// onRelayDirectory takes relay i's directory.
func (m *mesh) onRelayDirectory(i int, nodes []relay.DirEntry) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.relayDirs[i] = nodes
	m.rebuildLocked()
}

// mergeRelaysLocked adds what the relays know to dir: nodes the catalog lacks, reflexive addresses,
// LAN addresses, and the nodes' IDs on each relay. A relay binds a name to one key, but the catalog
// wins when they disagree.
func (m *mesh) mergeRelaysLocked(dir *directory) {
	for i, nodes := range m.relayDirs {
		for _, e := range nodes {
			if e.Name == m.self || e.WireGuardKey == "" {
				continue
			}
			key, err := identity.ParseKey(e.WireGuardKey)
			if err != nil {
				m.logger.Warn("relay directory entry ignored: bad key", "relay", i, "node", e.Name, "err", err)
				continue
			}
			p, ok := dir.byName[e.Name]
			if !ok {
				addr, err := identity.OverlayAddr(m.prefix, key)
				if err != nil {
					continue
				}
				p = &peer{name: e.Name, key: key, overlay: addr}
				dir.byName[e.Name] = p
			} else if p.key != key {
				m.logger.Warn("relay and catalog disagree on a node's key: keeping the catalog's", "relay", i, "node", e.Name)
				continue
			}
			for _, a := range e.LAN {
				if !containsAddrPort(p.lan, a) {
					p.lan = append(p.lan, a)
				}
			}
			if !p.reflexive.IsValid() && e.Reflexive.IsValid() {
				p.reflexive = e.Reflexive
			}
			p.relays = append(p.relays, path.RelayRoute{Relay: i, ID: e.ID})
		}
	}
}

func containsAddrPort(list []netip.AddrPort, a netip.AddrPort) bool {
	for _, x := range list {
		if x == a {
			return true
		}
	}
	return false
}

// lanEndpoints are the endpoints the catalog's Node object for this node lists, when it lists
// any, else interfaceEndpoints.
func (m *mesh) lanEndpoints() []netip.AddrPort {
	m.mu.Lock()
	for _, n := range m.snap.Nodes {
		if n.Name == m.self && len(n.Endpoints) > 0 {
			eps := append([]netip.AddrPort(nil), n.Endpoints...)
			m.mu.Unlock()
			return eps
		}
	}
	m.mu.Unlock()
	return m.interfaceEndpoints()
}

// interfaceEndpoints are the addresses of this node's WireGuard socket on its own networks: every
// global unicast or private address of an interface that is up, except the TUN itself and the
// overlay range, with the listen port. This is what the node publishes about itself.
func (m *mesh) interfaceEndpoints() []netip.AddrPort {
	ips, err := path.InterfacePrefixes()
	if err != nil {
		m.logger.Warn("list interfaces for LAN addresses", "err", err)
		return nil
	}
	var out []netip.AddrPort
	for _, ip := range ips {
		a := ip.Prefix.Addr()
		if ip.Interface == m.tunName || !a.IsGlobalUnicast() || m.prefix.Contains(a) {
			continue
		}
		out = append(out, netip.AddrPortFrom(a, m.listenPt))
	}
	return out
}

// ping probes node through the path manager.
func (m *mesh) ping(ctx context.Context, node string, count int, untilDirect bool, each func(control.PingResult)) error {
	if _, ok := m.dir.Load().byName[node]; !ok {
		return fmt.Errorf("unknown node %q: not a peer of this node (see meshctl wg show)", node)
	}
	return m.paths.Ping(ctx, node, count, untilDirect, func(r path.PingResult) {
		res := control.PingResult{Seq: r.Seq, Node: node, Path: string(r.Kind), Addr: r.Addr,
			RTTMs: float64(r.RTT.Microseconds()) / 1000}
		if r.Err != nil {
			res.Error = r.Err.Error()
		}
		each(res)
	})
}

// pathsByKey returns the path manager's view of each peer, by WireGuard key (base64).
func (m *mesh) pathsByKey() map[string]path.PeerPath {
	out := make(map[string]path.PeerPath)
	if m.paths == nil {
		return out
	}
	for _, p := range m.paths.Paths() {
		out[base64.StdEncoding.EncodeToString(p.Key[:])] = p
	}
	return out
}

// relayStatus describes the relay registrations for `meshctl status`.
func (m *mesh) relayStatus() []string {
	if m.relays == nil {
		return nil
	}
	var out []string
	for _, s := range m.relays.Sessions() {
		out = append(out, fmt.Sprintf("%s (udp %s, id %d)", s.Addr, s.UDPAddr, s.ID))
	}
	if len(out) == 0 {
		out = append(out, "registering with "+strings.Join(m.relayAddrs, ", "))
	}
	return out
}
