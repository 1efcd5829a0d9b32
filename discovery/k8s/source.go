package k8s

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"

	"github.com/edgewire/edgewire/discovery"
)

// cacheInterval is the least time between two writes of the cache file: a busy cluster changes
// its EndpointSlices many times a second. The last snapshot is written when Run returns.
const cacheInterval = 5 * time.Second

// Run implements discovery.Source. It starts informers (no resync) on Services, EndpointSlices and
// Nodes of the whole cluster and, when a relay Secret is configured, on that one Secret, and
// calls update with the snapshot they give once they have listed everything, then again about
// 20 ms after each burst of changes, skipping snapshots equal to the last one. Snapshots from the
// API server are also written to the cache file when they differ from its content, at most every
// 5 s, and the last one when Run returns.
//
// When the API server has not answered within SyncTimeout, Run logs a warning and calls update
// with the cached snapshot (or an empty one when there is none, which it says), then serves the
// API server's catalog once it answers; client-go retries by itself. When only the relay Secret
// cannot be read by then, the cached relays stand in for it.
//
// While Run runs it also applies what Publish recorded (see Publish). Run returns nil once ctx is
// done and every goroutine it started has stopped, and an error only when it cannot start.
func (s *Source) Run(ctx context.Context, update func(*discovery.Snapshot)) error {
	if s == nil || s.client == nil {
		return errors.New("kubernetes catalog: Source not made by New")
	}
	if update == nil {
		return errors.New("kubernetes catalog: nil update function")
	}
	if !s.running.CompareAndSwap(false, true) {
		return errors.New("kubernetes catalog: Run is already running")
	}
	defer s.running.Store(false)

	kick := make(chan struct{}, 1)
	c, err := s.newCaches(kick)
	if err != nil {
		return fmt.Errorf("kubernetes catalog: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		c.shutdown() // waits for the informers' goroutines
		wg.Wait()
	}()
	c.start(ctx)

	coreSynced, relaySynced := make(chan struct{}), make(chan struct{})
	wg.Go(func() {
		if waitSynced(ctx, c.services, c.slices, c.nodes) {
			close(coreSynced)
		}
	})
	if c.secrets != nil {
		wg.Go(func() {
			if waitSynced(ctx, c.secrets) {
				close(relaySynced)
			}
		})
	} else {
		close(relaySynced)
	}
	wg.Go(func() { s.publishLoop(ctx, c.nodes.GetStore()) })

	r := &runner{s: s, c: c, update: update}
	r.loop(ctx, coreSynced, relaySynced, kick)
	return nil
}

// caches are the informers of one Run: each a cache.SharedIndexInformer over a cache.ListWatch of
// the Client, without client-go's informer factory (see Client).
type caches struct {
	services, slices, nodes cache.SharedIndexInformer
	// secrets is nil without relay discovery.
	secrets cache.SharedIndexInformer
	// wg counts the informers' goroutines.
	wg sync.WaitGroup
}

// newCaches makes the informers; their event handlers wake kick (capacity 1) for every change
// that matters to the catalog.
func (s *Source) newCaches(kick chan<- struct{}) (*caches, error) {
	wake := func() { nudge(kick) }
	changed := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { wake() },
		UpdateFunc: func(any, any) { wake() },
		DeleteFunc: func(any) { wake() },
	}
	nodeEvents := cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) {
			wake()
			s.checkOwnNode(obj)
		},
		UpdateFunc: func(oldObj, newObj any) {
			// Kubelets update their Node's status often; the catalog reads only annotations.
			o, ok1 := oldObj.(*corev1.Node)
			n, ok2 := newObj.(*corev1.Node)
			if !ok1 || !ok2 || !maps.Equal(o.Annotations, n.Annotations) {
				wake()
			}
			s.checkOwnNode(newObj)
		},
		DeleteFunc: func(any) { wake() },
	}

	c := &caches{}
	var err error
	if c.services, err = s.newInformer(ResourceServices, "", nil, changed); err != nil {
		return nil, err
	}
	if c.slices, err = s.newInformer(ResourceEndpointSlices, "", nil, changed); err != nil {
		return nil, err
	}
	if c.nodes, err = s.newInformer(ResourceNodes, "", nil, nodeEvents); err != nil {
		return nil, err
	}
	if s.relayName != "" {
		// Namespace-scoped, for this one name, so that RBAC can grant it by resourceNames.
		c.secrets, err = s.newInformer(ResourceSecrets, s.relayNS, func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", s.relayName).String()
		}, changed)
		if err != nil {
			return nil, err
		}
	}
	return c, nil
}

