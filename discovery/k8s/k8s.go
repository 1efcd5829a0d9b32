// Package k8s owns the Kubernetes catalog source, the only package of edgewire that imports k8s.io:
// a discovery.Source that watches Services, discovery.k8s.io/v1 EndpointSlices and Nodes (and,
// optionally, the Secret in which mesh-relay publishes its addresses) through client-go informers,
// converts them into a discovery.Snapshot right where they are read, and keeps the last good
// snapshot in a cache file so that an agent restarted while the API server is unreachable serves
// the catalog it had. It is also the discovery.Publisher that writes this node's WireGuard key,
// overlay address and endpoints as annotations on its Node, and it holds PublishRelay, with which
// mesh-relay writes its addresses into that Secret.
//
// The informers and patches go through Client, a REST client of the package's own for just these
// resources, rather than client-go's clientset and informer factory, which would link every API
// group into every agent (over 10 MB of its memory).
//
// The conversion follows discovery/static (see Parse there), with one difference: objects come from
// an API server that has validated them, so an object the mesh cannot use (a Node with a bad key,
// say) is skipped with a warning, logged once per change, instead of failing the whole catalog.
package k8s

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/edgewire/edgewire/discovery"
)

const (
	defaultSyncTimeout = 10 * time.Second
	// debounce is how long after the first informer event of a burst the snapshot is rebuilt:
	// one change often touches several objects (a Service and its EndpointSlice).
	debounce = 20 * time.Millisecond
	// retryMin and retryMax bound the back-off of the patches of Publish and PublishRelay.
	retryMin = 500 * time.Millisecond
	retryMax = 30 * time.Second
	// requestTimeout bounds one patch request.
	requestTimeout = 15 * time.Second
)

// Config configures a Source. The zero value of each field is documented with it.
type Config struct {
	// Kubeconfig is the path of a kubeconfig file. "" means the in-cluster configuration (the
	// Pod's ServiceAccount), which fails with an error naming --kubeconfig outside a Pod.
	Kubeconfig string
	// RESTConfig, when set, is used instead of Kubeconfig (tests).
	RESTConfig *rest.Config
	// Client, when set, is used instead of RESTConfig and Kubeconfig (tests).
	Client Client
	// Logger receives the source's logs; nil discards them. New also routes client-go's klog
	// output to it (see routeKlog).
	Logger *slog.Logger
	// NodeName is the Kubernetes name of this node. Publish needs it; the catalog does not.
	NodeName string
	// CachePath is the file that keeps the last snapshot read from the API server, served when
	// the API server does not answer within SyncTimeout at start. "" means no cache.
	CachePath string
	// SyncTimeout is how long Run waits for the informers' first listing before it serves the
	// cached snapshot. Zero means 10 s.
	SyncTimeout time.Duration
	// RelaySecretNamespace and RelaySecretName name the Secret in which mesh-relay publishes
	// its addresses (see PublishRelay); they become Snapshot.Relays. An empty RelaySecretName
	// means no relay discovery.
	RelaySecretNamespace, RelaySecretName string
}

// Source is the Kubernetes catalog source: a discovery.Source and a discovery.Publisher. New
// builds it; Run watches the API server until its context is done. Run may be called again after
// it returned, but not while it runs. Publish may be called at any time, from any goroutine.
type Source struct {
	client      Client
	log         *slog.Logger
	nodeName    string
	cachePath   string
	syncTimeout time.Duration
	relayNS     string
	relayName   string
	// retryMin is the first back-off after a failed patch of the Node (the constant retryMin;
	// shorter in tests).
	retryMin time.Duration

	// running is set while Run runs.
	running atomic.Bool
	// pubKick wakes the publisher of Run (capacity 1: a pending wake-up absorbs later ones).
	pubKick chan struct{}

	// mu guards all following fields.
	mu sync.Mutex
	// desired are the Node annotations last given to Publish; nil before the first call.
	desired map[string]string
}

var (
	_ discovery.Source    = (*Source)(nil)
	_ discovery.Publisher = (*Source)(nil)
)

