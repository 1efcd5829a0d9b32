// Package control owns the agent's local control socket: the JSON-over-HTTP protocol that `meshctl`
// verbs speak to a running `meshctl up`, its server side (Serve, over a Backend the agent implements)
// and its client side (Client).
//
// The socket is a Unix stream socket (default /run/edgewire/meshctl.sock, mode 0600: only root talks
// to the agent). Requests are plain HTTP/1.1; every response body is JSON. Endpoints:
//
//	GET  /v1/status                     → Status
//	GET  /v1/services                   → []Service
//	GET  /v1/resolve?name=N&type=T      → Resolution
//	GET  /v1/wireguard                  → WireGuard
//	POST /v1/ping?node=N&count=C&until-direct=B
//	                                    → PingResult per probe, one JSON object a line, as they come
//	POST /v1/down                       → {} and the agent shuts down
//
// Errors are answered with a non-2xx status and {"error": "..."}.
package control

import (
	"context"
	"time"
)

// Status is what `meshctl status` shows.
type Status struct {
	Node           string    `json:"node"`
	Version        string    `json:"version"`
	ServiceCIDR    string    `json:"serviceCIDR"`
	DNSIP          string    `json:"dnsIP"`
	ClusterDomain  string    `json:"clusterDomain"`
	TUN            string    `json:"tun"`
	Services       int       `json:"services"`
	Endpoints      int       `json:"endpoints"`
	ReadyEndpoints int       `json:"readyEndpoints"`
	StartedAt      time.Time `json:"startedAt"`
	UptimeSeconds  float64   `json:"uptimeSeconds"`
	// CatalogUpdatedAt is when the last snapshot was applied; CatalogSource names where it came from.
	CatalogUpdatedAt time.Time `json:"catalogUpdatedAt"`
	CatalogSource    string    `json:"catalogSource"`
	Upstreams        []string  `json:"upstreams"`
	Flows            FlowStats `json:"flows"`
	DNS              DNSStats  `json:"dns"`
	// WireGuard identity of the node and its peers.
	PublicKey  string   `json:"publicKey"`
	Overlay    string   `json:"overlay"`
	ListenPort int      `json:"listenPort"`
	Peers      []WGPeer `json:"peers"`
	// Relays are the relay registrations; Reflexive is this node's WireGuard socket as a relay sees it.
	Relays    []string `json:"relays,omitempty"`
	Reflexive string   `json:"reflexive,omitempty"`
	// Forward counts the requests other agents sent this node's forward listener.
	Forward ForwardStats `json:"forward"`
	// DroppedDatagrams counts datagrams on the WireGuard socket that were neither WireGuard nor a
	// path frame the agent could use.
	DroppedDatagrams uint64 `json:"droppedDatagrams"`
	// Process is what the agent holds of the machine, against its limits.
	Process ProcessStats `json:"process"`
	// Limits are the agent's caps on flows and DNS work, what each holds now, and what each
	// refused or dropped (docs/limits.md).
	Limits LimitStats `json:"limits"`
}

// LimitStats are the caps of the agent's flow terminators and DNS server with their refusals.
// Every counter counts since the agent started.
type LimitStats struct {
	// Flows are the service netstack's flows: those this node's applications open to services.
	Flows FlowLimits `json:"flows"`
	// Forward is the forward listener's: the flows other agents bring to this node's endpoints.
	Forward ForwardLimits `json:"forward"`
	DNS     DNSLimits     `json:"dns"`
}

// FlowLimits are the service netstack's flow caps, TCP and UDP apart.
type FlowLimits struct {
	TCP FlowCap `json:"tcp"`
	UDP FlowCap `json:"udp"`
}

// FlowCap is one protocol's flow cap in the service netstack. A client is an application's source
// address.
type FlowCap struct {
	// Held is the flows holding a slot now (those being dialled included), of at most Max in
	// total and MaxPerClient per client.
	Held         uint64 `json:"held"`
	Max          uint64 `json:"max"`
	MaxPerClient uint64 `json:"maxPerClient"`
	// RefusedPerClient counts flows refused because their client held MaxPerClient (a TCP SYN
	// answered with a RST, a UDP datagram dropped), RefusedTotal because Max were held.
	RefusedPerClient uint64 `json:"refusedPerClient"`
	RefusedTotal     uint64 `json:"refusedTotal"`
	// Evicted counts UDP flows closed to make room for a new flow of the same client; QueueDrops
	// UDP datagrams dropped because their flow's queue was full. Both are 0 for TCP.
	Evicted    uint64 `json:"evicted"`
	QueueDrops uint64 `json:"queueDrops"`
}