// newInformer returns an informer (no resync, trimming its objects with trim) of res in
// namespace ("" for all) with handler; tweak, when not nil, adjusts its list and watch requests.
func (s *Source) newInformer(res Resource, namespace string, tweak func(*metav1.ListOptions), handler cache.ResourceEventHandler) (cache.SharedIndexInformer, error) {
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			if tweak != nil {
				tweak(&opts)
			}
			return s.client.List(ctx, res, namespace, opts)
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			if tweak != nil {
				tweak(&opts)
			}
			return s.client.Watch(ctx, res, namespace, opts)
		},
	}
	inf := cache.NewSharedIndexInformer(cache.ToListWatcherWithWatchListSemantics(lw, noWatchList{}),
		res.object(), 0, cache.Indexers{})
	if err := inf.SetTransform(trim); err != nil {
		return nil, fmt.Errorf("informer transform: %w", err)
	}
	if _, err := inf.AddEventHandler(handler); err != nil {
		return nil, fmt.Errorf("informer event handler: %w", err)
	}
	return inf, nil
}

// all returns the informers.
func (c *caches) all() []cache.SharedIndexInformer {
	all := []cache.SharedIndexInformer{c.services, c.slices, c.nodes}
	if c.secrets != nil {
		all = append(all, c.secrets)
	}
	return all
}

// start runs the informers until ctx is done.
func (c *caches) start(ctx context.Context) {
	for _, inf := range c.all() {
		c.wg.Go(func() { inf.RunWithContext(ctx) })
	}
}

// shutdown waits for the informers' goroutines, which stop when the context given to start is
// done.
func (c *caches) shutdown() {
	c.wg.Wait()
}

// waitSynced waits until every one of infs has synced (true) or ctx is done (false).
func waitSynced(ctx context.Context, infs ...cache.SharedIndexInformer) bool {
	checkers := make([]cache.DoneChecker, len(infs))
	for i, inf := range infs {
		checkers[i] = inf.HasSyncedChecker()
	}
	return cache.WaitFor(ctx, "" /* no logging */, checkers...)
}

// list returns what the informers hold; namespace and name are those of the relay Secret.
func (c *caches) list(namespace, name string) (objects, error) {
	in := objects{
		services: listObjects[*corev1.Service](c.services.GetStore()),
		slices:   listObjects[*discoveryv1.EndpointSlice](c.slices.GetStore()),
		nodes:    listObjects[*corev1.Node](c.nodes.GetStore()),
	}
	if c.secrets != nil {
		obj, exists, err := c.secrets.GetStore().GetByKey(namespace + "/" + name)
		if err != nil {
			return in, fmt.Errorf("get Secret %s: %w", name, err)
		}
		if exists {
			sec, ok := obj.(*corev1.Secret)
			if !ok {
				return in, fmt.Errorf("get Secret %s: informer holds a %T", name, obj)
			}
			in.relays = sec
		}
	}
	return in, nil
}

// listObjects returns the objects of store that are a T (all of them: an informer holds only
// its type).
func listObjects[T runtime.Object](store cache.Store) []T {
	items := store.List()
	out := make([]T, 0, len(items))
	for _, obj := range items {
		if t, ok := obj.(T); ok {
			out = append(out, t)
		}
	}
	return out
}

// getObject returns the object of store with key (namespace/name, or name for cluster-scoped
// resources) if it is there and a T.
func getObject[T runtime.Object](store cache.Store, key string) (T, bool) {
	obj, exists, err := store.GetByKey(key)
	if err != nil || !exists {
		var zero T
		return zero, false
	}
	t, ok := obj.(T)
	return t, ok
}

// noWatchList is the "client" of the informers' list-watchers as client-go's reflector sees it:
// it declines client-go's WatchList (the initial list streamed through a watch). A reflector whose
// WatchList gets "connection refused" sleeps out its back-off, up to 30 s, without looking at its
// context, and Run would wait that long to return during an API server outage. The classic list,
// then watch, stops at once.
type noWatchList struct{}

// IsWatchListSemanticsUnSupported is the method through which client-go's reflectors ask.
func (noWatchList) IsWatchListSemanticsUnSupported() bool { return true }

