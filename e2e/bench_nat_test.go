//go:build bench

package e2e

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
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

// The NAT traversal section of the benchmark suite ("nat"): a NAT lab like TestNATLab's (natlab.go),
// smaller, built once:
//
//	relay1           public 203.0.113.x   mesh-relay; every agent registers with it (host:port)
//	site A (easy NAT) 192.168.1.0/24      edge-a1 .11, pod 10.244.1.10; edge-a2 .12, pod 10.244.5.10
//	site B (easy NAT) 192.168.2.0/24      edge-b1 .11, pod 10.244.2.10
//	site C (hard NAT) 192.168.3.0/24      edge-c1 .11, pod 10.244.3.10   (MASQUERADE --random-fully)
//	site D (hard NAT) 192.168.4.0/24      edge-d1 .11, pod 10.244.4.10
//
// Every pod runs iperf3 -s (:5201), benchtool echo (:7000) and testserver http (:8080, name
// pod-<role>). Services iperf-<role>, echo-<role> and web-<role> (TCP 80 → 8080) have their one
// endpoint in that pod; the catalog has no Node objects: keys and addresses come from the relay's
// directory, as in TestNATLab. It measures, from one start of the four agents:
//
//   - nat.easy-easy.time-to-direct: from the agents' start until both a1 and b1 report the other's
//     path "direct" in their status (GET /v1/status on the control socket, what `meshctl status
//     --json` prints, polled every natPollInterval); goal ≤ 1 s.
//   - nat.hard-hard.time-to-first-byte: from the agents' start until an HTTP request through
//     web-d1's service IP from c1, and through web-c1's from d1, has succeeded (curl, a new attempt
//     natPollInterval after a failed one, a connect timeout of natConnectTimeout: the connect is
//     answered by the client's own agent); the slower direction is the value.
//   - nat.tcp-1stream.easy-easy-direct and nat.tcp-1stream.hard-hard-relay: iperf3, 1 stream, 10 s,
//     a1 → iperf-b1 over the direct path and c1 → iperf-d1 through the relay; goal relayed ≥ 0.5×
//     direct.
//   - nat.failover.{silent,eperm}.seconds and .failed-requests: the direct path a1 ↔ b1 is cut
//     natFailoverReps times while b1 requests web-a1 every 50 ms with a 5 s timeout (silent: DROP
//     of UDP between natA and natB in both routers' FORWARD chains; eperm: a1's OUTPUT REJECTs UDP
//     to natB, so every send fails with EPERM); the value is the slowest side's time from the cut
//     until its status says relay, worst of the repetitions (goal ≤ 1.5 s), and the requests
//     that failed from 1 s before the cut until 1 s after the path is direct again (goal 0).
//   - nat.time-to-first-byte.{lan,direct,relay}.p50 and .p99: both agents of a pair (a2 and a1 on
//     one LAN, b1 and a1 behind two easy NATs, d1 and c1 behind two hard NATs) are stopped and
//     started together natFirstByteReps times; each time, from their start until an HTTP request
//     from the first to the second's service IP succeeded (as time-to-first-byte above); goal p99
//     ≤ 1 s for lan and direct, ≤ 1.5 s relayed.
const (
	natPollInterval = 25 * time.Millisecond
	// natSlowPollInterval is the status polling during the throughput measurements.
	natSlowPollInterval = 250 * time.Millisecond
	// natDirectGoal is the goal of nat.easy-easy.time-to-direct.
	natDirectGoal = time.Second
	// natRelayGoal is the goal of the relayed throughput, as a fraction of the direct one.
	natRelayGoal = 0.5
	natHTTPPort  = 8080
	// natConnectTimeout is curl's --connect-timeout in natFirstRequest.
	natConnectTimeout = "0.2"
)

// natBenchRoles are the edge nodes: sites A and B are easy NATs, C and D hard; a2 shares a1's
// LAN. A node's site is the first letter of its role.
var natBenchRoles = []string{"a1", "b1", "c1", "d1", "a2"}

