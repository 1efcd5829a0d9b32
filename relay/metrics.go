package relay

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"sort"
	"sync/atomic"
)

// Reasons a UDP frame is dropped.
const (
	dropMalformed   = "malformed"
	dropUnknownType = "unknown_type"
	dropUnknownNode = "unknown_node"
	dropBadMAC      = "bad_mac"
	dropUnbound     = "unbound_source"
	dropNoDest      = "unknown_destination"
	dropDestUnbound = "destination_unbound"
	dropRateLimited = "rate_limited"
	dropWriteError  = "write_error"
)

// Reasons a registration is refused or a control stream closed.
const (
	refuseBadProof   = "bad_proof"
	refuseACL        = "acl"
	refuseBound      = "name_bound"
	refuseMalformed  = "malformed"
	refuseFull       = "full"
	refuseNoRegister = "no_register"
	refuseTimeout    = "timeout"
	refuseTooLarge   = "frame_too_large"
	refuseInternal   = "internal"
)

// Reasons a frame for a registered node's control stream is dropped.
const dropQueueFull = "queue_full"

// Scopes of libp2p's resource manager that refused something (resources.go).
const (
	rmConn         = "conn"
	rmConnPerIP    = "conn_per_ip"
	rmConnRate     = "conn_rate"
	rmStream       = "stream"
	rmPeer         = "peer"
	rmProtocol     = "protocol"
	rmProtocolPeer = "protocol_peer"
	rmService      = "service"
	rmServicePeer  = "service_peer"
	rmMemory       = "memory"
)

// metrics are the server's counters; the maps are filled in newMetrics and never change after.
type metrics struct {
	udpIn        map[byte]*atomic.Uint64 // by frame type; 0 = not a frame
	udpOut       map[byte]*atomic.Uint64
	udpDropped   map[string]*atomic.Uint64
	bytesRelayed atomic.Uint64
	refused      map[string]*atomic.Uint64
	registered   atomic.Uint64 // successful registrations
	streamBad    atomic.Uint64 // malformed frames on registered streams
	punches      atomic.Uint64
	punchDropped atomic.Uint64
	slowStreams  atomic.Uint64 // control streams closed because a write timed out
	// unauthRefused counts connections and streams of unregistered peers refused or closed by
	// the gate (gate.go), by reason; libp2pRefused what libp2p's resource manager refused, by
	// scope.
	unauthRefused  map[string]*atomic.Uint64
	libp2pRefused  map[string]*atomic.Uint64
	controlDropped map[string]*atomic.Uint64 // frames for registered nodes dropped, by reason
	dirSuperseded  atomic.Uint64             // directory frames replaced by a newer one before being written
}

func newMetrics() *metrics {
	m := &metrics{
		udpIn:      map[byte]*atomic.Uint64{},
		udpOut:     map[byte]*atomic.Uint64{},
		udpDropped: map[string]*atomic.Uint64{},
		refused:    map[string]*atomic.Uint64{},

		unauthRefused:  map[string]*atomic.Uint64{},
		libp2pRefused:  map[string]*atomic.Uint64{},
		controlDropped: map[string]*atomic.Uint64{dropQueueFull: new(atomic.Uint64)},
	}
	for _, t := range []byte{0, FrameBind, FrameBindAck, FrameData, FramePing, FramePong} {
		m.udpIn[t] = new(atomic.Uint64)
		m.udpOut[t] = new(atomic.Uint64)
	}
	for _, r := range []string{dropMalformed, dropUnknownType, dropUnknownNode, dropBadMAC, dropUnbound,
		dropNoDest, dropDestUnbound, dropRateLimited, dropWriteError} {
		m.udpDropped[r] = new(atomic.Uint64)
	}
	for _, r := range []string{refuseBadProof, refuseACL, refuseBound, refuseMalformed, refuseFull,
		refuseNoRegister, refuseTimeout, refuseTooLarge, refuseInternal} {
		m.refused[r] = new(atomic.Uint64)
	}
	for _, r := range []string{gateConnsTotal, gateConnsPerIP, gateConnTimeout, gateStreamsTotal, gateStreamsPerIP} {
		m.unauthRefused[r] = new(atomic.Uint64)
	}
	for _, r := range []string{rmConn, rmConnPerIP, rmConnRate, rmStream, rmPeer, rmProtocol, rmProtocolPeer,
		rmService, rmServicePeer, rmMemory} {
		m.libp2pRefused[r] = new(atomic.Uint64)
	}
	return m
}

func (m *metrics) in(typ byte) {
	if c, ok := m.udpIn[typ]; ok {
		c.Add(1)
		return
	}
	m.udpIn[0].Add(1)
}

func (m *metrics) drop(reason string) { m.udpDropped[reason].Add(1) }

func frameName(t byte) string {
	switch t {
	case FrameBind:
		return "bind"
	case FrameBindAck:
		return "bindack"
	case FrameData:
		return "data"
	case FramePing:
		return "ping"
	case FramePong:
		return "pong"
	}
	return "other"
}

// gauges are the values writeText reports as they are now.
type gauges struct {
	nodes         int // registered nodes
	unauthConns   int // connections with no registered node
	unauthStreams int // control streams being registered
	goroutines    int
}

