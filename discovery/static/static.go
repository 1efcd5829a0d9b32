// Package static owns the static catalog source: a discovery.Source that reads Kubernetes Service,
// EndpointSlice and Node objects from one YAML file (as `kubectl get svc,endpointslices,nodes -o
// yaml` prints them, or `---`-separated documents), converts them into a discovery.Snapshot at the
// boundary without importing k8s.io, and reloads the file when it changes. A change that does not
// parse is logged and the last good snapshot stays in force. It serves plain hosts and tests.
package static

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/edgewire/edgewire/discovery"
)

const (
	defaultPollInterval = time.Second
	// debounce is how long after a change is noticed the file is read: editors and `cat >` write
	// in several steps.
	debounce = 50 * time.Millisecond
	// maxOrphansLogged bounds the EndpointSlices named in the warning about missing Services.
	maxOrphansLogged = 5
)

// Config configures a Source.
type Config struct {
	// Path is the YAML file to read. Required.
	Path string
	// Logger receives the source's logs; nil discards them.
	Logger *slog.Logger
	// PollInterval is how often the file's metadata is checked as a fallback to file-system
	// notifications (which miss some changes, e.g. on network file systems). Zero means 1s.
	PollInterval time.Duration
}

// Source is a discovery.Source over a static file. It holds no state between calls of Run.
type Source struct {
	path string
	log  *slog.Logger
	poll time.Duration
	// pollOnly turns file-system notifications off, so that tests can exercise the poll.
	pollOnly bool
}

var _ discovery.Source = (*Source)(nil)

// New returns a Source for cfg. It starts nothing and does not touch the file.
func New(cfg Config) *Source {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	poll := cfg.PollInterval
	if poll <= 0 {
		poll = defaultPollInterval
	}
	return &Source{path: cfg.Path, log: log.With("component", "discovery/static", "path", cfg.Path), poll: poll}
}

// Run implements discovery.Source. It reads and parses the file and calls update with the result,
// then watches the file (through its directory, so both rewriting it in place and renaming another
// file over it are seen, plus a poll of its size, modification time and identity every
// PollInterval) and calls update again, within about 100 ms of a write, whenever the file's content
// changes and parses. A change that does not parse is logged at error level and skipped. Run returns
// an error naming the file when the first read or parse fails, and nil once ctx is done and
// everything it started has stopped.
func (s *Source) Run(ctx context.Context, update func(*discovery.Snapshot)) error {
	if s.path == "" {
		return errors.New("static catalog: no file path configured")
	}
	if update == nil {
		return errors.New("static catalog: nil update function")
	}
	// Watch before the first read, so that no change after it goes unnoticed.
	var events <-chan fsnotify.Event
	var watchErrs <-chan error
	if !s.pollOnly {
		if notify := s.watchDir(); notify != nil {
			defer notify.Close() // waits for fsnotify's goroutine
			events, watchErrs = notify.Events, notify.Errors
		}
	}
	w := &watcher{s: s, update: update}
	if err := w.load(); err != nil {
		return fmt.Errorf("static catalog: %w", err)
	}
	target := filepath.Clean(s.path)

	poll := time.NewTicker(s.poll)
	defer poll.Stop()
	// A change is read debounce after it is first noticed; later notices until then add nothing
	// (pushing the read back each time would starve it while the poll keeps noticing).
	settle := time.NewTimer(debounce)
	settle.Stop()
	defer settle.Stop()
	pending := false

	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			// Other names in the directory matter when the file is a symlink that is swapped
			// (Kubernetes ConfigMap volumes): then the stat check notices.
			if !pending && (filepath.Clean(ev.Name) == target || w.changed()) {
				settle.Reset(debounce)
				pending = true
			}
		case err, ok := <-watchErrs:
			if !ok {
				watchErrs = nil
				continue
			}
			s.log.Warn("file notifications failed; the poll still runs", "err", err)
		case <-poll.C:
			if !pending && w.changed() {
				settle.Reset(debounce)
				pending = true
			}
		case <-settle.C:
			pending = false
			w.reload()
		}
	}
}

// watcher is the state of one Run.
type watcher struct {
	s      *Source
	update func(*discovery.Snapshot)

	// last is the file's metadata at the last read attempt (nil if the stat failed).
	last os.FileInfo
	// good is the hash of the content of the last snapshot passed to update; bad that of the last
	// content that failed to parse (so that it is not reported again).
	good, bad [sha256.Size]byte
	// cache holds the last good parse's documents, so that a change re-parses only the documents
	// it touched.
	cache docCache
}

// watchDir returns a watcher of the file's directory, or nil (logged) when notifications are not
// available. The directory, not the file: a watch on the file would follow the old inode after a
// rename over it. Without notifications the poll still sees every change, only later.
func (s *Source) watchDir() *fsnotify.Watcher {
	notify, err := fsnotify.NewWatcher()
	if err != nil {
		s.log.Warn("file notifications unavailable; polling only", "err", err)
		return nil
	}
	if err := notify.Add(filepath.Dir(s.path)); err != nil {
		notify.Close()
		s.log.Warn("cannot watch the file's directory; polling only", "err", err)
		return nil
	}
	return notify
}

// changed reports whether the file's metadata differs from that at the last read attempt.
func (w *watcher) changed() bool {
	fi, err := os.Stat(w.s.path)
	if err != nil || w.last == nil {
		return (err == nil) != (w.last != nil)
	}
	return !os.SameFile(fi, w.last) || fi.Size() != w.last.Size() || !fi.ModTime().Equal(w.last.ModTime())
}

// read stats and reads the file, recording the metadata first so that a write racing with the
// read is seen again by the next check.
func (w *watcher) read() ([]byte, error) {
	fi, err := os.Stat(w.s.path)
	w.last = fi
	if err != nil {
		return nil, err
	}
	return os.ReadFile(w.s.path)
}

// load reads and parses the file for the first time.
func (w *watcher) load() error {
	data, err := w.read()
	if err != nil {
		return err
	}
	r, err := parseCached(data, w.s.path, &w.cache)
	if err != nil {
		return err
	}
	w.good = sha256.Sum256(data)
	w.publish(r)
	return nil
}

// reload reads the file after a change and publishes it if it is new and valid.
func (w *watcher) reload() {
	data, err := w.read()
	if err != nil {
		w.s.log.Error("cannot read the static catalog; keeping the last good one", "err", err)
		return
	}
	sum := sha256.Sum256(data)
	switch sum {
	case w.good:
		w.s.log.Debug("static catalog rewritten with the content in force")
		return
	case w.bad:
		return // already reported
	}
	r, err := parseCached(data, w.s.path, &w.cache)
	if err != nil {
		w.bad = sum
		w.s.log.Error("invalid static catalog; keeping the last good one", "err", err)
		return
	}
	w.good, w.bad = sum, [sha256.Size]byte{}
	w.publish(r)
}

func (w *watcher) publish(r *result) {
	log := w.s.log
	kinds := make([]string, 0, len(r.ignored))
	for k := range r.ignored {
		kinds = append(kinds, k)
	}
	slices.Sort(kinds)
	for _, k := range kinds {
		log.Debug("ignored objects of an unsupported kind", "kind", k, "count", r.ignored[k])
	}
	if n := len(r.orphans); n > 0 {
		log.Warn("EndpointSlices for Services not in the file were ignored",
			"count", n, "slices", r.orphans[:min(n, maxOrphansLogged)])
	}
	log.Info("loaded static catalog",
		"services", len(r.snap.Services), "endpoints", r.endpoints, "nodes", len(r.snap.Nodes))
	w.update(r.snap)
}
