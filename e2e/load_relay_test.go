package e2e

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Issue 13's relay load: what unregistered strangers can make mesh-relay hold. The relay runs in
// a cgroup v1 memory cgroup limited to 256 MiB (swap included) with a file limit of 20,000. For
// 30 s, four namespaces (four source addresses) keep 2,000 control streams open or being opened
// from 32 libp2p identities: each announces a 1 MiB frame and sends all of it but its last byte,
// or (every other stream) announces 4 KiB and sends half, holds the stream, and opens it again a
// second after the relay refuses or closes it. Meanwhile two registered nodes make a request
// through the relay's UDP path every 100 ms and a punch request over their control streams every
// second, and a third node registers in the middle of the flood.
//
// The relay must not be OOM-killed, must close every stream that does not register within its
// register timeout (10 s), must stay at or under 200 MB of peak RSS, must serve the
// registered nodes without a single failure, and must be back to baseline within 30 s of the
// load's end: RSS at most 50 MB, file descriptors and goroutines (its go_goroutines gauge) within
// 10% of what they were idle with the two nodes registered.
//
// EW_RELAY_LOAD_BIN, when set, names a prebuilt mesh-relay to run instead of building this
// tree's (to measure an older relay under the same load).

const (
	relayLoadCgroupLimit = 256 << 20
	relayLoadFloods      = 4
	relayLoadStreams     = 500 // per flood namespace
	relayLoadPeers       = 8   // libp2p identities per flood namespace
	relayLoadDuration    = 30 * time.Second
	relayRegisterTimeout = 10 * time.Second // relay.DefaultLimits().RegisterTimeout
	relayLoadPeakRSS     = 200 << 20
	relayLoadBaseRSS     = 50 << 20
	relayLoadRecovery    = 30 * time.Second
)

