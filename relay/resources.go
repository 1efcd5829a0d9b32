package relay

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/connmgr"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/x/rate"
	ma "github.com/multiformats/go-multiaddr"
)

// What the relay's libp2p host may hold. libp2p's defaults scale with the machine's memory, not
// the relay's (a cgroup limit is ignored), admit only 8 connections per source address with a
// new one every 5 s (so a site of nodes behind one NAT could not all register), and trim
// connections beyond 192, registered or not. The relay sets its own, derived from Limits:
//
//   - every connection and stream of the relay is sized from MaxNodes (one control stream per
//     node) plus the gate's caps on unregistered peers (MaxUnauthConns, MaxUnauthStreams);
//   - a peer may have 4 inbound connections, 16 inbound streams, 4 of them control streams;
//   - one source address may hold MaxConnsPerIP connections and open ConnRatePerIP a second
//     (burst MaxUnauthConnsPerIP), loopback included (libp2p exempts it by default);
//   - yamux's receive window stays at its initial 256 KiB (libp2p lets it grow to 16 MiB): control
//     frames are small, and a stream can then buffer at most 256 KiB, which the resource manager
//     reserves for it when the stream opens;
//   - no connection manager trims connections: the gate closes those on which no node registers,
//     and registered nodes keep theirs.
//
// Whatever the resource manager refuses is counted by scope (metrics.libp2pRefused).

// Per-peer limits of the relay's host.
const (
	peerConnsInbound   = 4
	peerStreamsInbound = 16
	peerControlStreams = 4
	// streamWindow is yamux's initial (and, on the relay, largest) receive window per stream.
	streamWindow = 256 << 10
)

// serverHostOptions are the libp2p options of the relay's host: hostOptions but with the relay's
// yamux configuration, its resource manager and no connection manager.
func serverHostOptions(l Limits, m *metrics) ([]libp2p.Option, error) {
	rm, err := newResourceManager(l, m)
	if err != nil {
		return nil, err
	}
	mux := *yamux.DefaultTransport
	mux.MaxStreamWindowSize = streamWindow
	return append(commonHostOptions(),
		libp2p.Muxer(yamux.ID, &mux),
		libp2p.ResourceManager(rm),
		libp2p.ConnectionManager(connmgr.NullConnMgr{}),
	), nil
}

// resourceLimits returns the resource manager's limits for l.
func resourceLimits(l Limits) rcmgr.ConcreteLimitConfig {
	conns := l.MaxNodes + l.MaxUnauthConns
	streams := peerStreamsInbound * conns
	// outbound: the relay dials no one; identify opens a stream to each peer it meets.
	const outConns = 16
	return rcmgr.PartialLimitConfig{
		System: rcmgr.ResourceLimits{
			ConnsInbound:    rcmgr.LimitVal(conns),
			ConnsOutbound:   outConns,
			Conns:           rcmgr.LimitVal(conns + outConns),
			StreamsInbound:  rcmgr.LimitVal(streams),
			StreamsOutbound: rcmgr.LimitVal(2 * conns),
			Streams:         rcmgr.LimitVal(streams + 2*conns),
			FD:              rcmgr.LimitVal(conns + outConns),
			Memory:          rcmgr.LimitVal64(int64(streams+2*conns) * streamWindow),
		},
		// Transient: connections in their handshake and streams whose protocol is being
		// negotiated, before either belongs to a peer or a protocol.
		Transient: rcmgr.ResourceLimits{
			ConnsInbound:    rcmgr.LimitVal(l.MaxUnauthConns),
			ConnsOutbound:   outConns,
			Conns:           rcmgr.LimitVal(l.MaxUnauthConns + outConns),
			StreamsInbound:  rcmgr.LimitVal(l.MaxUnauthStreams),
			StreamsOutbound: rcmgr.LimitVal(l.MaxUnauthStreams),
			Streams:         rcmgr.LimitVal(2 * l.MaxUnauthStreams),
			FD:              rcmgr.LimitVal(l.MaxUnauthConns + outConns),
			Memory:          rcmgr.LimitVal64(int64(2*l.MaxUnauthStreams) * streamWindow),
		},
		ServiceDefault: rcmgr.ResourceLimits{
			StreamsInbound: rcmgr.LimitVal(streams), StreamsOutbound: rcmgr.LimitVal(2 * conns),
			Streams: rcmgr.LimitVal(streams + 2*conns), Memory: rcmgr.LimitVal64(int64(streams) * streamWindow),
		},
		ServicePeerDefault: rcmgr.ResourceLimits{
			StreamsInbound: peerStreamsInbound, StreamsOutbound: peerStreamsInbound, Streams: 2 * peerStreamsInbound,
			Memory: 2 * peerStreamsInbound * streamWindow,
		},
		ProtocolDefault: rcmgr.ResourceLimits{
			StreamsInbound: rcmgr.LimitVal(streams), StreamsOutbound: rcmgr.LimitVal(2 * conns),
			Streams: rcmgr.LimitVal(streams + 2*conns), Memory: rcmgr.LimitVal64(int64(streams) * streamWindow),
		},
		Protocol: map[protocol.ID]rcmgr.ResourceLimits{
			ProtocolID: {
				StreamsInbound: rcmgr.LimitVal(l.MaxNodes + l.MaxUnauthStreams), StreamsOutbound: rcmgr.BlockAllLimit,
				Streams: rcmgr.LimitVal(l.MaxNodes + l.MaxUnauthStreams),
				Memory:  rcmgr.LimitVal64(int64(l.MaxNodes+l.MaxUnauthStreams) * streamWindow),
			},
		},
		ProtocolPeerDefault: rcmgr.ResourceLimits{
			StreamsInbound: peerStreamsInbound, StreamsOutbound: peerStreamsInbound, Streams: 2 * peerStreamsInbound,
			Memory: 2 * peerStreamsInbound * streamWindow,
		},
		ProtocolPeer: map[protocol.ID]rcmgr.ResourceLimits{
			ProtocolID: {
				StreamsInbound: peerControlStreams, StreamsOutbound: rcmgr.BlockAllLimit, Streams: peerControlStreams,
				Memory: peerControlStreams * streamWindow,
			},
		},
		PeerDefault: rcmgr.ResourceLimits{
			ConnsInbound:    peerConnsInbound,
			ConnsOutbound:   peerConnsInbound,
			Conns:           2 * peerConnsInbound,
			StreamsInbound:  peerStreamsInbound,
			StreamsOutbound: peerStreamsInbound,
			Streams:         2 * peerStreamsInbound,
			FD:              2 * peerConnsInbound,
			Memory:          2 * peerStreamsInbound * streamWindow,
		},
		Conn: rcmgr.ResourceLimits{
			ConnsInbound: 1, ConnsOutbound: 1, Conns: 1, FD: 1,
			Memory: 2 * peerStreamsInbound * streamWindow,
		},
		Stream: rcmgr.ResourceLimits{
			StreamsInbound: 1, StreamsOutbound: 1, Streams: 1,
			Memory: streamWindow,
		},
		// Scale(0, 0) takes libp2p's base limits, whatever the machine, for anything left unset.
	}.Build(rcmgr.DefaultLimits.Scale(0, 0))
}

