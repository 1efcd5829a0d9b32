package e2e

import (
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The load test: two agents, each in a memory cgroup of 256 MiB (the DaemonSet's limit) with a
// file limit of 20,000, take the loads an edge node meets — bulk transfers, many flows, UDP from
// many ports, DNS floods — while an ordinary client on the same node, from another address, keeps
// making a request and a DNS query every 50 ms. For each load the agents must not be killed or
// restarted, the ordinary client must see no failed request and ≥ 99% of its DNS answers within
// 100 ms, each agent's peak RSS must stay ≤ 100 MB, and within 30 s of the load's end each agent
// must be back to its idle footprint (RSS ≤ 50 MB, open files and goroutines within 10% of idle).
//
//	node2 (client node)                          node1                 pod1 (10.244.1.10)
//	  load generators  10.77.5.2 ─┐                agent ── veth ──────  http :8080, echo :7000,
//	  ordinary client  10.88.0.2 ─┴─ agent ═ LAN ═                       udpecho :9000, iperf3 :5201
//	                                10.77.5.0/24                         upstream DNS (node1 :53)

const (
	loadMemLimit  = 256 << 20
	loadNoFile    = 20000
	loadPeakRSS   = 100 << 20
	loadIdleRSS   = 50 << 20
	loadRecovery  = 30 * time.Second
	loadDuration  = 30 * time.Second
	loadFloodTime = 10 * time.Second
	loadProbeSrc  = "10.88.0.2"
	// loadSrc is the load generators' source address: the kernel would pick loadProbeSrc for both
	// (the lowest-scoped address when the route's device, mesh0, has no IPv4 address of its own).
	loadSrc        = "10.77.5.2"
	loadWebIP      = "9.251.0.80"
	loadEchoIP     = "9.251.0.7"
	loadUDPEchoIP  = "9.251.0.9"
	loadIperfIP    = "9.251.0.52"
	loadDNSIP      = "169.254.96.16"
	loadUpstreamIP = "10.77.5.1"
)

// loadAgent is an agent under a memory cgroup.
type loadAgent struct {
	*Agent
	cg *MemCgroup
}

// footprint is what an agent holds, from `meshctl status --json`.
type footprint struct {
	RSS, PeakRSS, Heap  uint64
	Goroutines, OpenFDs int
}

func (f footprint) String() string {
	return fmt.Sprintf("RSS %.1f MiB (peak %.1f MiB, Go heap %.1f MiB), %d goroutines, %d files",
		mib(f.RSS), mib(f.PeakRSS), mib(f.Heap), f.Goroutines, f.OpenFDs)
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

func (a *loadAgent) footprint(t *testing.T) footprint {
	t.Helper()
	var st struct {
		Process struct {
			RSSBytes     uint64 `json:"rssBytes"`
			PeakRSSBytes uint64 `json:"peakRSSBytes"`
			HeapBytes    uint64 `json:"heapBytes"`
			Goroutines   int    `json:"goroutines"`
			OpenFiles    int    `json:"openFiles"`
		} `json:"process"`
	}
	a.CtlJSON(t, &st, "status", "--json")
	return footprint{RSS: st.Process.RSSBytes, PeakRSS: st.Process.PeakRSSBytes, Heap: st.Process.HeapBytes,
		Goroutines: st.Process.Goroutines, OpenFDs: st.Process.OpenFiles}
}

// peakRSS reads the agent's VmHWM (the peak since resetPeak).
func (a *loadAgent) peakRSS(t *testing.T) uint64 {
	t.Helper()
	peak, err := procPeakRSS(a.PID())
	if err != nil {
		t.Fatalf("%s: %v", a, err)
	}
	return peak
}

// procPeakRSS reads a process's VmHWM.
func procPeakRSS(pid int) (uint64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("pid %d: no VmHWM", pid)
}

// resetPeak makes VmHWM start again from the current RSS.
func (a *loadAgent) resetPeak(t *testing.T) {
	t.Helper()
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", a.PID()), []byte("5"), 0o200); err != nil {
		t.Fatalf("%s: reset peak RSS: %v", a, err)
	}
}

// within reports whether now is within 10% of idle (at least 2, so that a one-off spare
// connection of the forward dialer is not a leak).
func within(now, idle int) bool {
	slack := max(2, int(math.Ceil(float64(idle)*0.10)))
	return now <= idle+slack
}

// loadLab is the topology above with both agents up and the catalog loaded.
type loadLab struct {
	lab                           *Lab
	node1, node2                  *Node
	meshctl, services, resolvConf string
	agents                        []*loadAgent
	starts                        int
}

// startAgents stops the agents that run and starts both afresh, each in a memory cgroup of its own
// (each load is measured from fresh agents: what one load leaves behind is not the next one's
// baseline), and waits until node2 reaches a service on node1 through the mesh.
func (ll *loadLab) startAgents(t *testing.T) {
	t.Helper()
	for _, a := range ll.agents {
		if err := a.Stop(10 * time.Second); err != nil {
			t.Fatalf("stop %s: %v\n%s", a, err, a.Tail(20))
		}
	}
	ll.agents = nil
	ll.starts++
	for _, n := range []*Node{ll.node1, ll.node2} {
		cg := NewMemCgroup(t, ll.lab, fmt.Sprintf("%s-agent%d", n.Role, ll.starts), loadMemLimit)
		a := StartAgent(t, n, AgentOptions{
			Meshctl: ll.meshctl, ServicesFile: ll.services, ResolvConf: ll.resolvConf, LogLevel: "info",
			Cgroup: cg, NoFile: loadNoFile,
			Extra: []string{"--health-addr", "127.0.0.1:9269", "--pprof"},
		})
		a.WaitReady(t, 30*time.Second)
		ll.agents = append(ll.agents, &loadAgent{Agent: a, cg: cg})
	}
	// Both agents serve the catalog, and the client node reaches every service through the mesh.
	Eventually(t, 20*time.Second, 100*time.Millisecond, "web reachable from node2", func() error {
		if r := curlOnce(ll.node2, "http://"+loadWebIP+"/"); !r.ok() {
			return fmt.Errorf("%+v", r)
		}
		return nil
	})
	for _, a := range ll.agents {
		log := a.Log()
		if !strings.Contains(log, "resource limits") || !strings.Contains(log, fmt.Sprintf("cgroup_memory_limit=%d", loadMemLimit)) ||
			!strings.Contains(log, fmt.Sprintf("nofile=%d", loadNoFile)) {
			t.Fatalf("%s did not log the limits of its cgroup (%d bytes, %d files):\n%s", a, loadMemLimit, loadNoFile, a.Tail(30))
		}
	}
}

func newLoadLab(t *testing.T) *loadLab {
	meshctl := needMeshctl(t)
	lab := NewLab(t)
	lan := lab.LAN(t, "lan", netip.MustParsePrefix("10.77.5.0/24"))
	node1, node2, pod := lab.Node(t, "node1"), lab.Node(t, "node2"), lab.Node(t, "pod1")
	lan.Attach(t, node1, netip.MustParseAddr("10.77.5.1"))
	lan.Attach(t, node2, netip.MustParseAddr("10.77.5.2"))
	lab.Link(t, node1, netip.MustParsePrefix("10.244.1.1/24"), pod, netip.MustParsePrefix("10.244.1.10/24"))
	pod.SetDefaultRoute(t, netip.MustParseAddr("10.244.1.1"))
	// The ordinary client's own address on node2.
	node2.MustExec(t, "ip", "addr", "add", loadProbeSrc+"/32", "dev", "lo")
	for _, n := range []*Node{node1, node2, pod} {
		n.MustExec(t, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65535",
			"net.core.somaxconn=16384", "net.ipv4.tcp_max_syn_backlog=16384")
	}

	servers := []*Proc{
		pod.Start(t, "http", bins.Testserver, "http", "--listen", ":8080", "--name", "pod1"),
		pod.Start(t, "echo", bins.Benchtool, "echo", "--listen", ":7000"),
		pod.Start(t, "udpecho", bins.Testserver, "udpecho", "--listen", ":9000", "--name", "pod1"),
		pod.Start(t, "iperf3", "iperf3", "-s", "-p", "5201", "--forceflush"),
		node1.Start(t, "upstream", bins.Testserver, "dns", "--listen", loadUpstreamIP+":53", "--record", "example.test=192.0.2.1"),
	}
	for _, p := range servers[:3] {
		p.WaitLog(t, "listening on", 10*time.Second)
	}
	servers[3].WaitLog(t, "Server listening", 10*time.Second)
	servers[4].WaitLog(t, "listening on", 10*time.Second)

	var nodes []NodeSpec
	for i, n := range []*Node{node1, node2} {
		keys := Keygen(t, n, meshctl, filepath.Join(lab.Dir, n.Role+"-state"))
		nodes = append(nodes, NodeSpec{Name: n.Role, PublicKey: keys.WireGuardPublicKey,
			Endpoints: []string{fmt.Sprintf("10.77.5.%d:51820", i+1)}})
	}
	eps := []EndpointSpec{{IP: "10.244.1.10", Ready: true, Node: "node1"}}
	catalog := []ServiceSpec{
		{Name: "web", ClusterIP: loadWebIP, Endpoints: eps, Ports: []PortSpec{{Name: "http", Port: 80, TargetPort: 8080}}},
		{Name: "echo", ClusterIP: loadEchoIP, Endpoints: eps, Ports: []PortSpec{{Name: "echo", Port: 7000, TargetPort: 7000}}},
		{Name: "udpecho", ClusterIP: loadUDPEchoIP, Endpoints: eps, Ports: []PortSpec{{Name: "udp", Protocol: "UDP", Port: 9000, TargetPort: 9000}}},
		{Name: "iperf", ClusterIP: loadIperfIP, Endpoints: eps, Ports: []PortSpec{{Name: "iperf", Port: 5201, TargetPort: 5201}}},
	}
	services := filepath.Join(lab.Dir, "services.yaml")
	WriteFileAtomic(t, services, RenderServices(catalog)+RenderNodes(nodes))
	resolvConf := filepath.Join(lab.Dir, "upstream-resolv.conf")
	if err := os.WriteFile(resolvConf, []byte("nameserver "+loadUpstreamIP+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	// measure starts the agents for each load.
	ll := &loadLab{lab: lab, node1: node1, node2: node2, meshctl: meshctl, services: services, resolvConf: resolvConf}
	return ll
}

// load is one scenario: run drives it from node2 and fails t when the load itself did not happen
// as meant (it checks its own generator's report).
type load struct {
	name string
	run  func(t *testing.T, ll *loadLab)
}

func TestLoad(t *testing.T) {
	ll := newLoadLab(t)
	for _, ld := range loadScenarios() {
		t.Run(ld.name, func(t *testing.T) { ll.check(t, ll.measure(t, ld)) })
	}
}

// loadScenarios are the loads of the issue, in the order they run (make bench runs them too).
func loadScenarios() []load {
	return []load{
		{name: "bulk 4 TCP streams", run: func(t *testing.T, ll *loadLab) {
			out, err := ll.node2.ExecTimeout(loadDuration+30*time.Second, "iperf3", "-c", loadIperfIP, "-B", loadSrc, "-P", "4",
				"-t", strconv.Itoa(int(loadDuration/time.Second)), "-J")
			sum, perr := parseIperfOutput(out, err)
			if perr != nil {
				t.Fatalf("iperf3: %v", perr)
			}
			t.Logf("bulk: %.2f Gbit/s for %v", sum.ReceivedBps/1e9, loadDuration)
		}},
		{name: "10000 concurrent TCP flows", run: func(t *testing.T, ll *loadLab) {
			var r struct {
				Opened, Failed, MaxOpen int
				Errors                  map[string]int
			}
			ll.runJSON(t, &r, loadDuration+60*time.Second, bins.Benchtool, "hold", "--source", loadSrc, "--target", loadEchoIP+":7000",
				"--conns", "10000", "--duration", loadDuration.String())
			t.Logf("flows: %d held, %d refused or failed, errors %v", r.Opened, r.Failed, r.Errors)
			if r.Opened+r.Failed != 10000 || r.Opened == 0 {
				t.Fatalf("the load did not run as meant: %+v", r)
			}
		}},
		{name: "UDP from 15000 source ports", run: func(t *testing.T, ll *loadLab) {
			var r struct {
				Ports                 int
				Sent, Replies, Errors int64
			}
			ll.runJSON(t, &r, loadDuration+60*time.Second, bins.Benchtool, "udpfan", "--source", loadSrc, "--target", loadUDPEchoIP+":9000",
				"--ports", "15000", "--duration", loadDuration.String())
			t.Logf("udp: %d ports, %d datagrams sent, %d replies", r.Ports, r.Sent, r.Replies)
			if r.Ports != 15000 || r.Sent < 15000 {
				t.Fatalf("the load did not run as meant: %+v", r)
			}
		}},
		dnsFlood("bytes"),
		dnsFlood("cluster"),
		dnsFlood("external"),
	}
}

func dnsFlood(kind string) load {
	return load{name: "DNS flood of random " + kind, run: func(t *testing.T, ll *loadLab) {
		var r struct {
			Sent    int64
			PPS     float64
			Replies int64
		}
		ll.runJSON(t, &r, loadFloodTime+30*time.Second, bins.Benchtool, "dnsflood", "--source", loadSrc, "--server", loadDNSIP+":53",
			"--kind", kind, "--rate", "200000", "--duration", loadFloodTime.String())
		t.Logf("dns flood %s: %d packets at %.0f/s, %d replies", kind, r.Sent, r.PPS, r.Replies)
		if r.Sent == 0 {
			t.Fatalf("the flood sent nothing: %+v", r)
		}
	}}
}

// runJSON runs a load generator in node2 and decodes the JSON object it prints last.
func (ll *loadLab) runJSON(t *testing.T, v any, timeout time.Duration, args ...string) {
	t.Helper()
	out, err := ll.node2.ExecTimeout(timeout, args...)
	if err != nil {
		t.Fatalf("%s: %v\n%s", args[1], err, lastLines(out, 10))
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), v); err != nil {
		t.Fatalf("%s: %v\n%s", args[1], err, lastLines(out, 10))
	}
}

// probeResult is what benchtool probe prints.
type probeResult struct {
	Requests        int            `json:"requests"`
	RequestFailures int            `json:"requestFailures"`
	RequestP99      float64        `json:"requestP99us"`
	DNSQueries      int            `json:"dnsQueries"`
	DNSFailures     int            `json:"dnsFailures"`
	DNSWithin100ms  int            `json:"dnsWithin100ms"`
	DNSP99          float64        `json:"dnsP99us"`
	FailureSamples  map[string]int `json:"failureSamples"`
}

// loadOutcome is what one load did to the agents and to the ordinary client.
type loadOutcome struct {
	took  time.Duration
	probe probeResult
	// Per agent, in ll.agents' order:
	idle, final []footprint
	peak        []uint64
	oomKills    []int64
	exited      []bool
	recovered   []time.Duration // time to the idle footprint after the load; -1: not within loadRecovery
}

// measure runs ld while the ordinary client probes, then waits up to loadRecovery for each agent to
// return to its idle footprint, and reports what happened. It fails t only when the harness itself
// fails; check holds the outcome to the goals.
func (ll *loadLab) measure(t *testing.T, ld load) loadOutcome {
	ll.startAgents(t)
	n := len(ll.agents)
	o := loadOutcome{idle: make([]footprint, n), final: make([]footprint, n), peak: make([]uint64, n),
		oomKills: make([]int64, n), exited: make([]bool, n), recovered: make([]time.Duration, n)}
	oom := make([]int64, n)
	for i, a := range ll.agents {
		o.idle[i] = a.footprint(t)
		a.resetPeak(t)
		var err error
		if oom[i], err = a.cg.OOMKills(); err != nil {
			t.Fatalf("%s: %v", a, err)
		}
		t.Logf("%s idle: %s", a, o.idle[i])
	}
	probe := ll.node2.Start(t, "probe-"+strings.ReplaceAll(ld.name, " ", "-"), bins.Benchtool, "probe",
		"--source", loadProbeSrc, "--url", "http://"+loadWebIP+"/", "--dns", loadDNSIP+":53",
		"--name", "web.default.svc.cluster.local", "--interval", "50ms", "--timeout", "5s")
	start := time.Now()
	ld.run(t, ll)
	o.took = time.Since(start)
	ll.saveProfiles(t, ld.name)
	if err := probe.Stop(10 * time.Second); err != nil {
		t.Errorf("ordinary client: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(probe.Log()), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &o.probe); err != nil {
		t.Fatalf("ordinary client's report: %v\n%s", err, probe.Tail(10))
	}
	pr := o.probe
	t.Logf("ordinary client during %v: %d requests, %d failed (p99 %.1f ms); %d DNS queries, %d failed, %d within 100 ms (p99 %.1f ms); failures %v",
		o.took.Round(time.Second), pr.Requests, pr.RequestFailures, pr.RequestP99/1e3, pr.DNSQueries, pr.DNSFailures, pr.DNSWithin100ms, pr.DNSP99/1e3, pr.FailureSamples)
	for i, a := range ll.agents {
		if o.exited[i] = a.Exited(); o.exited[i] {
			t.Fatalf("%s exited during the load: %v\n%s", a, a.Wait(0), a.Tail(30))
		}
		kills, err := a.cg.OOMKills()
		if err != nil {
			t.Fatalf("%s: %v", a, err)
		}
		o.oomKills[i] = kills - oom[i]
		o.peak[i] = a.peakRSS(t)
		t.Logf("%s peak RSS during the load: %.1f MiB", a, mib(o.peak[i]))
	}
	end := time.Now()
	for i, a := range ll.agents {
		o.recovered[i] = -1
		deadline := end.Add(loadRecovery)
		for {
			o.final[i] = a.footprint(t)
			if o.final[i].RSS <= loadIdleRSS && within(o.final[i].OpenFDs, o.idle[i].OpenFDs) && within(o.final[i].Goroutines, o.idle[i].Goroutines) {
				o.recovered[i] = time.Since(end)
				break
			}
			if time.Now().After(deadline) {
				break
			}
			time.Sleep(500 * time.Millisecond) // polling the agent's footprint
		}
		t.Logf("%s %v after the load: %s", a, time.Since(end).Round(100*time.Millisecond), o.final[i])
	}
	ll.saveProfiles(t, ld.name+" after")
	return o
}

// check holds o to the goals of the issue; on a failure it logs each agent's status and log tail.
func (ll *loadLab) check(t *testing.T, o loadOutcome) {
	pr := o.probe
	if pr.Requests < int(o.took/(100*time.Millisecond)) {
		t.Errorf("ordinary client made %d requests in %v: it did not keep up its 50 ms pace", pr.Requests, o.took)
	}
	if pr.RequestFailures > 0 {
		t.Errorf("ordinary client: %d of %d requests failed during the load (want 0): %v", pr.RequestFailures, pr.Requests, pr.FailureSamples)
	}
	if pr.DNSQueries == 0 || float64(pr.DNSWithin100ms) < 0.99*float64(pr.DNSQueries) {
		t.Errorf("ordinary client: %d of %d DNS answers within 100 ms (want >= 99%%)", pr.DNSWithin100ms, pr.DNSQueries)
	}
	for i, a := range ll.agents {
		if o.oomKills[i] != 0 {
			t.Errorf("%s: %d OOM kills in its cgroup during the load", a, o.oomKills[i])
		}
		if o.peak[i] > loadPeakRSS {
			t.Errorf("%s: peak RSS %.1f MiB during the load, want <= %d MiB", a, mib(o.peak[i]), loadPeakRSS>>20)
		}
		if o.recovered[i] < 0 {
			t.Errorf("%s not back to its idle footprint %v after the load (RSS <= %d MiB, files and goroutines within 10%% of idle): now %s; idle was %s",
				a, loadRecovery, loadIdleRSS>>20, o.final[i], o.idle[i])
		}
	}
	if t.Failed() {
		for _, a := range ll.agents {
			out, _ := a.Ctl("status")
			t.Logf("%s after the load:\n%s\nlog tail:\n%s", a, out, a.Tail(15))
		}
	}
}

// saveProfiles writes each agent's heap profile, as the load leaves it, to the directory
// $EDGEWIRE_LOAD_PROFILES when that is set (for `go tool pprof`; see docs/limits.md).
func (ll *loadLab) saveProfiles(t *testing.T, name string) {
	dir := os.Getenv("EDGEWIRE_LOAD_PROFILES")
	if dir == "" {
		return
	}
	for _, a := range ll.agents {
		file := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+"-"+a.Node.Role+".heap")
		if out, err := a.Node.Exec("curl", "-sS", "-m", "10", "-o", file, "http://127.0.0.1:9269/debug/pprof/heap"); err != nil {
			t.Errorf("heap profile of %s: %v %s", a, err, out)
		}
	}
}
