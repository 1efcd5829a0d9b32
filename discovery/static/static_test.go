package static

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/edgewire/edgewire/discovery"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// changeDeadline is how long a test waits for a change to reach update. The target is ~250 ms;
// the deadline leaves room for a loaded CI machine and -race.
const changeDeadline = 2 * time.Second

// logBuffer collects a logger's text output; safe for concurrent use.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// count returns how many log lines contain all of want.
func (b *logBuffer) count(want ...string) int {
	n := 0
	for line := range strings.Lines(b.String()) {
		if containsAll(line, want) {
			n++
		}
	}
	return n
}

// waitCount polls the log until at least n lines contain all of want.
func (b *logBuffer) waitCount(t *testing.T, n int, want ...string) {
	t.Helper()
	deadline := time.Now().Add(changeDeadline)
	for b.count(want...) < n {
		if time.Now().After(deadline) {
			t.Fatalf("fewer than %d log lines containing %q; log:\n%s", n, want, b.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitLog polls the log until it has a line containing all of want, and returns the line.
func (b *logBuffer) waitLog(t *testing.T, want ...string) string {
	t.Helper()
	b.waitCount(t, 1, want...)
	for line := range strings.Lines(b.String()) {
		if containsAll(line, want) {
			return line
		}
	}
	return ""
}

func containsAll(s string, subs []string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

// run is a Source running in the background for a test.
type run struct {
	updates chan *discovery.Snapshot
	log     *logBuffer
	cancel  context.CancelFunc
	done    chan error
}

// startRun runs src over path; the test's cleanup stops it and checks that Run returned nil.
func startRun(t *testing.T, path string, pollOnly bool, poll time.Duration) *run {
	t.Helper()
	r := &run{updates: make(chan *discovery.Snapshot, 16), log: &logBuffer{}, done: make(chan error, 1)}
	logger := slog.New(slog.NewTextHandler(r.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	src := New(Config{Path: path, Logger: logger, PollInterval: poll})
	src.pollOnly = pollOnly
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.done <- src.Run(ctx, func(s *discovery.Snapshot) { r.updates <- s }) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-r.done:
			if err != nil {
				t.Errorf("Run() = %v, want nil after cancel", err)
			}
		case <-time.After(changeDeadline):
			t.Errorf("Run did not return after cancel")
		}
	})
	return r
}

// next waits for the next update and returns it.
func (r *run) next(t *testing.T) *discovery.Snapshot {
	t.Helper()
	select {
	case s := <-r.updates:
		return s
	case err := <-r.done:
		t.Fatalf("Run returned %v before an update", err)
	case <-time.After(changeDeadline):
		t.Fatalf("no update within %v; log:\n%s", changeDeadline, r.log.String())
	}
	return nil
}

// noUpdate fails if an update is pending.
func (r *run) noUpdate(t *testing.T) {
	t.Helper()
	select {
	case s := <-r.updates:
		t.Fatalf("unexpected update: %s", dump(s))
	default:
	}
}

func catalog(names ...string) string {
	var b strings.Builder
	for _, n := range names {
		b.WriteString("---\napiVersion: v1\nkind: Service\nmetadata: {name: " + n + "}\nspec:\n  ports: [{port: 80}]\n")
	}
	return b.String()
}

func serviceNames(s *discovery.Snapshot) string {
	var names []string
	for _, svc := range s.Services {
		names = append(names, svc.Name)
	}
	return strings.Join(names, ",")
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// renameOver writes content to a temporary file beside path and renames it over path, as editors
// and configuration tools do.
func renameOver(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	writeFile(t, tmp, content)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestRunUpdates(t *testing.T) {
	tests := []struct {
		name     string
		pollOnly bool
		poll     time.Duration
		write    func(t *testing.T, path, content string)
	}{
		// With an hour-long poll only notifications can deliver the change in time.
		{name: "rewrite in place", poll: time.Hour, write: writeFile},
		{name: "atomic rename", poll: time.Hour, write: renameOver},
		{name: "rewrite in place, poll only", pollOnly: true, poll: 20 * time.Millisecond, write: writeFile},
		{name: "atomic rename, poll only", pollOnly: true, poll: 20 * time.Millisecond, write: renameOver},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "catalog.yaml")
			writeFile(t, path, catalog("a"))
			r := startRun(t, path, tc.pollOnly, tc.poll)
			if got := serviceNames(r.next(t)); got != "a" {
				t.Fatalf("initial services = %q, want a", got)
			}

			start := time.Now()
			tc.write(t, path, catalog("a", "b"))
			got := serviceNames(r.next(t))
			t.Logf("change reached update after %v", time.Since(start))
			if got != "a,b" {
				t.Fatalf("services after the change = %q, want a,b", got)
			}

			// Identical content is read but not published again.
			const same = "rewritten with the content in force"
			seen := r.log.count(same)
			tc.write(t, path, catalog("a", "b"))
			r.log.waitCount(t, seen+1, same)
			r.noUpdate(t)
			tc.write(t, path, catalog("c"))
			if got := serviceNames(r.next(t)); got != "c" {
				t.Fatalf("services after the second change = %q, want c (identical content must not be published)", got)
			}
		})
	}
}

func TestRunInvalidKeepsLastGood(t *testing.T) {
	path := filepath.Join(t.TempDir(), "catalog.yaml")
	writeFile(t, path, catalog("a"))
	r := startRun(t, path, false, 50*time.Millisecond)
	if got := serviceNames(r.next(t)); got != "a" {
		t.Fatalf("initial services = %q, want a", got)
	}

	writeFile(t, path, catalog("a")+"---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec:\n  ports: [{port: 70000}]\n")
	line := r.log.waitLog(t, "level=ERROR", "invalid static catalog", "err=",
		"catalog.yaml: document 2 (Service default/b), line 12: spec.ports[0].port: must be 1-65535, got 70000")
	t.Logf("logged: %s", line)
	r.noUpdate(t) // the error is logged in place of an update

	writeFile(t, path, catalog("b"))
	if got := serviceNames(r.next(t)); got != "b" {
		t.Fatalf("services after the fix = %q, want b", got)
	}
}

// TestRunSymlinkSwap covers Kubernetes ConfigMap volumes: the file is a symlink through "..data",
// which is swapped to a new directory, so no event names the file itself.
func TestRunSymlinkSwap(t *testing.T) {
	dir := t.TempDir()
	mkVersion := func(name, content string) {
		if err := os.Mkdir(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(dir, name, "catalog.yaml"), content)
	}
	mkVersion("v1", catalog("a"))
	if err := os.Symlink("v1", filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "catalog.yaml")
	if err := os.Symlink(filepath.Join("..data", "catalog.yaml"), path); err != nil {
		t.Fatal(err)
	}
	r := startRun(t, path, false, time.Hour)
	if got := serviceNames(r.next(t)); got != "a" {
		t.Fatalf("initial services = %q, want a", got)
	}

	mkVersion("v2", catalog("b"))
	if err := os.Symlink("v2", filepath.Join(dir, "..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if got := serviceNames(r.next(t)); got != "b" {
		t.Fatalf("services after the swap = %q, want b", got)
	}
}

func TestRunInitialErrors(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	writeFile(t, bad, "apiVersion: v1\nkind: Service\nmetadata: {}\n")
	tests := []struct {
		name string
		cfg  Config
		want []string
	}{
		{name: "missing file", cfg: Config{Path: filepath.Join(dir, "none.yaml")}, want: []string{"static catalog", "none.yaml", "no such file"}},
		{name: "invalid file", cfg: Config{Path: bad}, want: []string{"static catalog", bad + ": document 1 (Service), line 3: metadata.name: required"}},
		{name: "no path", cfg: Config{}, want: []string{"no file path"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			called := false
			err := New(tc.cfg).Run(context.Background(), func(*discovery.Snapshot) { called = true })
			if err == nil {
				t.Fatal("Run() = nil, want an error")
			}
			if !containsAll(err.Error(), tc.want) {
				t.Errorf("Run() error = %v, want it to contain %q", err, tc.want)
			}
			if called {
				t.Error("update called despite the error")
			}
		})
	}
}

func TestRunLogsIgnored(t *testing.T) {
	path := filepath.Join(t.TempDir(), "catalog.yaml")
	writeFile(t, path, catalog("a")+"---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"+
		"---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: x-1, labels: {kubernetes.io/service-name: x}}\naddressType: IPv4\n")
	r := startRun(t, path, false, time.Hour)
	r.next(t)
	r.log.waitLog(t, "level=DEBUG", "kind=Pod", "count=1")
	r.log.waitLog(t, "level=WARN", "default/x-1 → default/x")
}