// trim drops what the catalog never reads before an object enters an informer's cache: managed
// fields everywhere, and a Node's spec and status (its image list alone can be tens of kB).
func trim(obj any) (any, error) {
	if m, ok := obj.(metav1.Object); ok {
		m.SetManagedFields(nil)
	}
	if n, ok := obj.(*corev1.Node); ok {
		n.Spec, n.Status = corev1.NodeSpec{}, corev1.NodeStatus{}
	}
	return obj, nil
}

// nudge wakes whoever waits on c (capacity 1) without blocking.
func nudge(c chan<- struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// runner is the state of one Run's main loop; only that loop's goroutine touches it.
//
// It goes through these states:
//
//	waiting ──(informers synced)──────────────────────────────▶ live
//	   │                                                          ▲
//	   └──(SyncTimeout)──▶ serving the cache (or empty) ──(synced)─┘
//
// "Synced" means the Service, EndpointSlice and Node informers have synced and either the relay
// Secret's informer has too or SyncTimeout has passed (its cached relays stand in meanwhile).
type runner struct {
	s      *Source
	c      *caches
	update func(*discovery.Snapshot)

	synced, relaySynced, timedOut bool
	// live is set once a snapshot built from the informers has been served.
	live bool
	// last is the encoding of the snapshot last passed to update; nil before the first.
	last []byte
	// cachedRelays are the relays of the cache file, used until the relay Secret is read.
	cachedRelays []string

	problems problemLog
	orphans  int // the number of orphan EndpointSlices last logged

	// cacheContent is the content of the cache file as last read or written (cacheKnown says
	// whether it was); cacheDirty is content waiting for cacheInterval to pass since lastWrite.
	cacheKnown   bool
	cacheContent []byte
	cacheDirty   []byte
	lastWrite    time.Time
	cacheTimer   *time.Timer
	cacheArmed   bool
}

func (r *runner) loop(ctx context.Context, coreSynced, relaySynced <-chan struct{}, kick <-chan struct{}) {
	timeout := time.NewTimer(r.s.syncTimeout)
	defer timeout.Stop()
	// The snapshot is rebuilt debounce after the first event of a burst; later events until
	// then add nothing (pushing the rebuild back each time would starve it).
	settle := time.NewTimer(debounce)
	settle.Stop()
	defer settle.Stop()
	pending := false
	r.cacheTimer = time.NewTimer(cacheInterval)
	r.cacheTimer.Stop()
	defer r.cacheTimer.Stop()

	ready := func() bool { return r.synced && (r.relaySynced || r.timedOut) }
	for {
		select {
		case <-ctx.Done():
			r.flushCache()
			return
		case <-coreSynced:
			coreSynced, r.synced = nil, true
			if ready() {
				r.rebuild()
			}
		case <-relaySynced:
			relaySynced, r.relaySynced = nil, true
			if ready() {
				r.rebuild()
			}
		case <-timeout.C:
			r.timedOut = true
			if !r.synced {
				r.serveCache()
			} else if !r.relaySynced {
				r.loadCachedRelays()
				r.rebuild()
			}
		case <-kick:
			if ready() && !pending {
				settle.Reset(debounce)
				pending = true
			}
		case <-settle.C:
			pending = false
			r.rebuild()
		case <-r.cacheTimer.C:
			r.cacheArmed = false
			r.flushCache()
		}
	}
}

// rebuild builds the snapshot from the informers and serves it unless it equals the last one.
func (r *runner) rebuild() {
	log := r.s.log
	in, err := r.c.list(r.s.relayNS, r.s.relayName)
	if err != nil {
		log.Error("cannot read the informers' caches; keeping the last catalog", "err", err)
		return
	}
	conv := convert(in)
	if !r.relaySynced {
		conv.snap.Relays = slices.Clone(r.cachedRelays)
	}
	r.problems.log(log, conv.problems)
	if conv.orphans != r.orphans {
		log.Debug("EndpointSlices whose Service does not exist are ignored", "count", conv.orphans)
		r.orphans = conv.orphans
	}

	enc := encodeSnapshot(conv.snap)
	first := !r.live
	r.live = true
	if !bytes.Equal(enc, r.last) {
		r.last = enc
		if first {
			log.Info("catalog read from the API server", "services", len(conv.snap.Services),
				"endpoints", countEndpoints(conv.snap), "nodes", len(conv.snap.Nodes), "relays", len(conv.snap.Relays))
		} else {
			log.Debug("catalog changed", "services", len(conv.snap.Services),
				"endpoints", countEndpoints(conv.snap), "nodes", len(conv.snap.Nodes), "relays", len(conv.snap.Relays))
		}
		r.update(conv.snap)
	} else if first {
		log.Info("catalog read from the API server: unchanged from the cached one")
	}
	r.saveCache(enc)
}

// serveCache serves the cached snapshot, or an empty one, when the API server has not answered
// within SyncTimeout.
func (r *runner) serveCache() {
	log := r.s.log.With("timeout", r.s.syncTimeout)
	snap, saved, err := r.readCache()
	switch {
	case err == nil:
		log.Warn("the API server has not answered: serving the cached catalog until it does",
			"cache", r.s.cachePath, "saved", saved.Format(time.RFC3339),
			"services", len(snap.Services), "nodes", len(snap.Nodes), "relays", len(snap.Relays))
		r.cachedRelays = snap.Relays
	case errors.Is(err, errNoCache):
		snap = &discovery.Snapshot{}
		log.Warn("the API server has not answered and there is no cached catalog: serving an empty catalog until it does",
			"cache", r.s.cachePath)
	default:
		snap = &discovery.Snapshot{}
		log.Warn("the API server has not answered and the cached catalog is unusable: serving an empty catalog until it does",
			"err", err)
	}
	r.last = encodeSnapshot(snap)
	r.update(snap)
}

// loadCachedRelays takes the relays of the cache when the relay Secret has not been read within
// SyncTimeout.
func (r *runner) loadCachedRelays() {
	snap, _, err := r.readCache()
	if err == nil {
		r.cachedRelays = snap.Relays
	}
	r.s.log.Warn("the relay Secret has not been read: check that it exists (deploy/) and that the agent may get, list and watch it; using the cached relays meanwhile",
		"secret", r.s.relayNS+"/"+r.s.relayName, "timeout", r.s.syncTimeout, "cached_relays", len(r.cachedRelays))
}

// readCache loads the cache file; errNoCache when there is none or no cache is configured.
func (r *runner) readCache() (*discovery.Snapshot, time.Time, error) {
	if r.s.cachePath == "" {
		return nil, time.Time{}, errNoCache
	}
	return loadCache(r.s.cachePath)
}

// saveCache writes enc to the cache file when it differs from the file's content, at most once
// per cacheInterval.
func (r *runner) saveCache(enc []byte) {
	path := r.s.cachePath
	if path == "" {
		return
	}
	if !r.cacheKnown {
		r.cacheContent, _ = os.ReadFile(path) // unreadable: written anew
		r.cacheKnown = true
	}
	if bytes.Equal(enc, r.cacheContent) {
		r.cacheDirty = nil
		return
	}
	r.cacheDirty = enc
	if wait := cacheInterval - time.Since(r.lastWrite); wait > 0 {
		if !r.cacheArmed {
			r.cacheTimer.Reset(wait)
			r.cacheArmed = true
		}
		return
	}
	r.flushCache()
}

// flushCache writes the snapshot waiting for the cache file, if any.
func (r *runner) flushCache() {
	if r.cacheDirty == nil {
		return
	}
	data := r.cacheDirty
	r.cacheDirty, r.lastWrite = nil, time.Now()
	if err := writeCache(r.s.cachePath, data); err != nil {
		r.s.log.Warn("cannot save the catalog: a restart while the API server is unreachable will serve an older one", "err", err)
		return
	}
	r.cacheContent = data
}

func countEndpoints(s *discovery.Snapshot) int {
	n := 0
	for _, svc := range s.Services {
		n += len(svc.Endpoints)
	}
	return n
}

// problemLog logs each problem once per change: when it first appears, and again only if it went
// away and came back.
type problemLog struct {
	seen map[problem]bool
}

func (p *problemLog) log(l *slog.Logger, probs []problem) {
	next := make(map[problem]bool, len(probs))
	for _, pr := range probs {
		if !p.seen[pr] && !next[pr] {
			l.Warn("ignoring what the mesh cannot use in a Kubernetes object", "object", pr.object, "problem", pr.msg)
		}
		next[pr] = true
	}
	p.seen = next
}