// natBenchHost is one edge node of the section's lab.
type natBenchHost struct {
	role, name string
	node       *Node
	pod        *Node
	podIP      netip.Addr
	agent      *Agent
	// iperfIP, echoIP and webIP are the ClusterIPs of iperf-<role>, echo-<role> and web-<role>.
	iperfIP, echoIP, webIP string
	site                   *Site
	addr                   netip.Addr
	opts                   AgentOptions
}

func (b *bench) natTraversal(t *testing.T) {
	b.daemons = nil
	relayBin := BuildMeshRelay(t, t.TempDir())
	start := time.Now()
	lab := NewLab(t)
	inet := NewInternet(t, lab)
	relayNode, relayAddr := inet.PublicHost(t, "relay1")
	hosts := map[string]*natBenchHost{}
	sites := map[string]*Site{}
	for i, name := range []string{"A", "B", "C", "D"} {
		kind := NATEasy
		if i >= 2 {
			kind = NATHard
		}
		sites[name] = inet.NATSite(t, name, kind, netip.PrefixFrom(netip.AddrFrom4([4]byte{192, 168, byte(i + 1), 0}), 24))
	}
	for i, role := range natBenchRoles {
		site := sites[strings.ToUpper(role[:1])]
		h := &natBenchHost{role: role, name: "edge-" + role, site: site,
			iperfIP: fmt.Sprintf("9.251.0.%d", 60+i), echoIP: fmt.Sprintf("9.251.0.%d", 70+i), webIP: fmt.Sprintf("9.251.0.%d", 80+i)}
		h.node, h.addr = site.Host(t, role)
		h.pod, h.podIP = AddPod(t, h.node, "pod"+role, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 1), 0}), 24))
		hosts[role] = h
	}
	for _, role := range natBenchRoles {
		h := hosts[role]
		b.startServers(t, h.pod)
		h.pod.Start(t, "http", bins.Testserver, "http", "--listen", ":"+strconv.Itoa(natHTTPPort), "--name", "pod-"+role).
			WaitLog(t, "listening on", 10*time.Second)
	}

	tokenFile := filepath.Join(lab.Dir, "join-token")
	if err := os.WriteFile(tokenFile, []byte(rand.Text()+"\n"), 0o600); err != nil {
		t.Fatalf("write %s: %v", tokenFile, err)
	}
	var specs []ServiceSpec
	for _, role := range natBenchRoles {
		h := hosts[role]
		eps := []EndpointSpec{{IP: h.podIP.String(), Ready: true, Node: h.name}}
		specs = append(specs,
			ServiceSpec{Name: "iperf-" + role, ClusterIP: h.iperfIP, Endpoints: eps,
				Ports: []PortSpec{{Name: "iperf", Port: benchIperf, TargetPort: benchIperf}}},
			ServiceSpec{Name: "echo-" + role, ClusterIP: h.echoIP, Endpoints: eps,
				Ports: []PortSpec{{Name: "echo", Port: benchEcho, TargetPort: benchEcho}}},
			ServiceSpec{Name: "web-" + role, ClusterIP: h.webIP, Endpoints: eps,
				Ports: []PortSpec{{Name: "http", Port: 80, TargetPort: natHTTPPort}}})
	}
	services := filepath.Join(lab.Dir, "services.yaml")
	WriteFileAtomic(t, services, RenderServices(specs))
	resolvConf := upstreamResolvConf(t, lab)

	relay := NewRelay(relayNode, relayAddr, relayBin, tokenFile)
	relay.Start(t, 20*time.Second)
	b.daemons = append(b.daemons, daemon{"relay", relay.Proc})
	t.Logf("NAT lab (relay, 2 easy and 2 hard NAT sites, 4 pods) built in %v", time.Since(start).Round(time.Millisecond))

	// The clock starts as the first agent is started; the agents start together, as they would on a
	// mesh that boots.
	agentsStart := time.Now()
	sockets := map[string]string{}
	for _, role := range natBenchRoles {
		h := hosts[role]
		h.opts = AgentOptions{Meshctl: b.meshctl, NodeName: h.name,
			ServicesFile: services, ResolvConf: resolvConf,
			// The product's default: debug logging would cost the data path.
			LogLevel: "info",
			Extra: []string{"--wg-interface", lab.Name(role), "--listen-port", wgPort, "--forward-port", fwdPort,
				"--relay", relay.HostPort(), "--join-token-file", tokenFile}}
		h.agent = StartAgent(t, h.node, h.opts)
		b.daemons = append(b.daemons, daemon{"agent-" + role, h.agent.Proc})
		sockets[h.name] = h.agent.ControlSocket
	}
	watch := WatchPaths(t, natPollInterval, sockets)
	defer watch.Stop()

	// Time to first byte through the relay, both directions at once, while the paths come up.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	type firstByte struct {
		took     time.Duration
		attempts int
		err      error
	}
	hard := [][2]*natBenchHost{{hosts["c1"], hosts["d1"]}, {hosts["d1"], hosts["c1"]}}
	firsts := make([]firstByte, len(hard))
	var wg sync.WaitGroup
	for i, d := range hard {
		wg.Go(func() {
			firsts[i].took, firsts[i].attempts, firsts[i].err = natFirstRequest(ctx, d[0], d[1], agentsStart)
		})
	}

	// Time to direct, easy ↔ easy.
	a1, b1 := hosts["a1"], hosts["b1"]
	easy := [][2]*natBenchHost{{a1, b1}, {b1, a1}}
	directErr := natWait(ctx, natPollInterval, func() error {
		for _, d := range easy {
			if _, ok := watch.First(d[0].name, d[1].name, "direct"); !ok {
				return fmt.Errorf("%s → %s not direct yet: %s", d[0].role, d[1].role, watch.History(d[0].name, d[1].name, agentsStart))
			}
		}
		return nil
	})
	wg.Wait()

	const directTimeName = "nat.easy-easy.time-to-direct"
	t.Run(directTimeName, func(t *testing.T) {
		const name = directTimeName
		if directErr != nil {
			b.report.Fail(name, directErr)
			t.Fatalf("no direct path a1 ↔ b1 %v after the agents started: %v", time.Since(agentsStart).Round(time.Millisecond), directErr)
		}
		raw := map[string]any{}
		var slowest time.Duration
		for _, d := range easy {
			at, _ := watch.First(d[0].name, d[1].name, "direct")
			took := at.Sub(agentsStart)
			slowest = max(slowest, took)
			key := d[0].role + "→" + d[1].role
			raw[key+".seconds"] = took.Seconds()
			raw[key+".history"] = watch.History(d[0].name, d[1].name, agentsStart)
			t.Logf("%s direct %v after the agents started (path history: %s)", key, took.Round(time.Millisecond),
				watch.History(d[0].name, d[1].name, agentsStart))
		}
		raw["pollMillis"] = natPollInterval.Milliseconds()
		b.report.Add(&Measurement{Name: name, Value: slowest.Seconds(), Unit: "s", Raw: raw,
			Goal: &Goal{Text: fmt.Sprintf("≤ %g s", natDirectGoal.Seconds()), Met: slowest <= natDirectGoal}})
	})
	const firstByteName = "nat.hard-hard.time-to-first-byte"
	t.Run(firstByteName, func(t *testing.T) {
		const name = firstByteName
		raw := map[string]any{}
		var slowest time.Duration
		var errs []error
		for i, d := range hard {
			key := d[0].role + "→web-" + d[1].role
			f := firsts[i]
			if f.err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", key, f.err))
				continue
			}
			slowest = max(slowest, f.took)
			raw[key+".seconds"] = f.took.Seconds()
			raw[key+".attempts"] = f.attempts
			t.Logf("%s: first successful request ended %v after the agents started (%d attempts; path history %s)", key,
				f.took.Round(time.Millisecond), f.attempts, watch.History(d[0].name, d[1].name, agentsStart))
		}
		if err := errors.Join(errs...); err != nil {
			b.report.Fail(name, err)
			t.Fatal(err)
		}
		b.report.Add(&Measurement{Name: name, Value: slowest.Seconds(), Unit: "s", Raw: raw})
	})
	if n, err := watch.Errors(); n > 0 {
		t.Logf("status polls that failed (mostly before the control sockets existed): %d, last: %v", n, err)
	}
	// The throughput measurements are not disturbed by fast polls; slow ones tell whether a path
	// changed while they ran.
	watch.Stop()
	watch = WatchPaths(t, natSlowPollInterval, sockets)

	const p = "nat.tcp-1stream."
	directName, relayName := p+"easy-easy-direct", p+"hard-hard-relay"
	for _, tc := range []struct {
		name     string
		from, to *natBenchHost
		kind     string
		refs     []string
	}{
		{directName, a1, b1, "direct", nil},
		{relayName, hosts["c1"], hosts["d1"], "relay", []string{directName}},
	} {
		if err := natCheckPaths(tc.from, tc.to, tc.kind); err != nil {
			b.report.Fail(tc.name, err)
			t.Errorf("%s: before the measurement: %v", tc.name, err)
			continue
		}
		b.warmUp(t, tc.from.node, net.JoinHostPort(tc.to.echoIP, strconv.Itoa(benchEcho)))
		measured := time.Now()
		relayedBefore, errBefore := natRelayedBytes(relay)
		b.tcp(t, tc.name, tc.from.node, tc.to.iperfIP, 1, tc.refs...)
		// How much of it crossed the relay: all of it for the relayed pair, nothing for the direct one.
		if relayedAfter, err := natRelayedBytes(relay); err == nil && errBefore == nil {
			relayed := relayedAfter - relayedBefore
			t.Logf("%s: the relay relayed %.1f MB while it ran", tc.name, relayed/1e6)
			if tc.kind == "direct" && relayed > 1e6 {
				// The agents said direct before and after, yet the data crossed the relay: the number
				// is not the direct path's.
				err := fmt.Errorf("the relay relayed %.0f MB during the measurement of the direct path", relayed/1e6)
				b.report.Fail(tc.name, err)
				t.Errorf("%s: %v", tc.name, err)
			}
			if m := b.report.byName[tc.name]; m != nil {
				if s, ok := m.Raw.(IperfSummary); ok {
					m.Raw = map[string]any{"iperf": s, "relayBytes": relayedAfter - relayedBefore}
				}
			}
		} else {
			t.Logf("%s: relay metrics: %v %v", tc.name, errBefore, err)
		}
		if err := natCheckPaths(tc.from, tc.to, tc.kind); err != nil {
			b.report.Fail(tc.name, fmt.Errorf("after the measurement: %w", err))
			t.Errorf("%s: after the measurement: %v", tc.name, err)
		}
		// A path that left kind during the measurement (and came back) is logged, not failed: the
		// number then describes a mix of paths.
		for _, d := range [][2]*natBenchHost{{tc.from, tc.to}, {tc.to, tc.from}} {
			if h := watch.History(d[0].name, d[1].name, measured); strings.Count(h, ";") > 0 {
				t.Logf("%s: %s's path to %s changed during the measurement (%v polls; since its start): %s",
					tc.name, d[0].role, d[1].role, natSlowPollInterval, h)
			}
		}
	}
	if m := b.report.byName[relayName]; m != nil {
		for _, r := range m.Ratios {
			if r.Of == directName {
				m.Goal = &Goal{Text: fmt.Sprintf("≥ %.1f× %s", natRelayGoal, directName), Met: r.Value >= natRelayGoal}
				t.Logf("relayed/direct = %.2f (goal ≥ %.1f)", r.Value, natRelayGoal)
			}
		}
	}
	watch.Stop()
	b.natFailover(t, hosts, sockets)
	b.natFirstByte(t, hosts)
}

