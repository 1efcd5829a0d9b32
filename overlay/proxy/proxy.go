// Package proxy owns the service table and the load balancer of the node: for every flow that the
// service netstack terminates at a service IP:port it picks an endpoint of that service and dials it.
//
// The table is built from a discovery.Snapshot by Update and swapped atomically; DialFlow, the
// netstack's flow hook, reads it without locks. Only services with a service IP are proxied
// (headless and ExternalName services have none), and only their TCP and UDP ports.
//
// # Endpoints
//
// An endpoint is eligible for a service port when it is Ready and not Terminating, has an address,
// and has a target port for it (discovery.ServicePort.TargetFor, so a named targetPort is resolved
// per endpoint and an endpoint without that port is left out). Its address is the first of the same
// family as the service IP, else its first address. A flow to a port with no eligible endpoint is
// refused at once with ErrNoEndpoints; a flow to an unknown address or port with ErrNoService.
//
// # Policies
//
// The annotation discovery.AnnotationLBPolicy ("edgewire.io/lb-policy") on a Service chooses how
// the first endpoint of a flow is picked:
//
//   - "round-robin" (the default): one atomic counter per service port; each flow takes the next
//     endpoint.
//   - "random": a uniformly random endpoint.
//   - "source-hash": rendezvous (highest random weight) hashing of the client IP — not its port —
//     over the endpoints' address:port, so a client keeps its endpoint and removing an endpoint
//     moves only that endpoint's clients. The hash is deterministic: every node agrees.
//
// An unknown policy falls back to round-robin and is logged once per service per Update.
//
// # Locality
//
// The annotation discovery.AnnotationTopologyPreference ("edgewire.io/topology-preference") set to
// "local" makes the policy pick among the endpoints on the agent's own node (Config.LocalNode) while
// any is eligible; the endpoints on other nodes follow them as candidates, so a failure still falls
// over to another node.
//
// A policy yields an ordered list of candidates: its pick, then the other endpoints in policy
// order (the following ones in the rotation, or descending hash weight for source-hash).
//
// # Session affinity
//
// `sessionAffinity: ClientIP` overrides the policy: a client IP whose last flow to the service port
// was within the affinity timeout (Kubernetes' default of 3 h when zero) goes to the endpoint that
// answered that flow, if it is still eligible. Affinity is kept per service port, as kube-proxy
// does, in a map bounded to MaxAffinityEntries clients whose expired entries are swept lazily when
// it grows; it survives Update for endpoints still present.
//
// # Failures and ejection
//
// DialFlow tries the candidates in order within the deadline of its context, bounding each attempt
// by Config.AttemptTimeout (and the remaining deadline), so one black-holed endpoint cannot eat the
// whole deadline. A failed dial (refused, timed out, unreachable; one cut short by the flow's
// deadline too, but not one cut short because the caller cancelled the flow) ejects its endpoint
// address:port for a back-off of Config.EjectBase, doubling with each consecutive failure up to
// Config.EjectMax; a successful dial ends the ejection and resets the back-off. Ejected endpoints
// stay candidates, after all the others: a service whose endpoints are all ejected is still tried
// rather than refused. Ejection state is shared by every service that targets the same
// address:port and survives Update. Affinity follows the endpoint that actually answered.
//
// Stats counts flows by outcome and Services shows the table with per-endpoint flow counters and
// ejections, for `meshctl services`. The fake dialer for tests is in package proxytest.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edgewire/edgewire/discovery"
)

// Errors returned by DialFlow, wrapped with what was asked; test them with errors.Is.
var (
	// ErrNoService: no proxied service has the flow's destination address, port and protocol.
	ErrNoService = errors.New("no service")
	// ErrNoEndpoints: the service port has no eligible endpoint.
	ErrNoEndpoints = errors.New("no eligible endpoints")
	// ErrDialFailed: every candidate endpoint failed (the last failure is wrapped too).
	ErrDialFailed = errors.New("all endpoints failed")
)

// Defaults for the zero values of Config.
const (
	DefaultAttemptTimeout = 1 * time.Second
	DefaultEjectBase      = 1 * time.Second
	DefaultEjectMax       = 30 * time.Second
)