// ForwardLimits are the forward listener's caps. A peer is another agent (its overlay address).
type ForwardLimits struct {
	// TCPHeld is the TCP connections held now, of at most MaxTCP in total and MaxTCPPerPeer per
	// peer. TCPBusyPerPeer and TCPBusyTotal count connections answered "busy" (status 5) at either
	// cap.
	TCPHeld        uint64 `json:"tcpHeld"`
	MaxTCP         uint64 `json:"maxTCP"`
	MaxTCPPerPeer  uint64 `json:"maxTCPPerPeer"`
	TCPBusyPerPeer uint64 `json:"tcpBusyPerPeer"`
	TCPBusyTotal   uint64 `json:"tcpBusyTotal"`
	// UDPHeld is the UDP flows open now, of at most MaxUDP and MaxUDPPerPeer. UDPCapPerPeer and
	// UDPCapTotal count datagrams dropped because they would have opened a flow beyond either cap;
	// UDPEvicted counts flows closed to make room for a new flow of the same peer.
	UDPHeld       uint64 `json:"udpHeld"`
	MaxUDP        uint64 `json:"maxUDP"`
	MaxUDPPerPeer uint64 `json:"maxUDPPerPeer"`
	UDPCapPerPeer uint64 `json:"udpCapPerPeer"`
	UDPCapTotal   uint64 `json:"udpCapTotal"`
	UDPEvicted    uint64 `json:"udpEvicted"`
}

// DNSLimits count what the DNS server dropped or refused to stay within its bounds (package dns,
// Stats).
type DNSLimits struct {
	// RateLimited counts UDP datagrams dropped unread because their source was over its rate.
	// Untracked counts datagrams, dropped or not, from sources beyond those whose rates are
	// tracked: they share one rate.
	RateLimited uint64 `json:"rateLimited"`
	Untracked   uint64 `json:"untracked"`
	// Policed counts UDP datagrams dropped before the DNS socket because their source was over its
	// rate (the agent polices where datagrams arrive, so a flood does not fill the socket's buffer).
	Policed uint64 `json:"policed"`
	// QueueFull counts queries for the workers dropped because the queue was full; Expired those
	// that waited longer than their client would.
	QueueFull uint64 `json:"queueFull"`
	Expired   uint64 `json:"expired"`
	// ForwardRefused counts upstream exchanges not started because the most were in flight (the
	// query got SERVFAIL); Coalesced forwarded answers shared with an identical question in flight.
	ForwardRefused uint64 `json:"forwardRefused"`
	Coalesced      uint64 `json:"coalesced"`
	// TCPRefused counts TCP connections closed on accept because the most were open.
	TCPRefused uint64 `json:"tcpRefused"`
	// ReplyDropped counts replies not sent (the writer's queue was full or the write failed);
	// Dropped datagrams that get no reply (too short, or responses); ReadErrors failed reads.
	ReplyDropped uint64 `json:"replyDropped"`
	Dropped      uint64 `json:"dropped"`
	ReadErrors   uint64 `json:"readErrors"`
}

// ProcessStats are the agent process's resources in use and the limits in force.
type ProcessStats struct {
	RSSBytes     uint64 `json:"rssBytes"`
	PeakRSSBytes uint64 `json:"peakRSSBytes"`
	// HeapBytes is the Go heap in use; GoMemLimit the runtime's soft limit (from the cgroup or
	// GOMEMLIMIT; 0 when none).
	HeapBytes  uint64 `json:"heapBytes"`
	GoMemLimit int64  `json:"goMemLimit"`
	Goroutines int    `json:"goroutines"`
	GOMAXPROCS int    `json:"gomaxprocs"`
	OpenFiles  int    `json:"openFiles"`
	FileLimit  uint64 `json:"fileLimit"`
	// WireGuardBuffers are wireguard-go's 64 KiB packet buffers out of their pool now, of at most
	// WireGuardBuffersMax.
	WireGuardBuffers    uint32 `json:"wireguardBuffers"`
	WireGuardBuffersMax uint32 `json:"wireguardBuffersMax"`
	// WireGuardFlushes counts the times the buffers nearly ran out and the packets waiting for
	// handshakes were dropped to free them.
	WireGuardFlushes uint64 `json:"wireguardFlushes"`
	// MemoryReleases counts the times the agent returned freed memory to the kernel.
	MemoryReleases uint64 `json:"memoryReleases"`
}

// ForwardStats counts the forward listener's requests.
type ForwardStats struct {
	TCPAccepted  uint64 `json:"tcpAccepted"`
	UDPAccepted  uint64 `json:"udpAccepted"`
	Refused      uint64 `json:"refused"`
	BadHeader    uint64 `json:"badHeader"`
	DialFailures uint64 `json:"dialFailures"`
	// SpareDials and FreshDials count this node's forward dials to other nodes that used a spare
	// connection and that connected afresh.
	SpareDials uint64 `json:"spareDials"`
	FreshDials uint64 `json:"freshDials"`
	// EarlyDials counts those that sent the client's first bytes with the request, before the
	// other node's answer.
	EarlyDials uint64 `json:"earlyDials"`
}