// natFirstRequest requests web-<to> by its service IP from from's node until a request succeeds,
// and returns when that request ended, relative to since, and how many requests it took.
func natFirstRequest(ctx context.Context, from, to *natBenchHost, since time.Time) (time.Duration, int, error) {
	url := "http://" + to.webIP + "/"
	want := "pod-" + to.role + "\n"
	var lastErr error
	for attempts := 1; ; attempts++ {
		// The agent's netstack answers the connect at once when its routes exist; before they do, a
		// SYN goes to the default gateway and TCP would send the next one only 1 s later.
		out, err := from.node.ExecTimeout(6*time.Second, "curl", "-sS", "--connect-timeout", natConnectTimeout, "-m", "5",
			"-H", "Connection: close", url)
		if err == nil && out == want {
			return time.Since(since), attempts, nil
		}
		lastErr = fmt.Errorf("%v: %q", err, tailLines(out, 2))
		select {
		case <-ctx.Done():
			return 0, attempts, fmt.Errorf("no successful request after %v: last: %w", time.Since(since).Round(time.Millisecond), lastErr)
		case <-time.After(natPollInterval):
		}
	}
}

// natWait polls cond every interval until it returns nil or ctx ends; it returns cond's last error
// then.
func natWait(ctx context.Context, interval time.Duration, cond func() error) error {
	for {
		err := cond()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(interval):
		}
	}
}

