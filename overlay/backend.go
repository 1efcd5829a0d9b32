package overlay

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/edgewire/edgewire/discovery"
	"github.com/edgewire/edgewire/dns"
	"github.com/edgewire/edgewire/overlay/control"
	"github.com/edgewire/edgewire/overlay/forward"
	"github.com/edgewire/edgewire/overlay/netstack"
	"github.com/edgewire/edgewire/overlay/proxy"
	"github.com/edgewire/edgewire/overlay/sysres"
)

// backend is the Agent seen by the control socket.
type backend Agent

var _ control.Backend = (*backend)(nil)

func (b *backend) Status() control.Status {
	a := (*Agent)(b)
	s := a.snap.Load()
	st := control.Status{
		Node:          a.cfg.NodeName,
		Version:       Version,
		ServiceCIDR:   a.cfg.ServiceCIDR.String(),
		DNSIP:         a.cfg.DNSIP.String(),
		ClusterDomain: a.cfg.ClusterDomain,
		TUN:           a.cfg.TUNName,
		Services:      len(s.Services),
		StartedAt:     a.started,
		UptimeSeconds: time.Since(a.started).Seconds(),
		CatalogSource: a.cfg.SourceName,
		Upstreams:     a.cfg.Upstreams,
	}
	if t := a.snapTime.Load(); t != nil {
		st.CatalogUpdatedAt = *t
	}
	for _, svc := range s.Services {
		st.Endpoints += len(svc.Endpoints)
		for _, ep := range svc.Endpoints {
			if ep.Ready && !ep.Terminating {
				st.ReadyEndpoints++
			}
		}
	}
	ps := a.proxy.Stats()
	st.Flows = control.FlowStats{
		OK:           ps.OK,
		NoService:    ps.NoService,
		NoEndpoints:  ps.NoEndpoints,
		DialFailures: ps.DialFailures,
		Retries:      ps.Retries,
	}
	if stack := a.stack.Load(); stack != nil {
		ns := stack.Stats()
		st.Flows.ActiveTCP = int64(ns.TCP.Active)
		st.Flows.ActiveUDP = int64(ns.UDP.Active)
		st.Limits.Flows = flowLimits(ns)
	}
	if m := a.meshP.Load(); m != nil {
		if wg, err := b.WireGuard(); err == nil {
			st.PublicKey, st.Overlay, st.ListenPort, st.Peers = wg.PublicKey, wg.Overlay, wg.ListenPort, wg.Peers
		}
		st.Relays = m.relayStatus()
		if m.listener != nil {
			fs := m.listener.Stats()
			st.Forward = control.ForwardStats{TCPAccepted: fs.TCPAccepted, UDPAccepted: fs.UDPAccepted,
				Refused: fs.Refused, BadHeader: fs.BadHeader, DialFailures: fs.DialFailures}
			st.Limits.Forward = forwardLimits(fs)
		}
		ds := m.dialer.Stats()
		st.Forward.SpareDials, st.Forward.FreshDials, st.Forward.EarlyDials = ds.SpareDials, ds.FreshDials, ds.EarlyDials
		if m.bind != nil {
			bs := m.bind.Stats()
			st.DroppedDatagrams = bs.OtherDropped + bs.RelayedInDropped
		}
		if r := m.paths.Reflexive(); r.IsValid() {
			st.Reflexive = r.String()
		}
	}
	st.Process = processStats()
	st.Process.MemoryReleases = a.releaseCount()
	if m := a.meshP.Load(); m != nil {
		st.Process.WireGuardBuffers, st.Process.WireGuardBuffersMax = m.buffers.inUse(), m.buffers.max
		st.Process.WireGuardFlushes = m.buffers.flushes.Load()
	}
	ds := a.dns.Stats()
	st.DNS = control.DNSStats{
		Queries:   ds.Queries,
		Cluster:   ds.Cluster,
		NXDomain:  ds.NXDomain,
		Forwarded: ds.Forwarded,
		CacheHits: ds.CacheHits,
		FormErr:   ds.FormErr,
		ServFail:  ds.ServFail,
	}
	st.Limits.DNS = dnsLimits(ds)
	return st
}