// MaxAffinityEntries bounds the client IPs remembered per service port for session affinity. When
// the map is full after sweeping expired entries, an arbitrary entry is dropped.
const MaxAffinityEntries = 1 << 16

// EndpointDialer opens the upstream connection of a flow to one endpoint.
//
// DialEndpoint dials addr (ep's chosen address and resolved target port) over proto (TCP or UDP),
// honouring ctx's deadline and cancellation. For UDP it returns a connected datagram conn that keeps
// message boundaries. ep must not be modified. It is called concurrently.
type EndpointDialer interface {
	DialEndpoint(ctx context.Context, proto discovery.Protocol, ep *discovery.Endpoint, addr netip.AddrPort) (net.Conn, error)
}

// Config configures a Proxy. Every zero value has a usable meaning.
type Config struct {
	// Logger receives the proxy's logs; nil discards them.
	Logger *slog.Logger
	// Dialer dials endpoints; nil dials them with plain kernel sockets (net.Dialer), which reaches
	// local endpoints and those reachable by routing.
	Dialer EndpointDialer
	// LocalNode is the name of this agent's node: with the annotation
	// discovery.AnnotationTopologyPreference "local", endpoints whose NodeName is LocalNode are tried
	// before the others. Empty: no endpoint counts as local.
	LocalNode string
	// AttemptTimeout bounds one dial attempt; zero means DefaultAttemptTimeout.
	AttemptTimeout time.Duration
	// EjectBase is the ejection after a first failure, doubling with each consecutive one up to
	// EjectMax; zero means DefaultEjectBase and DefaultEjectMax.
	EjectBase, EjectMax time.Duration
	// Now tells the time for ejection and affinity; nil means time.Now.
	Now func() time.Time
	// Rand returns a uniform int in [0, n) for the random policy; nil means math/rand/v2.IntN. It is
	// called concurrently.
	Rand func(n int) int
}

// Proxy is the service table and load balancer. New starts nothing and a Proxy has nothing to
// close; its methods are safe for concurrent use.
type Proxy struct {
	log            *slog.Logger
	localNode      string
	dialer         EndpointDialer
	attemptTimeout time.Duration
	ejectBase      time.Duration
	ejectMax       time.Duration
	now            func() time.Time
	rand           func(n int) int

	table atomic.Pointer[table]
	stats counters

	// mu serialises Update and guards all following fields: the state that survives Update (with
	// what the table holds, see carry).
	mu    sync.Mutex
	ports map[portKey]*portState
}

// New returns a Proxy with an empty table.
func New(cfg Config) *Proxy {
	p := &Proxy{
		log:            cfg.Logger,
		localNode:      cfg.LocalNode,
		dialer:         cfg.Dialer,
		attemptTimeout: cfg.AttemptTimeout,
		ejectBase:      cfg.EjectBase,
		ejectMax:       cfg.EjectMax,
		now:            cfg.Now,
		rand:           cfg.Rand,
		ports:          map[portKey]*portState{},
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	p.log = p.log.With("component", "proxy")
	if p.dialer == nil {
		p.dialer = kernelDialer{}
	}
	if p.attemptTimeout <= 0 {
		p.attemptTimeout = DefaultAttemptTimeout
	}
	if p.ejectBase <= 0 {
		p.ejectBase = DefaultEjectBase
	}
	if p.ejectMax <= 0 {
		p.ejectMax = DefaultEjectMax
	}
	if p.ejectMax < p.ejectBase {
		p.ejectMax = p.ejectBase
	}
	if p.now == nil {
		p.now = time.Now
	}
	if p.rand == nil {
		p.rand = rand.IntN
	}
	p.table.Store(&table{})
	return p
}

// Update replaces the service table with the services of snap (nil means an empty catalog). Flows
// already dialled are not affected; ejection, affinity and flow counters of endpoints still present
// carry over.
func (p *Proxy) Update(snap *discovery.Snapshot) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.table.Store(p.buildTableLocked(snap))
}