// natCheckPaths checks that a's path to b and b's to a are of kind, now.
func natCheckPaths(a, b *natBenchHost, kind string) error {
	for _, d := range [][2]*natBenchHost{{a, b}, {b, a}} {
		paths, err := d[0].agent.Paths()
		if err != nil {
			return err
		}
		if p := paths[d[1].name]; p.Kind != kind {
			return fmt.Errorf("%s's path to %s is %q %s, want %s", d[0].role, d[1].role, p.Kind, p.Addr, kind)
		}
	}
	return nil
}

// natRelayedBytes reads edgewire_relay_bytes_relayed_total (summed over its labels, if any) from r's
// metrics.
func natRelayedBytes(r *Relay) (float64, error) {
	out, err := r.Metrics("edgewire_relay_bytes_relayed_total")
	if err != nil {
		return 0, err
	}
	var sum float64
	var n int
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("metrics line %q: %w", strings.TrimSpace(line), err)
		}
		sum += v
		n++
	}
	if n == 0 {
		return 0, errors.New("no edgewire_relay_bytes_relayed_total in the relay's metrics")
	}
	return sum, nil
}

const (
	natFailoverReps  = 5
	natFirstByteReps = 20
	natFailoverGoal  = 1500 * time.Millisecond
)

// natFetch requests web-<to> by its service IP from from's node (a new connection).
func natFetch(from, to *natBenchHost, timeout time.Duration) Result {
	r := Result{Start: time.Now()}
	out, err := from.node.ExecTimeout(timeout+time.Second, "curl", "-sS", "-m", fmt.Sprint(timeout.Seconds()),
		"-H", "Connection: close", "http://"+to.webIP+"/")
	r.End = time.Now()
	want := "pod-" + to.role + "\n"
	r.OK = err == nil && out == want
	if !r.OK {
		r.Detail = fmt.Sprintf("%v: %q", err, tailLines(out, 2))
	}
	return r
}