func TestRelayLoadUnauthenticatedStreams(t *testing.T) {
	relayBin := os.Getenv("EW_RELAY_LOAD_BIN")
	if relayBin == "" {
		relayBin = BuildMeshRelay(t, t.TempDir())
	}
	loadBin := filepath.Join(t.TempDir(), "relayload")
	if err := goBuild(loadBin, "github.com/edgewire/edgewire/e2e/relayload"); err != nil {
		t.Fatalf("build relayload: %v", err)
	}
	lab := NewLab(t)
	cg := NewMemCgroup(t, lab, "relay", relayLoadCgroupLimit)
	lan := lab.LAN(t, "net", netip.MustParsePrefix("10.77.0.0/24"))
	relayNode := lab.Node(t, "relay")
	relayAddr := netip.MustParseAddr("10.77.0.1")
	lan.Attach(t, relayNode, relayAddr)
	clients := lab.Node(t, "clients")
	lan.Attach(t, clients, netip.MustParseAddr("10.77.0.2"))
	var floodNodes []*Node
	for i := range relayLoadFloods {
		n := lab.Node(t, fmt.Sprintf("flood%d", i+1))
		lan.Attach(t, n, netip.AddrFrom4([4]byte{10, 77, 0, byte(11 + i)}))
		floodNodes = append(floodNodes, n)
	}

	tokenFile := filepath.Join(lab.Dir, "join-token")
	if err := os.WriteFile(tokenFile, []byte(rand.Text()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Relay.Start runs its binary under `ip netns exec`, whose fresh /sys has no cgroup mount: the
	// wrapper mounts the memory hierarchy there, enters the cgroup and sets the file limit.
	rel, err := filepath.Rel(memCgroupRoot, cg.Path)
	if err != nil {
		t.Fatal(err)
	}
	wrapper := filepath.Join(lab.Dir, "mesh-relay-in-cgroup")
	script := fmt.Sprintf("#!/bin/sh\nmount -t cgroup -o memory cgroup /sys/fs/cgroup || exit 1\n"+
		"echo $$ > /sys/fs/cgroup/%s/cgroup.procs || exit 1\nulimit -n 20000 || exit 1\nexec %s \"$@\"\n", rel, relayBin)
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	r := NewRelay(relayNode, relayAddr, wrapper, tokenFile)
	r.Start(t, 20*time.Second)
	pid := r.Proc.PID()
	if procs, _ := os.ReadFile(filepath.Join(cg.Path, "cgroup.procs")); !slices.Contains(strings.Fields(string(procs)), strconv.Itoa(pid)) {
		t.Fatalf("relay (pid %d) is not in %s: %q", pid, cg.Path, procs)
	}

	legit := clients.Start(t, "legit", loadBin, "node", "--relay", r.Multiaddr(), "--token-file", tokenFile)
	legit.WaitLog(t, "ready", 30*time.Second)
	idle := sampleRelay(t, r)
	if idle.goroutines < 0 {
		// Not fatal, so that an older relay (EW_RELAY_LOAD_BIN) can still be measured.
		t.Errorf("the relay's /metrics has no go_goroutines gauge: its goroutines cannot be checked")
	}
	t.Logf("idle with 2 nodes: RSS %.1f MB, %d fds, %d goroutines", mb(idle.rss), idle.fds, idle.goroutines)

	// The flood, watched every 200 ms.
	watch := watchRSS(pid, 200*time.Millisecond)
	loadStart := time.Now()
	var floods []*Proc
	for i, n := range floodNodes {
		floods = append(floods, n.Start(t, fmt.Sprintf("flood%d", i+1), loadBin, "flood", "--relay", r.Multiaddr(),
			"--streams", strconv.Itoa(relayLoadStreams), "--peers", strconv.Itoa(relayLoadPeers),
			"--duration", relayLoadDuration.String(), "--partial-every", "2"))
	}
	// A node that was never registered joins once the flood is in full swing: the relay has
	// refused a thousand of its streams (or died trying).
	for swing := time.Now().Add(relayLoadDuration / 2); !r.Proc.Exited(); time.Sleep(200 * time.Millisecond) {
		m, err := r.Metrics("edgewire_relay_unauth_refused_total")
		if err == nil && sumMetric(m) >= 1000 {
			break
		}
		if time.Now().After(swing) {
			t.Errorf("after %v the relay had refused fewer than 1000 streams (%v): %q", relayLoadDuration/2, err, m)
			break
		}
	}
	if !r.Proc.Exited() {
		t.Logf("flood in full swing after %v", time.Since(loadStart).Round(time.Millisecond))
	}
	joinOut, err := clients.ExecTimeout(40*time.Second, loadBin, "join", "--relay", r.Multiaddr(), "--token-file", tokenFile,
		"--timeout", "15s")
	if err != nil {
		t.Errorf("a new node could not register during the flood: %v\n%s", err, joinOut)
	} else {
		t.Logf("a new node registered during the flood: %s", strings.TrimSpace(lastJSONLine(joinOut)))
	}
	var attempts, challenged, closed int
	var longest time.Duration
	for _, p := range floods {
		if err := p.Wait(relayLoadDuration + 30*time.Second); err != nil {
			t.Errorf("%v\n%s", err, p.Tail(20))
			continue
		}
		var res struct {
			Attempts, Opened, Challenged, Refused, ClosedByRelay int
			LongestOpen                                          time.Duration
			Sent                                                 int64
			Errors                                               []string
		}
		if err := json.Unmarshal([]byte(lastJSONLine(p.Log())), &res); err != nil {
			t.Errorf("%s: result: %v\n%s", p.Name, err, p.Tail(20))
			continue
		}
		t.Logf("%s: %+v", p.Name, res)
		attempts += res.Attempts
		challenged += res.Challenged
		closed += res.ClosedByRelay
		longest = max(longest, res.LongestOpen)
	}
	loadEnd := time.Now()
	peakDuring := watch.stop()
	if r.Proc.Exited() {
		cgPeak, _ := cg.Stat("memory.max_usage_in_bytes", "")
		kills, _ := cg.OOMKills()
		t.Fatalf("relay died under the load (%v): OOM kills %d, cgroup peak %.1f MB of %d MiB, last RSS seen %.1f MB",
			r.Proc.Wait(0), kills, mb(cgPeak), relayLoadCgroupLimit>>20, mb(peakDuring))
	}
	t.Logf("flood of %d streams over %v: %d attempts, %d admitted to registration, %d of them closed by the relay, "+
		"the longest after %v; peak RSS during the load %.1f MB", relayLoadFloods*relayLoadStreams,
		loadEnd.Sub(loadStart).Round(time.Millisecond), attempts, challenged, closed, longest.Round(time.Millisecond), mb(peakDuring))
	if attempts < relayLoadFloods*relayLoadStreams {
		t.Errorf("%d stream attempts, want at least one per stream (%d)", attempts, relayLoadFloods*relayLoadStreams)
	}
	if longest > relayRegisterTimeout+2*time.Second {
		t.Errorf("an unauthenticated stream stayed open %v: the relay must close it at its register timeout (%v)",
			longest, relayRegisterTimeout)
	}
	if r.Proc.Exited() {
		t.Fatalf("relay exited under the load: %v\n%s", r.Proc.Wait(0), r.Proc.Tail(20))
	}

	// Back to baseline.
	var last relaySample
	took := Eventually(t, relayLoadRecovery, 500*time.Millisecond, "relay back to baseline", func() error {
		last = sampleRelay(t, r)
		switch {
		case last.rss > relayLoadBaseRSS:
			return fmt.Errorf("RSS %.1f MB > %.0f MB", mb(last.rss), mb(relayLoadBaseRSS))
		case last.fds > within10(idle.fds):
			return fmt.Errorf("%d fds, idle %d", last.fds, idle.fds)
		case last.goroutines > within10(idle.goroutines):
			return fmt.Errorf("%d goroutines, idle %d", last.goroutines, idle.goroutines)
		}
		return nil
	})
	t.Logf("back to baseline %v after the load: RSS %.1f MB, %d fds, %d goroutines", took.Round(time.Millisecond),
		mb(last.rss), last.fds, last.goroutines)

	// The registered nodes saw nothing of it.
	if err := legit.Stop(10 * time.Second); err != nil {
		t.Fatalf("legit nodes: %v\n%s", err, legit.Tail(20))
	}
	var res struct {
		Requests, Failures     int
		MaxRTTMs               float64
		Punches, PunchFailures int
		SessionDrops           int
		FirstErrors            []string
	}
	if err := json.Unmarshal([]byte(lastJSONLine(legit.Log())), &res); err != nil {
		t.Fatalf("legit nodes' result: %v\n%s", err, legit.Tail(20))
	}
	t.Logf("registered nodes: %d requests through the relay (slowest %.1f ms), %d punches", res.Requests, res.MaxRTTMs, res.Punches)
	if res.Requests == 0 || res.Punches == 0 {
		t.Errorf("the registered nodes made %d requests and %d punches: nothing measured", res.Requests, res.Punches)
	}
	if res.Failures != 0 || res.PunchFailures != 0 || res.SessionDrops != 0 {
		t.Errorf("registered nodes: %d failed requests, %d failed punches, %d session drops; want none: %v",
			res.Failures, res.PunchFailures, res.SessionDrops, res.FirstErrors)
	}

	hwm := statusBytes(t, pid, "VmHWM")
	cgPeak, _ := cg.Stat("memory.max_usage_in_bytes", "")
	failcnt, _ := cg.Stat("memory.failcnt", "")
	t.Logf("relay peak RSS (VmHWM) %.1f MB; cgroup peak %.1f MB of %d MiB, limit hit %d times",
		mb(hwm), mb(cgPeak), relayLoadCgroupLimit>>20, failcnt)
	if hwm > relayLoadPeakRSS {
		t.Errorf("relay peak RSS %.1f MB > %.0f MB", mb(hwm), mb(relayLoadPeakRSS))
	}
	kills, err := cg.OOMKills()
	if err != nil {
		t.Fatalf("cgroup: %v", err)
	}
	if kills != 0 || r.Proc.Exited() {
		t.Errorf("relay OOM-killed %d times (exited: %v)", kills, r.Proc.Exited())
	}
	if m, err := r.Metrics("refused_total"); err == nil {
		t.Logf("relay refusals:\n%s", m)
	}
}

// sumMetric adds up the values of Prometheus text lines.
func sumMetric(lines string) int64 {
	var n int64
	for line := range strings.Lines(lines) {
		if f := strings.Fields(line); len(f) == 2 {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			n += v
		}
	}
	return n
}

// relaySample is the relay's footprint at one moment.
type relaySample struct {
	rss        int64
	fds        int
	goroutines int // -1 when the relay does not report them
}

func sampleRelay(t *testing.T, r *Relay) relaySample {
	t.Helper()
	pid := r.Proc.PID()
	s := relaySample{rss: statusBytes(t, pid, "VmRSS"), goroutines: -1}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatalf("relay fds: %v", err)
	}
	s.fds = len(fds)
	m, err := r.Metrics("go_goroutines")
	if err != nil {
		t.Fatalf("relay metrics: %v", err)
	}
	if f := strings.Fields(m); len(f) == 2 {
		if s.goroutines, err = strconv.Atoi(f[1]); err != nil {
			t.Fatalf("relay metrics: go_goroutines %q: %v", f[1], err)
		}
	}
	return s
}

// within10 is n plus 10%, rounded up.
func within10(n int) int { return int(math.Ceil(float64(n) * 1.1)) }

func mb(b int64) float64 { return float64(b) / 1e6 }

// statusBytes returns a kB field of /proc/pid/status in bytes, failing t if it cannot.
func statusBytes(t *testing.T, pid int, field string) int64 {
	t.Helper()
	v, err := statusField(pid, field)
	if err != nil {
		t.Fatalf("relay %s: %v", field, err)
	}
	return v
}

// statusField reads a kB field of /proc/pid/status, in bytes.
func statusField(pid int, field string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			f := strings.Fields(rest)
			if len(f) != 2 || f[1] != "kB" {
				return 0, fmt.Errorf("/proc/%d/status: %q", pid, strings.TrimSpace(line))
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

// rssWatch samples a process's RSS until stopped.
type rssWatch struct {
	stopc chan struct{}
	wg    sync.WaitGroup
	peak  int64
}

func watchRSS(pid int, every time.Duration) *rssWatch {
	w := &rssWatch{stopc: make(chan struct{})}
	w.wg.Go(func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			if v, err := statusField(pid, "VmRSS"); err == nil {
				w.peak = max(w.peak, v)
			}
			select {
			case <-w.stopc:
				return
			case <-t.C:
			}
		}
	})
	return w
}

// stop ends the watch and returns the highest RSS seen.
func (w *rssWatch) stop() int64 {
	close(w.stopc)
	w.wg.Wait()
	return w.peak
}

// lastJSONLine returns the last line of s that starts with '{'.
func lastJSONLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.HasPrefix(lines[i], "{") {
			return lines[i]
		}
	}
	return ""
}