// AdmitFlow reports, without dialling, whether a flow to dst has anywhere to go: ErrNoService when no
// service has dst's IP and port for proto, ErrNoEndpoints when it has no endpoint to try. The service
// netstack asks it before it completes a TCP client's handshake (while DialFlow dials), so that those
// flows are refused at once. A refusal is counted as DialFlow counts it.
func (p *Proxy) AdmitFlow(proto discovery.Protocol, src, dst netip.AddrPort) error {
	_, err := p.admit(proto, dst)
	return err
}

// admit looks dst up: its service port, or ErrNoService or ErrNoEndpoints, counted.
func (p *Proxy) admit(proto discovery.Protocol, dst netip.AddrPort) (*svcPort, error) {
	sp := p.table.Load().lookup(dst, proto)
	if sp == nil {
		p.stats.noService.Add(1)
		return nil, fmt.Errorf("%w at %s/%s", ErrNoService, dst, proto)
	}
	if len(sp.targets) == 0 {
		p.stats.noEndpoints.Add(1)
		return nil, fmt.Errorf("service %s port %d/%s: %w", sp.svc.Key(), sp.port.Port, proto, ErrNoEndpoints)
	}
	return sp, nil
}

// DialFlow is the netstack's flow hook: it is called once per new TCP connection (once AdmitFlow has
// admitted it, while the netstack completes the client's handshake) and once per new UDP flow from
// src to the service address dst. It picks an endpoint of the service and returns a connection to
// it; an error refuses the flow (for TCP, by resetting the client's connection). ctx carries the
// connect deadline.
func (p *Proxy) DialFlow(ctx context.Context, proto discovery.Protocol, src, dst netip.AddrPort) (net.Conn, error) {
	sp, err := p.admit(proto, dst)
	if err != nil {
		return nil, err
	}

	client := src.Addr().Unmap()
	var buf [inlineTargets]*target
	cands := p.candidates(buf[:0], sp, client)

	var lastErr error
	tried := 0
	for _, tg := range cands {
		if ctx.Err() != nil {
			break
		}
		if tried > 0 {
			p.stats.retries.Add(1)
		}
		tried++
		conn, err := p.attempt(ctx, proto, tg)
		if err == nil {
			tg.flows.Add(1)
			if tg.backend.succeeded() {
				p.log.Info("endpoint recovered", "service", sp.svc.Key(), "endpoint", tg.addr)
			}
			if sp.affinity != nil {
				sp.affinity.record(client, tg.addr, p.now(), sp.affinityTimeout)
			}
			p.stats.ok.Add(1)
			return conn, nil
		}
		p.stats.dialFailures.Add(1)
		lastErr = err
		if !errors.Is(ctx.Err(), context.Canceled) {
			if d, first := tg.backend.failed(p.now(), p.ejectBase, p.ejectMax); first {
				p.log.Warn("endpoint ejected", "service", sp.svc.Key(), "endpoint", tg.addr, "for", d, "err", err)
			}
		}
	}
	p.stats.failed.Add(1)
	if lastErr == nil {
		lastErr = ctx.Err()
	}
	return nil, fmt.Errorf("service %s port %d/%s: %w (%d of %d tried): %w",
		sp.svc.Key(), sp.port.Port, proto, ErrDialFailed, tried, len(cands), lastErr)
}

// attempt dials one candidate, bounded by the attempt timeout and ctx.
func (p *Proxy) attempt(ctx context.Context, proto discovery.Protocol, tg *target) (net.Conn, error) {
	actx, cancel := context.WithTimeout(ctx, p.attemptTimeout)
	defer cancel()
	conn, err := p.dialer.DialEndpoint(actx, proto, tg.ep, tg.addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s %s: %w", proto, tg.addr, err)
	}
	return conn, nil
}

// kernelDialer dials endpoints with plain kernel sockets.
type kernelDialer struct{}

func (kernelDialer) DialEndpoint(ctx context.Context, proto discovery.Protocol, _ *discovery.Endpoint, addr netip.AddrPort) (net.Conn, error) {
	var network string
	switch proto {
	case discovery.TCP:
		network = "tcp"
	case discovery.UDP:
		network = "udp"
	default:
		return nil, fmt.Errorf("protocol %q not supported", proto)
	}
	var d net.Dialer
	return d.DialContext(ctx, network, addr.String())
}