// WireGuard is the node's WireGuard device as `wg show` sees it, with node names.
type WireGuard struct {
	Interface  string   `json:"interface"`
	PublicKey  string   `json:"publicKey"`
	ListenPort int      `json:"listenPort"`
	Overlay    string   `json:"overlay"`
	Peers      []WGPeer `json:"peers"`
}

// WGPeer is one WireGuard peer.
type WGPeer struct {
	Node                string    `json:"node,omitempty"`
	PublicKey           string    `json:"publicKey"`
	Endpoint            string    `json:"endpoint,omitempty"`
	AllowedIPs          []string  `json:"allowedIPs"`
	LatestHandshake     time.Time `json:"latestHandshake,omitzero"`
	RxBytes             uint64    `json:"rxBytes"`
	TxBytes             uint64    `json:"txBytes"`
	PersistentKeepalive int       `json:"persistentKeepalive,omitempty"`
	// Path is how the agent reaches the peer now: lan, direct, relay or none.
	Path     string  `json:"path,omitempty"`
	PathAddr string  `json:"pathAddr,omitempty"`
	RTTMs    float64 `json:"rttMs,omitempty"`
}

// PingResult is one probe of `meshctl ping`.
type PingResult struct {
	Seq   int     `json:"seq"`
	Node  string  `json:"node"`
	Path  string  `json:"path,omitempty"`
	Addr  string  `json:"addr,omitempty"`
	RTTMs float64 `json:"rttMs,omitempty"`
	Error string  `json:"error,omitempty"`
}

// FlowStats counts flows through the service proxy.
type FlowStats struct {
	OK           uint64 `json:"ok"`
	NoService    uint64 `json:"noService"`
	NoEndpoints  uint64 `json:"noEndpoints"`
	DialFailures uint64 `json:"dialFailures"`
	Retries      uint64 `json:"retries"`
	ActiveTCP    int64  `json:"activeTCP"`
	ActiveUDP    int64  `json:"activeUDP"`
}

// DNSStats counts DNS queries.
type DNSStats struct {
	Queries   uint64 `json:"queries"`
	Cluster   uint64 `json:"cluster"`
	NXDomain  uint64 `json:"nxdomain"`
	Forwarded uint64 `json:"forwarded"`
	CacheHits uint64 `json:"cacheHits"`
	FormErr   uint64 `json:"formerr"`
	ServFail  uint64 `json:"servfail"`
}

// Service is one row of `meshctl services`.
type Service struct {
	Namespace string         `json:"namespace"`
	Name      string         `json:"name"`
	IP        string         `json:"ip,omitempty"`
	Headless  bool           `json:"headless,omitempty"`
	Policy    string         `json:"policy"`
	Ports     []Port         `json:"ports"`
	Ready     int            `json:"ready"`
	Total     int            `json:"total"`
	Endpoints []EndpointInfo `json:"endpoints"`
}

// Port is a service port.
type Port struct {
	Name       string `json:"name,omitempty"`
	Protocol   string `json:"protocol"`
	Port       uint16 `json:"port"`
	TargetPort string `json:"targetPort,omitempty"`
}

// EndpointInfo is one endpoint of a service.
type EndpointInfo struct {
	Address      string    `json:"address"`
	Node         string    `json:"node,omitempty"`
	Ready        bool      `json:"ready"`
	Terminating  bool      `json:"terminating,omitempty"`
	Flows        uint64    `json:"flows"`
	EjectedUntil time.Time `json:"ejectedUntil,omitzero"`
}

// Resolution is the answer to `meshctl resolve`.
type Resolution struct {
	Name       string   `json:"name"`
	Type       string   `json:"type"`
	Rcode      string   `json:"rcode"`
	Answer     []string `json:"answer"`
	Authority  []string `json:"authority,omitempty"`
	Additional []string `json:"additional,omitempty"`
}

// Backend is what the agent gives Serve. Its methods are called concurrently.
type Backend interface {
	Status() Status
	Services() []Service
	Resolve(ctx context.Context, name, qtype string) (Resolution, error)
	WireGuard() (WireGuard, error)
	// Ping probes node count times (or, with untilDirect, until a probe is answered over a LAN or
	// direct path) and calls each for every probe as it completes.
	Ping(ctx context.Context, node string, count int, untilDirect bool, each func(PingResult)) error
	// Down asks the agent to shut down; it returns at once.
	Down()
}