// writeText writes the counters in the Prometheus text exposition format.
func (m *metrics) writeText(w io.Writer, g gauges) error {
	bw := bufio.NewWriter(w)
	p := func(format string, a ...any) { fmt.Fprintf(bw, format, a...) }
	p("# HELP edgewire_relay_nodes Nodes with a live registration.\n# TYPE edgewire_relay_nodes gauge\n")
	p("edgewire_relay_nodes %d\n", g.nodes)
	p("# HELP edgewire_relay_unauth_conns libp2p connections on which no node is registered.\n# TYPE edgewire_relay_unauth_conns gauge\n")
	p("edgewire_relay_unauth_conns %d\n", g.unauthConns)
	p("# HELP edgewire_relay_unauth_streams Control streams not yet registered.\n# TYPE edgewire_relay_unauth_streams gauge\n")
	p("edgewire_relay_unauth_streams %d\n", g.unauthStreams)
	p("# HELP go_goroutines Number of goroutines that currently exist.\n# TYPE go_goroutines gauge\n")
	p("go_goroutines %d\n", g.goroutines)
	p("# HELP edgewire_relay_registrations_total Successful registrations.\n# TYPE edgewire_relay_registrations_total counter\n")
	p("edgewire_relay_registrations_total %d\n", m.registered.Load())
	p("# HELP edgewire_relay_registrations_refused_total Refused registrations by reason.\n# TYPE edgewire_relay_registrations_refused_total counter\n")
	for _, r := range sortedKeys(m.refused) {
		p("edgewire_relay_registrations_refused_total{reason=%q} %d\n", r, m.refused[r].Load())
	}
	p("# HELP edgewire_relay_control_malformed_total Malformed frames on registered control streams.\n# TYPE edgewire_relay_control_malformed_total counter\n")
	p("edgewire_relay_control_malformed_total %d\n", m.streamBad.Load())
	p("# HELP edgewire_relay_unauth_refused_total Connections and control streams of unregistered peers refused or closed, by reason.\n# TYPE edgewire_relay_unauth_refused_total counter\n")
	for _, r := range sortedKeys(m.unauthRefused) {
		p("edgewire_relay_unauth_refused_total{reason=%q} %d\n", r, m.unauthRefused[r].Load())
	}
	p("# HELP edgewire_relay_libp2p_refused_total Connections, streams and memory refused by libp2p's resource manager, by scope.\n# TYPE edgewire_relay_libp2p_refused_total counter\n")
	for _, r := range sortedKeys(m.libp2pRefused) {
		p("edgewire_relay_libp2p_refused_total{scope=%q} %d\n", r, m.libp2pRefused[r].Load())
	}
	p("# HELP edgewire_relay_control_slow_total Control streams closed because a write did not finish in time.\n# TYPE edgewire_relay_control_slow_total counter\n")
	p("edgewire_relay_control_slow_total %d\n", m.slowStreams.Load())
	p("# HELP edgewire_relay_control_dropped_total Frames for registered nodes dropped, by reason.\n# TYPE edgewire_relay_control_dropped_total counter\n")
	for _, r := range sortedKeys(m.controlDropped) {
		p("edgewire_relay_control_dropped_total{reason=%q} %d\n", r, m.controlDropped[r].Load())
	}
	p("# HELP edgewire_relay_directory_superseded_total Directory frames replaced by a newer one before being written.\n# TYPE edgewire_relay_directory_superseded_total counter\n")
	p("edgewire_relay_directory_superseded_total %d\n", m.dirSuperseded.Load())
	p("# HELP edgewire_relay_udp_frames_in_total UDP datagrams received by frame type.\n# TYPE edgewire_relay_udp_frames_in_total counter\n")
	for _, t := range sortedTypes(m.udpIn) {
		p("edgewire_relay_udp_frames_in_total{type=%q} %d\n", frameName(t), m.udpIn[t].Load())
	}
	p("# HELP edgewire_relay_udp_frames_out_total UDP datagrams sent by frame type.\n# TYPE edgewire_relay_udp_frames_out_total counter\n")
	for _, t := range sortedTypes(m.udpOut) {
		p("edgewire_relay_udp_frames_out_total{type=%q} %d\n", frameName(t), m.udpOut[t].Load())
	}
	p("# HELP edgewire_relay_udp_frames_dropped_total UDP datagrams dropped by reason.\n# TYPE edgewire_relay_udp_frames_dropped_total counter\n")
	for _, r := range sortedKeys(m.udpDropped) {
		p("edgewire_relay_udp_frames_dropped_total{reason=%q} %d\n", r, m.udpDropped[r].Load())
	}
	p("# HELP edgewire_relay_bytes_relayed_total Payload bytes of DATA frames relayed.\n# TYPE edgewire_relay_bytes_relayed_total counter\n")
	p("edgewire_relay_bytes_relayed_total %d\n", m.bytesRelayed.Load())
	p("# HELP edgewire_relay_punches_total Punches coordinated.\n# TYPE edgewire_relay_punches_total counter\n")
	p("edgewire_relay_punches_total %d\n", m.punches.Load())
	p("# HELP edgewire_relay_punches_dropped_total Punch requests refused (unknown peer or rate limit).\n# TYPE edgewire_relay_punches_dropped_total counter\n")
	p("edgewire_relay_punches_dropped_total %d\n", m.punchDropped.Load())
	return bw.Flush()
}

func sortedKeys(m map[string]*atomic.Uint64) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func sortedTypes(m map[byte]*atomic.Uint64) []byte {
	ts := make([]byte, 0, len(m))
	for t := range m {
		ts = append(ts, t)
	}
	sort.Slice(ts, func(i, j int) bool { return ts[i] < ts[j] })
	return ts
}

// metricsHandler serves /metrics.
func (s *Server) metricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		conns, streams := s.gate.counts()
		s.metrics.writeText(w, gauges{nodes: s.nodeCount(), unauthConns: conns, unauthStreams: streams,
			goroutines: runtime.NumGoroutine()})
	})
	return mux
}