// natFailover measures nat.failover.*: see the section's doc.
func (b *bench) natFailover(t *testing.T, hosts map[string]*natBenchHost, sockets map[string]string) {
	a1, b1 := hosts["a1"], hosts["b1"]
	watch := WatchPaths(t, natPollInterval, sockets)
	defer watch.Stop()
	iptables := func(t *testing.T, n *Node, op string, rule []string) {
		if out, err := n.Exec(append([]string{"iptables", op}, rule...)...); err != nil {
			t.Errorf("iptables %s %v in %s: %v: %s", op, rule, n.Role, err, out)
		}
	}
	type rule struct {
		node *Node
		args []string
	}
	for _, tc := range []struct {
		name  string
		rules []rule
	}{
		{"silent", []rule{
			{a1.site.Router, []string{"FORWARD", "-p", "udp", "-d", b1.site.Public.String(), "-j", "DROP"}},
			{a1.site.Router, []string{"FORWARD", "-p", "udp", "-s", b1.site.Public.String(), "-j", "DROP"}},
			{b1.site.Router, []string{"FORWARD", "-p", "udp", "-d", a1.site.Public.String(), "-j", "DROP"}},
			{b1.site.Router, []string{"FORWARD", "-p", "udp", "-s", a1.site.Public.String(), "-j", "DROP"}},
		}},
		{"eperm", []rule{
			{a1.node, []string{"OUTPUT", "-p", "udp", "-d", b1.site.Public.String(), "-j", "REJECT"}},
		}},
	} {
		name := "nat.failover." + tc.name
		t.Run(name, func(t *testing.T) {
			var worst time.Duration
			var seconds []float64
			var failures []string
			requests := 0
			fail := func(err error) {
				b.report.Fail(name+".seconds", err)
				b.report.Fail(name+".failed-requests", err)
				t.Fatal(err)
			}
			for rep := range natFailoverReps {
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				err := natWait(ctx, natPollInterval, func() error { return natCheckPaths(a1, b1, "direct") })
				if err != nil {
					cancel()
					fail(fmt.Errorf("repetition %d: before the cut: %w", rep, err))
				}
				lp := StartPacedLoop(50*time.Millisecond, 200, func() Result { return natFetch(b1, a1, 5*time.Second) })
				started := time.Now()
				_ = natWait(ctx, natPollInterval, func() error {
					if time.Since(started) < time.Second {
						return errors.New("warming up")
					}
					return nil
				})
				cut := time.Now()
				for _, r := range tc.rules {
					iptables(t, r.node, "-I", r.args)
				}
				var took time.Duration
				var sides [2]time.Duration
				err = natWait(ctx, natPollInterval, func() error {
					for i, d := range [][2]*natBenchHost{{a1, b1}, {b1, a1}} {
						at, ok := watch.FirstSince(d[0].name, d[1].name, "relay", cut)
						if !ok {
							return fmt.Errorf("%s → %s not on the relay since the cut: %s", d[0].role, d[1].role, watch.History(d[0].name, d[1].name, cut))
						}
						sides[i] = at.Sub(cut)
						took = max(took, sides[i])
					}
					return nil
				})
				onRelay := time.Now()
				if err == nil {
					// Two seconds of requests on the relay.
					err = natWait(ctx, natPollInterval, func() error {
						if time.Since(onRelay) < 2*time.Second {
							return errors.New("on the relay")
						}
						return nil
					})
				}
				for _, r := range tc.rules {
					iptables(t, r.node, "-D", r.args)
				}
				if err == nil {
					err = natWait(ctx, natPollInterval, func() error { return natCheckPaths(a1, b1, "direct") })
				}
				back := time.Now()
				_ = natWait(ctx, natPollInterval, func() error {
					if time.Since(back) < time.Second {
						return errors.New("after the repair")
					}
					return nil
				})
				cancel()
				rs := lp.Stop()
				n, failed, gap := Summarize(rs, cut.Add(-time.Second), time.Now())
				requests += n
				failures = append(failures, failed...)
				if err != nil {
					fail(fmt.Errorf("repetition %d: %w", rep, err))
				}
				worst = max(worst, took)
				seconds = append(seconds, took.Seconds())
				t.Logf("%s repetition %d: on the relay %v (a1 → b1) and %v (b1 → a1) after the cut; %d requests, %d failed, longest gap %v; direct again %v after the repair",
					tc.name, rep, sides[0].Round(time.Millisecond), sides[1].Round(time.Millisecond), n, len(failed), gap.Round(time.Millisecond),
					back.Sub(onRelay).Round(time.Millisecond))
			}
			for _, f := range failures {
				t.Logf("failed request: %s", f)
			}
			b.report.Add(&Measurement{Name: name + ".seconds", Value: worst.Seconds(), Unit: "s",
				Raw:  map[string]any{"seconds": seconds, "pollMillis": natPollInterval.Milliseconds()},
				Goal: &Goal{Text: fmt.Sprintf("≤ %g s", natFailoverGoal.Seconds()), Met: worst <= natFailoverGoal}})
			b.report.Add(&Measurement{Name: name + ".failed-requests", Value: float64(len(failures)), Unit: "requests",
				Raw:  map[string]any{"requests": requests, "failed": failures},
				Goal: &Goal{Text: fmt.Sprintf("0 of %d (every 50 ms, 5 s timeout)", requests), Met: len(failures) == 0}})
		})
	}
}

