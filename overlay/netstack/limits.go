package netstack

import (
	"errors"
	"log/slog"
	"net/netip"

	"github.com/edgewire/edgewire/overlay/internal/flows"
)

// flowDefaults fills in the zero flow caps of cfg, whose UDPIdleTimeout is already set.
func flowDefaults(cfg Config) Config {
	caps := flows.Caps{TCP: cfg.MaxTCPFlows, UDP: cfg.MaxUDPFlows,
		TCPPerOne: cfg.MaxTCPFlowsPerClient, UDPPerOne: cfg.MaxUDPFlowsPerClient}.WithDefaults(4)
	cfg.MaxTCPFlows, cfg.MaxUDPFlows = caps.TCP, caps.UDP
	cfg.MaxTCPFlowsPerClient, cfg.MaxUDPFlowsPerClient = caps.TCPPerOne, caps.UDPPerOne
	if cfg.UDPEvictIdle <= 0 {
		cfg.UDPEvictIdle = cfg.UDPIdleTimeout / 4
	}
	if cfg.UDPQueueBytes <= 0 {
		cfg.UDPQueueBytes = DefaultUDPQueueBytes
	}
	if cfg.UDPQueueBudget <= 0 {
		cfg.UDPQueueBudget = DefaultUDPQueueBudget
	}
	return cfg
}

// countCap counts a flow refused for err, flows.ErrClientCap or flows.ErrTotalCap, in c and logs it
// (rate-limited).
func (s *Stack) countCap(c *flowCounters, proto string, src, dst netip.AddrPort, err error) {
	if errors.Is(err, flows.ErrClientCap) {
		c.capClient.Add(1)
	} else {
		c.capTotal.Add(1)
	}
	s.logf(slog.LevelWarn, proto+" flow over the cap, refused", "src", src, "dst", dst, "err", err)
}

// LastActive implements flows.Flow for the UDP flow table.
func (f *flow) LastActive() int64 { return f.lastActive.Load() }

// udpSnapshot returns the UDP FlowStats, with the queue drops of the flows still open.
func (s *Stack) udpSnapshot() FlowStats {
	st := snapshot(&s.udpStats, s.udpTable)
	s.mu.Lock()
	defer s.mu.Unlock()
	for f := range s.flows {
		if c, ok := f.client.(*clientUDP); ok {
			st.QueueDrops += c.queueDrops()
		}
	}
	return st
}

// reserveUDPQueue returns the queue size of a new UDP flow: UDPQueueBytes while the open flows'
// queues stay within UDPQueueBudget, else MinUDPQueueBytes (or UDPQueueBytes if smaller). The
// caller gives it back with releaseUDPQueue when the flow ends.
func (s *Stack) reserveUDPQueue() int {
	full := int64(s.cfg.UDPQueueBytes)
	for {
		held := s.udpQueued.Load()
		if held+full > int64(s.cfg.UDPQueueBudget) {
			small := min(full, MinUDPQueueBytes)
			s.udpQueued.Add(small)
			return int(small)
		}
		if s.udpQueued.CompareAndSwap(held, held+full) {
			return int(full)
		}
	}
}

func (s *Stack) releaseUDPQueue(size int) { s.udpQueued.Add(-int64(size)) }