// New returns a Source for cfg. It builds the API client from cfg (reading the kubeconfig file
// or the in-cluster configuration) and validates cfg, but starts nothing and does not contact the
// API server.
func New(cfg Config) (*Source, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.RelaySecretName != "" && cfg.RelaySecretNamespace == "" {
		return nil, fmt.Errorf("kubernetes catalog: relay Secret %q has no namespace", cfg.RelaySecretName)
	}
	if cfg.SyncTimeout < 0 {
		return nil, fmt.Errorf("kubernetes catalog: negative sync timeout %v", cfg.SyncTimeout)
	}
	client, err := newClient(cfg.Kubeconfig, cfg.RESTConfig, cfg.Client, "edgewire-agent")
	if err != nil {
		return nil, fmt.Errorf("kubernetes catalog: %w", err)
	}
	routeKlog(log)
	timeout := cfg.SyncTimeout
	if timeout == 0 {
		timeout = defaultSyncTimeout
	}
	return &Source{
		client:      client,
		log:         log.With("component", "discovery/k8s"),
		nodeName:    cfg.NodeName,
		cachePath:   cfg.CachePath,
		syncTimeout: timeout,
		relayNS:     cfg.RelaySecretNamespace,
		relayName:   cfg.RelaySecretName,
		retryMin:    retryMin,
		pubKick:     make(chan struct{}, 1),
	}, nil
}

// newClient returns client when set, else a REST client for restConfig when set, else one for the
// kubeconfig file, else one for the in-cluster configuration. userAgent names the program in the
// API server's logs.
func newClient(kubeconfig string, restConfig *rest.Config, client Client, userAgent string) (Client, error) {
	if client != nil {
		return client, nil
	}
	var err error
	switch {
	case restConfig != nil:
		restConfig = rest.CopyConfig(restConfig)
	case kubeconfig != "":
		restConfig, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
		}
	default:
		restConfig, err = rest.InClusterConfig()
		if errors.Is(err, rest.ErrNotInCluster) {
			return nil, fmt.Errorf("not running in a Kubernetes Pod, so there is no in-cluster configuration: set --kubeconfig (%w)", err)
		}
		if err != nil {
			return nil, fmt.Errorf("in-cluster configuration: %w", err)
		}
	}
	rest.AddUserAgent(restConfig, userAgent)
	c, err := newRESTClient(restConfig)
	if err != nil {
		return nil, fmt.Errorf("API client for %s: %w", restConfig.Host, err)
	}
	return c, nil
}

// klog is process-global and not safe to reconfigure while anything logs through it, so the
// package installs one forwarding handler into it, once, and points that handler at the logger
// of the latest New or PublishRelay.
var (
	klogOnce   sync.Once
	klogTarget atomic.Pointer[slog.Logger]
)

// routeKlog sends klog's output (client-go's reflectors, for example their "failed to list"
// errors) to log, tagged component=client-go.
func routeKlog(log *slog.Logger) {
	klogTarget.Store(log.With("component", "client-go"))
	klogOnce.Do(func() { klog.SetSlogLogger(slog.New(&klogHandler{})) })
}

// klogHandler is a slog.Handler that forwards to the handler of klogTarget at the time of each
// record, replaying the attributes and groups added to it.
type klogHandler struct {
	// ops are WithAttrs ([]slog.Attr) and WithGroup (string) calls, in order.
	ops []any
}

func (h *klogHandler) target() slog.Handler {
	t := klogTarget.Load().Handler()
	for _, op := range h.ops {
		switch op := op.(type) {
		case []slog.Attr:
			t = t.WithAttrs(op)
		case string:
			t = t.WithGroup(op)
		}
	}
	return t
}

func (h *klogHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return klogTarget.Load().Handler().Enabled(ctx, l)
}

func (h *klogHandler) Handle(ctx context.Context, r slog.Record) error {
	return h.target().Handle(ctx, r)
}

func (h *klogHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &klogHandler{ops: append(h.ops[:len(h.ops):len(h.ops)], attrs)}
}

func (h *klogHandler) WithGroup(name string) slog.Handler {
	return &klogHandler{ops: append(h.ops[:len(h.ops):len(h.ops)], name)}
}