// natFirstByte measures nat.time-to-first-byte.*: see the section's doc.
func (b *bench) natFirstByte(t *testing.T, hosts map[string]*natBenchHost) {
	for _, tc := range []struct {
		kind     string
		from, to *natBenchHost
		goal     time.Duration
	}{
		{"lan", hosts["a2"], hosts["a1"], time.Second},
		{"direct", hosts["b1"], hosts["a1"], time.Second},
		{"relay", hosts["d1"], hosts["c1"], 1500 * time.Millisecond},
	} {
		name := "nat.time-to-first-byte." + tc.kind
		t.Run(name, func(t *testing.T) {
			var took []time.Duration
			var attempts []int
			for rep := range natFirstByteReps {
				for _, h := range []*natBenchHost{tc.from, tc.to} {
					if err := h.agent.Stop(10 * time.Second); err != nil {
						t.Logf("stop %s's agent: %v", h.role, err)
					}
				}
				start := time.Now()
				for _, h := range []*natBenchHost{tc.from, tc.to} {
					h.agent = StartAgent(t, h.node, h.opts)
					for i := range b.daemons {
						if b.daemons[i].name == "agent-"+h.role {
							b.daemons[i].proc = h.agent.Proc
						}
					}
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				d, n, err := natFirstRequest(ctx, tc.from, tc.to, start)
				cancel()
				if err != nil {
					b.report.Fail(name+".p50", err)
					b.report.Fail(name+".p99", err)
					t.Fatalf("repetition %d: %v", rep, err)
				}
				took, attempts = append(took, d), append(attempts, n)
				if d > tc.goal {
					// What the two agents said about paths meanwhile (info level: no per-packet lines).
					for _, h := range []*natBenchHost{tc.from, tc.to} {
						var lines []string
						for line := range strings.Lines(h.agent.Log()) {
							if strings.Contains(line, "component=path") || strings.Contains(line, "ejected") || strings.Contains(line, "relay") {
								lines = append(lines, line)
							}
						}
						t.Logf("repetition %d took %v (%d attempts); %s's path and relay lines:\n%s", rep, d.Round(time.Millisecond), n, h.role,
							strings.Join(lines[max(0, len(lines)-25):], ""))
					}
				}
			}
			seconds := make([]float64, len(took))
			for i, d := range took {
				seconds[i] = d.Seconds()
			}
			sorted := slices.Clone(took)
			slices.Sort(sorted)
			p50 := sorted[(len(sorted)-1)/2]
			p99 := sorted[(len(sorted)*99+99)/100-1]
			raw := map[string]any{"seconds": seconds, "attempts": attempts}
			b.report.Add(&Measurement{Name: name + ".p50", Value: p50.Seconds(), Unit: "s", Raw: raw})
			b.report.Add(&Measurement{Name: name + ".p99", Value: p99.Seconds(), Unit: "s", Raw: raw,
				Goal: &Goal{Text: fmt.Sprintf("≤ %g s", tc.goal.Seconds()), Met: p99 <= tc.goal}})
			t.Logf("%s → web-%s after both agents start, %d repetitions: p50 %v, p99 %v (all: %v)", tc.from.role, tc.to.role,
				len(took), p50.Round(time.Millisecond), p99.Round(time.Millisecond), seconds)
		})
	}
}