// flowLimits are the service netstack's caps and refusals.
func flowLimits(ns netstack.Stats) control.FlowLimits {
	flowCap := func(fs netstack.FlowStats) control.FlowCap {
		return control.FlowCap{
			Held: fs.Held, Max: fs.Max, MaxPerClient: fs.MaxPerClient,
			RefusedPerClient: fs.CapClient, RefusedTotal: fs.CapTotal,
			Evicted: fs.Evicted, QueueDrops: fs.QueueDrops,
		}
	}
	return control.FlowLimits{TCP: flowCap(ns.TCP), UDP: flowCap(ns.UDP)}
}

// forwardLimits are the forward listener's caps and refusals.
func forwardLimits(fs forward.Stats) control.ForwardLimits {
	return control.ForwardLimits{
		TCPHeld: fs.TCPConns, MaxTCP: fs.MaxTCPFlows, MaxTCPPerPeer: fs.MaxTCPFlowsPerPeer,
		TCPBusyPerPeer: fs.TCPBusyPeer, TCPBusyTotal: fs.TCPBusyTotal,
		UDPHeld: fs.ActiveUDP, MaxUDP: fs.MaxUDPFlows, MaxUDPPerPeer: fs.MaxUDPFlowsPerPeer,
		UDPCapPerPeer: fs.UDPCapPeer, UDPCapTotal: fs.UDPCapTotal, UDPEvicted: fs.UDPEvicted,
	}
}

// dnsLimits are the DNS server's drops and refusals.
func dnsLimits(ds dns.Stats) control.DNSLimits {
	return control.DNSLimits{
		RateLimited: ds.RateLimited, Untracked: ds.Untracked, Policed: ds.Policed,
		QueueFull: ds.QueueFull, Expired: ds.Expired,
		ForwardRefused: ds.ForwardRefused, Coalesced: ds.Coalesced,
		TCPRefused:   ds.TCPRefused,
		ReplyDropped: ds.ReplyDropped, Dropped: ds.Dropped, ReadErrors: ds.ReadErrors,
	}
}

func (b *backend) Services() []control.Service {
	a := (*Agent)(b)
	s := a.snap.Load()
	type epKey struct {
		svc  string
		addr netip.Addr
	}
	live := make(map[epKey]proxy.EndpointStatus)
	policies := make(map[string]string)
	for _, ps := range a.proxy.Services() {
		key := ps.Namespace + "/" + ps.Name
		policies[key] = string(ps.Policy)
		for _, ep := range ps.Endpoints {
			live[epKey{key, ep.Address}] = ep
		}
	}
	out := make([]control.Service, 0, len(s.Services))
	for _, svc := range s.Services {
		cs := control.Service{
			Namespace: svc.Namespace,
			Name:      svc.Name,
			Headless:  svc.Headless,
			Policy:    policies[svc.Key()],
			Endpoints: []control.EndpointInfo{},
		}
		if svc.IP.IsValid() {
			cs.IP = svc.IP.String()
		}
		if svc.ExternalName != "" {
			cs.Policy = "external-name:" + svc.ExternalName
		}
		for _, p := range svc.Ports {
			cs.Ports = append(cs.Ports, control.Port{
				Name: p.Name, Protocol: string(p.Protocol), Port: p.Port, TargetPort: targetPortString(p),
			})
		}
		for _, ep := range svc.Endpoints {
			cs.Total++
			if ep.Ready && !ep.Terminating {
				cs.Ready++
			}
			for _, addr := range ep.Addresses {
				info := control.EndpointInfo{
					Address: addr.String(), Node: ep.NodeName, Ready: ep.Ready, Terminating: ep.Terminating,
				}
				if pe, ok := live[epKey{svc.Key(), addr}]; ok {
					info.Flows = pe.Flows
					for _, tg := range pe.Targets {
						if tg.EjectedUntil.After(info.EjectedUntil) {
							info.EjectedUntil = tg.EjectedUntil
						}
					}
				}
				cs.Endpoints = append(cs.Endpoints, info)
			}
		}
		out = append(out, cs)
	}
	return out
}