// newResourceManager returns the relay host's resource manager: resourceLimits, per-address
// connection limits and rates, and counters of what it refuses.
func newResourceManager(l Limits, m *metrics) (network.ResourceManager, error) {
	perIP4 := []rcmgr.ConnLimitPerSubnet{{PrefixLength: 32, ConnCount: l.MaxConnsPerIP}}
	perIP6 := []rcmgr.ConnLimitPerSubnet{{PrefixLength: 64, ConnCount: l.MaxConnsPerIP}}
	burst := rate.Limit{RPS: l.ConnRatePerIP, Burst: l.MaxUnauthConnsPerIP}
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(resourceLimits(l)),
		rcmgr.WithLimitPerSubnet(perIP4, perIP6),
		// Non-nil and empty: no exemption for loopback.
		rcmgr.WithNetworkPrefixLimit([]rcmgr.NetworkPrefixLimit{}, []rcmgr.NetworkPrefixLimit{}),
		rcmgr.WithConnRateLimiters(&rate.Limiter{SubnetRateLimiter: rate.SubnetLimiter{
			IPv4SubnetLimits: []rate.SubnetLimit{{PrefixLength: 32, Limit: burst}},
			IPv6SubnetLimits: []rate.SubnetLimit{{PrefixLength: 64, Limit: burst}},
			GracePeriod:      time.Minute,
		}}),
		rcmgr.WithMetrics(rmReporter{m}),
	)
	if err != nil {
		return nil, fmt.Errorf("libp2p resource manager: %w", err)
	}
	return countingRM{ResourceManager: rm, m: m}, nil
}

// countingRM counts the connections the resource manager refuses before any scope sees them (per
// address and rate), which its metrics reporter does not report.
type countingRM struct {
	network.ResourceManager
	m *metrics
}

func (r countingRM) OpenConnection(dir network.Direction, usefd bool, endpoint ma.Multiaddr) (network.ConnManagementScope, error) {
	scope, err := r.ResourceManager.OpenConnection(dir, usefd, endpoint)
	if err != nil && !errors.Is(err, network.ErrResourceLimitExceeded) {
		// The resource manager's two refusals that are not scope limits; the scope limits are
		// counted by rmReporter.BlockConn.
		if strings.Contains(err.Error(), "per ip") {
			r.m.libp2pRefused[rmConnPerIP].Add(1)
		} else {
			r.m.libp2pRefused[rmConnRate].Add(1)
		}
	}
	return scope, err
}

// rmReporter counts the resource manager's refusals by scope.
type rmReporter struct{ m *metrics }

var _ rcmgr.MetricsReporter = rmReporter{}

func (r rmReporter) AllowConn(network.Direction, bool)      {}
func (r rmReporter) BlockConn(network.Direction, bool)      { r.m.libp2pRefused[rmConn].Add(1) }
func (r rmReporter) AllowStream(peer.ID, network.Direction) {}
func (r rmReporter) BlockStream(peer.ID, network.Direction) { r.m.libp2pRefused[rmStream].Add(1) }
func (r rmReporter) AllowPeer(peer.ID)                      {}
func (r rmReporter) BlockPeer(peer.ID)                      { r.m.libp2pRefused[rmPeer].Add(1) }
func (r rmReporter) AllowProtocol(protocol.ID)              {}
func (r rmReporter) BlockProtocol(protocol.ID)              { r.m.libp2pRefused[rmProtocol].Add(1) }
func (r rmReporter) BlockProtocolPeer(protocol.ID, peer.ID) { r.m.libp2pRefused[rmProtocolPeer].Add(1) }
func (r rmReporter) AllowService(string)                    {}
func (r rmReporter) BlockService(string)                    { r.m.libp2pRefused[rmService].Add(1) }
func (r rmReporter) BlockServicePeer(string, peer.ID)       { r.m.libp2pRefused[rmServicePeer].Add(1) }
func (r rmReporter) AllowMemory(int)                        {}
func (r rmReporter) BlockMemory(int)                        { r.m.libp2pRefused[rmMemory].Add(1) }