func targetPortString(p discovery.ServicePort) string {
	switch {
	case p.TargetPortName != "":
		return p.TargetPortName
	case p.TargetPort != 0:
		return strconv.Itoa(int(p.TargetPort))
	default:
		return ""
	}
}

func (b *backend) Resolve(ctx context.Context, name, qtype string) (control.Resolution, error) {
	a := (*Agent)(b)
	t, ok := mdns.StringToType[strings.ToUpper(qtype)]
	if !ok {
		return control.Resolution{}, fmt.Errorf("unknown query type %q (try A, AAAA, SRV, PTR, CNAME, TXT)", qtype)
	}
	if strings.ToUpper(qtype) == "PTR" {
		if rev, err := mdns.ReverseAddr(name); err == nil {
			name = rev
		}
	}
	m, err := a.dns.Lookup(ctx, mdns.Fqdn(name), t)
	if err != nil {
		return control.Resolution{}, fmt.Errorf("resolve %s %s: %w", name, qtype, err)
	}
	res := control.Resolution{Name: mdns.Fqdn(name), Type: strings.ToUpper(qtype), Rcode: mdns.RcodeToString[m.Rcode]}
	res.Answer = rrStrings(m.Answer)
	res.Authority = rrStrings(m.Ns)
	for _, rr := range m.Extra {
		if rr.Header().Rrtype != mdns.TypeOPT {
			res.Additional = append(res.Additional, rr.String())
		}
	}
	return res, nil
}

func rrStrings(rrs []mdns.RR) []string {
	out := make([]string, 0, len(rrs))
	for _, rr := range rrs {
		out = append(out, rr.String())
	}
	return out
}

func (b *backend) Down() { (*Agent)(b).Down() }

func (b *backend) WireGuard() (control.WireGuard, error) {
	m := (*Agent)(b).meshP.Load()
	if m == nil {
		return control.WireGuard{}, errors.New("wireguard is not up yet")
	}
	di, err := m.info()
	if err != nil {
		return control.WireGuard{}, err
	}
	wg := control.WireGuard{
		Interface: di.Interface, PublicKey: di.PublicKey, ListenPort: di.ListenPort, Overlay: di.Overlay,
		Peers: make([]control.WGPeer, 0, len(di.Peers)),
	}
	paths := m.pathsByKey()
	for _, p := range di.Peers {
		cp := control.WGPeer{
			Node: p.Node, PublicKey: p.PublicKey, Endpoint: p.Endpoint, AllowedIPs: p.AllowedIPs,
			RxBytes: p.RxBytes, TxBytes: p.TxBytes, PersistentKeepalive: p.Keepalive,
		}
		if pp, ok := paths[p.PublicKey]; ok {
			cp.Path, cp.PathAddr = string(pp.Kind), pp.Addr
			cp.RTTMs = float64(pp.RTT.Microseconds()) / 1000
		}
		if p.LastHandshake > 0 {
			cp.LatestHandshake = time.Unix(p.LastHandshake, 0)
		}
		wg.Peers = append(wg.Peers, cp)
	}
	return wg, nil
}

func (b *backend) Ping(ctx context.Context, node string, count int, untilDirect bool, each func(control.PingResult)) error {
	m := (*Agent)(b).meshP.Load()
	if m == nil {
		return errors.New("wireguard is not up yet")
	}
	return m.ping(ctx, node, count, untilDirect, each)
}

// processStats reads the agent process's resources and limits.
func processStats() control.ProcessStats {
	u := sysres.ReadUsage()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	ps := control.ProcessStats{
		RSSBytes: u.RSSBytes, PeakRSSBytes: u.PeakRSS, HeapBytes: ms.HeapInuse,
		Goroutines: u.Goroutines, GOMAXPROCS: runtime.GOMAXPROCS(0),
		OpenFiles: u.OpenFiles, FileLimit: sysres.NoFile(),
	}
	if l := debug.SetMemoryLimit(-1); l != math.MaxInt64 {
		ps.GoMemLimit = l
	}
	return ps
}
