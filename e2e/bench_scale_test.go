//go:build bench

package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"golang.org/x/sys/unix"
)

// The scale section of the benchmark suite ("scale"): the agent's memory as the catalog grows, the
// time a catalog takes to load, and the time a catalog change takes to be answered by DNS on every
// node. Three namespaces on a LAN, 10.77.3.0/24, that nothing crosses (each agent has its TUN,
// service netstack and DNS server; none has a peer), and one catalog file, the static source, that
// every agent reads:
//
//	scale1  10.77.3.1  agent: RSS idle, with 1,000 and with 10,000 services; load and change times
//	scale2  10.77.3.2  agent, during the propagation rounds only
//	scale3  10.77.3.3  agent, during the propagation rounds only
//
// The catalogs (writeScaleCatalog) are what `kubectl get svc,endpointslices -o yaml` prints for N
// services spread over scaleNamespaces namespaces, each with two TCP ports and one EndpointSlice of
// scaleEndpointsPerService ready endpoints (a pod IP of its own, a targetRef, a nodeName among
// scaleFakeNodes nodes that have no Node object, so no peer), clusterIPs outside the mesh's range so
// that the agent derives the service IPs: 1,000 services hold 10,000 endpoints, 10,000 services
// 100,000 (one slice per service: Kubernetes cuts slices at 100 endpoints).
//
// Measurements, on scale1's agent (started with an empty catalog) unless said:
//
//   - scale.rss.idle, scale.rss.1k-services, scale.rss.10k-services: the agent's VmRSS
//     (/proc/<pid>/status) once the catalog is applied: the largest of scaleRSSSamples samples over
//     scaleRSSWindow, taken after the agent's DNS answers the catalog's last service and `meshctl
//     status` counts every service and endpoint. Goals: ≤ 50 MB with 1,000 services, ≤ 300 MB with
//     10,000 (MB = 10^6 bytes). Raw splits the RSS into RssAnon (the heap) and RssFile (mostly the
//     binary's pages) and has VmHWM, the peak since the agent started (the reloads' transient).
//     The agent does not collect garbage while idle (Go forces a collection every two minutes),
//     so these include the garbage of the last reload that the window did not see collected.
//   - scale.load.1k-services (from the empty catalog), scale.load.10k-services (from 1,000): from
//     the rename of the new file over the old one until the agent's DNS, polled every
//     scalePollInterval from the agent's namespace (scaleRounds), answers the A record of the
//     catalog's last service: the file watch, its debounce, YAML parsing, service IPs, the proxy
//     table and the DNS index. Raw has the agent's CPU seconds over that time.
//   - scale.propagation.3-nodes.1k-services: with the 1,000-service catalog loaded by three agents
//     (scale1-3), a service is added to the file and its name polled on every node. A round's
//     value is the slowest node's time from the rename; the measurement is the median of
//     scalePropagationRounds rounds. Goal ≤ 1 s. The three agents share the machine's CPUs, where
//     real nodes would each have theirs.
//   - scale.change.1-node.10k-services: the same on scale1 alone with the 10,000-service catalog
//     (median of scaleChangeRounds rounds): the static source re-reads and re-parses the whole
//     file on every change. Goal ≤ 1 s (the goal names no catalog size).
//   - scale.rss.10k-services.after-changes: scale1's RSS as above after those changes, each of which
//     rebuilt the whole catalog while the old one still served. Goal ≤ 300 MB.
//
// Every poll starts with the name unanswered on every node and ends with `dig` in the node
// getting it too.
const (
	scaleNamespaces          = 50
	scaleEndpointsPerService = 10
	scaleFakeNodes           = 10
	scalePollInterval        = 5 * time.Millisecond
	scaleRSSSamples          = 10
	scaleRSSWindow           = 2 * time.Second
	scalePropagationRounds   = 5
	scaleChangeRounds        = 3
	// scaleLoadTimeout bounds a load or a change, on a slow and busy machine.
	scaleLoadTimeout = 3 * time.Minute
	scaleChangeGoal  = time.Second
	// scaleDNSIP is the agents' DNS address (the default of --dns-ip).
	scaleDNSIP = "169.254.96.16"
)

// scaleRSSGoals are the goals of scale.rss.*, in bytes, by number of services.
var scaleRSSGoals = map[int]float64{1000: 50e6, 10000: 300e6}

func (b *bench) scale(t *testing.T) {
	b.daemons = nil
	lab := NewLab(t)
	// A LAN gives the nodes an IPv4 address for their DNS queries' source (mesh0 has only the
	// overlay's IPv6 address); nothing crosses it.
	lan := lab.LAN(t, "lan", netip.MustParsePrefix("10.77.3.0/24"))
	nodes := make([]*Node, 3)
	for i := range nodes {
		nodes[i] = lab.Node(t, fmt.Sprintf("scale%d", i+1))
		lan.Attach(t, nodes[i], netip.AddrFrom4([4]byte{10, 77, 3, byte(i + 1)}))
	}
	catalog := filepath.Join(lab.Dir, "services.yaml")
	writeScaleCatalog(t, catalog, 0, nil)
	resolvConf := upstreamResolvConf(t, lab)
	agent := b.startScaleAgent(t, nodes[0], catalog, resolvConf)
	b.daemons = append(b.daemons, daemon{"agent-" + nodes[0].Role, agent.Proc})

	if !t.Run("scale.rss.idle", func(t *testing.T) { b.scaleRSS(t, "scale.rss.idle", agent, 0) }) {
		return
	}
	if !t.Run("load-1k", func(t *testing.T) { b.scaleLoad(t, agent, catalog, 1000) }) {
		return
	}
	if !t.Run("propagation", func(t *testing.T) { b.scalePropagation(t, agent, nodes[1:], catalog, resolvConf, 1000) }) {
		return
	}
	if !t.Run("load-10k", func(t *testing.T) { b.scaleLoad(t, agent, catalog, 10000) }) {
		return
	}
	if !t.Run("change-10k", func(t *testing.T) {
		b.scaleChanges(t, "scale.change.1-node.10k-services", nodes[:1], catalog, 10000, scaleChangeRounds)
	}) {
		return
	}
	t.Run(scaleAfterChanges, func(t *testing.T) { b.scaleRSS(t, scaleAfterChanges, agent, 10000) })
}

// scaleAfterChanges is the RSS measurement after the 10,000-service catalog has changed.
const scaleAfterChanges = "scale.rss.10k-services.after-changes"

// startScaleAgent starts an agent in n on catalog and waits until it answers on its control socket.
func (b *bench) startScaleAgent(t *testing.T, n *Node, catalog, resolvConf string) *Agent {
	t.Helper()
	a := StartAgent(t, n, AgentOptions{Meshctl: b.meshctl, ServicesFile: catalog, ResolvConf: resolvConf,
		// The product's default: debug logging would log every catalog change at length.
		LogLevel: "info"})
	took := a.WaitReady(t, 30*time.Second)
	t.Logf("agent in %s ready after %v", n.Role, took.Round(time.Millisecond))
	return a
}

// scaleLabel names a catalog size in measurement names: "1k-services".
func scaleLabel(services int) string {
	if services%1000 == 0 {
		return fmt.Sprintf("%dk-services", services/1000)
	}
	return fmt.Sprintf("%d-services", services)
}

// scaleLoad replaces the catalog with one of services services, measures how long scale1's agent
// takes to answer the last of them, checks the agent's counts and measures its RSS.
func (b *bench) scaleLoad(t *testing.T, a *Agent, catalog string, services int) {
	label := scaleLabel(services)
	name := "scale.load." + label
	ns, svc := scaleServiceName(services - 1)
	fqdn := svc + "." + ns + ".svc.cluster.local"
	cpuBefore, cpuErr := ProcCPUSeconds(a.PID())
	var size int64
	rounds, err := scaleRounds(t, func() { size = writeScaleCatalog(t, catalog, services, nil) }, fqdn, a.Node)
	if err != nil {
		b.report.Fail(name, err)
		t.Fatalf("%s: %v", name, err)
	}
	took := rounds[a.Node.Role]
	raw := map[string]any{"fileBytes": size, "queries": took.queries, "pollMillis": scalePollInterval.Milliseconds()}
	cpu := "unknown"
	if cpuAfter, err := ProcCPUSeconds(a.PID()); err == nil && cpuErr == nil {
		raw["agentCPUSeconds"] = cpuAfter - cpuBefore
		cpu = fmt.Sprintf("%.2f s", cpuAfter-cpuBefore)
	}
	b.report.Add(&Measurement{Name: name, Value: took.d.Seconds(), Unit: "s", Raw: raw})
	t.Logf("%s: %d services, %d endpoints (%.1f MB of YAML) answered by DNS %v after the file changed (agent CPU %s)",
		name, services, services*scaleEndpointsPerService, float64(size)/1e6, took.d.Round(time.Millisecond), cpu)
	waitScaleCounts(t, a, services)
	b.scaleRSS(t, "scale.rss."+label, a, services)
	checkScaleServices(t, a, services)
}

// scalePropagation starts agents in others on catalog (which holds services generated services),
// measures how long a change takes to be answered by every agent (scaleChanges) and stops the
// agents it started.
func (b *bench) scalePropagation(t *testing.T, first *Agent, others []*Node, catalog, resolvConf string, services int) {
	agents := []*Agent{first}
	for _, n := range others {
		a := b.startScaleAgent(t, n, catalog, resolvConf)
		agents = append(agents, a)
		defer func() {
			if err := a.Stop(5 * time.Second); err != nil {
				t.Errorf("stop the agent in %s: %v", n.Role, err)
			}
		}()
	}
	nodes := make([]*Node, len(agents))
	for i, a := range agents {
		waitScaleCounts(t, a, services)
		nodes[i] = a.Node
	}
	name := fmt.Sprintf("scale.propagation.%d-nodes.%s", len(nodes), scaleLabel(services))
	b.scaleChanges(t, name, nodes, catalog, services, scalePropagationRounds)
}

// scaleChanges adds a service to a catalog of services generated services, rounds times, and
// records as name the median over the rounds of the time the slowest agent of nodes took to
// answer it.
func (b *bench) scaleChanges(t *testing.T, name string, nodes []*Node, catalog string, services, rounds int) {
	var extra []string
	var values []time.Duration
	var raw []map[string]float64
	for r := 1; r <= rounds; r++ {
		added := fmt.Sprintf("added-%d", r)
		extra = append(extra, added)
		res, err := scaleRounds(t, func() { writeScaleCatalog(t, catalog, services, extra) },
			added+".default.svc.cluster.local", nodes...)
		if err != nil {
			b.report.Fail(name, fmt.Errorf("round %d: %w", r, err))
			t.Fatalf("%s: round %d: %v", name, r, err)
		}
		values = append(values, slowest(res))
		raw = append(raw, seconds(res))
		t.Logf("%s: round %d: %s", name, r, describeRound(res))
		time.Sleep(time.Second) // let the agents settle between rounds
	}
	med := median(values)
	b.report.Add(&Measurement{Name: name, Value: med.Seconds(), Unit: "s",
		Raw:  map[string]any{"rounds": raw, "pollMillis": scalePollInterval.Milliseconds()},
		Goal: &Goal{Text: fmt.Sprintf("≤ %g s", scaleChangeGoal.Seconds()), Met: med <= scaleChangeGoal}})
}

// scaleRSS records the agent's settled RSS as name, with the goal for services services if any.
func (b *bench) scaleRSS(t *testing.T, name string, a *Agent, services int) {
	rss, err := settledRSS(a.PID())
	if err != nil {
		b.report.Fail(name, err)
		t.Fatalf("%s: %v", name, err)
	}
	raw := map[string]any{"samples": scaleRSSSamples, "windowSeconds": scaleRSSWindow.Seconds()}
	// The last sample's split between anonymous memory (the heap) and the pages of the mapped
	// binary, and the peak since the agent started.
	fields := map[string]int64{}
	for _, f := range []string{"RssAnon", "RssFile", "VmHWM"} {
		if v, err := procStatusBytes(a.PID(), f); err == nil {
			fields[f] = v
			raw[strings.ToLower(f[:1])+f[1:]+"Bytes"] = v
		}
	}
	m := &Measurement{Name: name, Value: float64(rss) / 1e6, Unit: "MB", Raw: raw}
	if goal, ok := scaleRSSGoals[services]; ok {
		m.Goal = &Goal{Text: fmt.Sprintf("≤ %g MB", goal/1e6), Met: float64(rss) <= goal}
	}
	b.report.Add(m, "scale.rss.idle")
	t.Logf("%s: VmRSS %.1f MB (anonymous %.1f MB, binary and other files %.1f MB; peak since start %.1f MB)", name,
		float64(rss)/1e6, float64(fields["RssAnon"])/1e6, float64(fields["RssFile"])/1e6, float64(fields["VmHWM"])/1e6)
}

// settledRSS returns the largest VmRSS of pid over scaleRSSWindow.
func settledRSS(pid int) (int64, error) {
	var largest int64
	for i := range scaleRSSSamples {
		if i > 0 {
			time.Sleep(scaleRSSWindow / scaleRSSSamples)
		}
		v, err := procStatusBytes(pid, "VmRSS")
		if err != nil {
			return 0, err
		}
		largest = max(largest, v)
	}
	return largest, nil
}

// procStatusBytes reads a kB field ("VmRSS", "VmHWM") of /proc/<pid>/status, in bytes.
func procStatusBytes(pid int, field string) (int64, error) {
	p := fmt.Sprintf("/proc/%d/status", pid)
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		k, v, ok := strings.Cut(line, ":")
		if !ok || k != field {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("%s: %s: unexpected %q", p, field, strings.TrimSpace(v))
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s: %s: %w", p, field, err)
		}
		return kb * 1024, nil
	}
	return 0, fmt.Errorf("%s: no %s", p, field)
}

// waitScaleCounts waits until a's `meshctl status` counts exactly services services and their
// endpoints: the generated catalog, nothing added.
func waitScaleCounts(t *testing.T, a *Agent, services int) {
	t.Helper()
	Eventually(t, scaleLoadTimeout, 100*time.Millisecond, "catalog counted in "+a.Node.Role, func() error {
		var st Status
		out, err := a.Ctl("status", "--json")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			return fmt.Errorf("meshctl status --json: %w", err)
		}
		if st.Services != services || st.Endpoints != services*scaleEndpointsPerService {
			return fmt.Errorf("%d services, %d endpoints; want %d and %d", st.Services, st.Endpoints,
				services, services*scaleEndpointsPerService)
		}
		return nil
	})
}

// checkScaleServices checks `meshctl services --json` against the generated catalog: every
// generated service is there with all its endpoints ready. It runs after the RSS samples, as the
// agent builds a large answer for it.
func checkScaleServices(t *testing.T, a *Agent, services int) {
	t.Helper()
	rows := a.Services(t)
	for i := range services {
		ns, name := scaleServiceName(i)
		r, ok := rows[ns+"/"+name]
		if !ok {
			t.Fatalf("meshctl services: %s/%s missing (%d rows)", ns, name, len(rows))
		}
		if r.Ready != scaleEndpointsPerService || r.Total != scaleEndpointsPerService || len(r.Ports) != 2 {
			t.Fatalf("meshctl services: %s/%s: %d/%d endpoints ready, %d ports; want %d/%d and 2",
				ns, name, r.Ready, r.Total, len(r.Ports), scaleEndpointsPerService, scaleEndpointsPerService)
		}
	}
}

// answered is when one node's DNS first answered a name: d after the file changed, at the
// queries-th query.
type answered struct {
	d       time.Duration
	queries int
}

// scaleRounds checks that fqdn has no address on any node's agent DNS, calls change, polls every
// node every scalePollInterval until each answers it, checks the answer with `dig` in the node, and
// returns each node's time from the end of change to its first answer, by role.
//
// The polls come from the test process, through a UDP socket opened in each node's namespace
// (dnsPoller): a query costs microseconds, where forking dig every 5 ms in three namespaces would
// take most of the CPUs the agents re-parse the catalog with.
func scaleRounds(t *testing.T, change func(), fqdn string, nodes ...*Node) (map[string]answered, error) {
	t.Helper()
	pollers := make([]*dnsPoller, len(nodes))
	for i, n := range nodes {
		p, err := newDNSPoller(n)
		if err != nil {
			return nil, err
		}
		defer p.Close()
		if ok, err := p.hasA(fqdn); err != nil || ok {
			return nil, fmt.Errorf("%s: %s before the change: answered %v, err %v", n.Role, fqdn, ok, err)
		}
		pollers[i] = p
	}
	change()
	changed := time.Now()
	type result struct {
		at      time.Time
		queries int
		err     error
	}
	results := make([]result, len(nodes))
	var wg sync.WaitGroup
	for i, p := range pollers {
		wg.Go(func() {
			results[i].at, results[i].queries, results[i].err = p.waitA(fqdn, changed.Add(scaleLoadTimeout))
		})
	}
	wg.Wait()
	out := make(map[string]answered, len(nodes))
	var errs []string
	for i, r := range results {
		n := nodes[i]
		if r.err == nil {
			var dig string
			dig, r.err = n.Exec("dig", "+short", "+tries=1", "+time=2", "@"+scaleDNSIP, fqdn, "A")
			if r.err == nil && !strings.HasPrefix(dig, "9.251.") {
				r.err = fmt.Errorf("dig after the poll answered: %q, want a service IP", dig)
			}
		}
		if r.err != nil {
			errs = append(errs, fmt.Sprintf("%s: %s: %v", n.Role, fqdn, r.err))
			continue
		}
		out[n.Role] = answered{d: r.at.Sub(changed), queries: r.queries}
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return out, nil
}

// dnsPoller asks one node's agent DNS for A records over a UDP socket the test process opened in
// the node's network namespace.
type dnsPoller struct {
	node *Node
	conn *mdns.Conn
}

// scaleQueryTimeout bounds one poll's wait for its answer (a lost one is followed by the next).
const scaleQueryTimeout = 200 * time.Millisecond

func newDNSPoller(n *Node) (*dnsPoller, error) {
	var c net.Conn
	err := inNamespace(n, func() error {
		var err error
		c, err = net.Dial("udp", net.JoinHostPort(scaleDNSIP, "53"))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("%s: DNS socket: %w", n.Role, err)
	}
	return &dnsPoller{node: n, conn: &mdns.Conn{Conn: c}}, nil
}

func (p *dnsPoller) Close() error { return p.conn.Close() }

// hasA asks for fqdn's A record once: true when the answer has one.
func (p *dnsPoller) hasA(fqdn string) (bool, error) {
	m := new(mdns.Msg)
	m.SetQuestion(mdns.Fqdn(fqdn), mdns.TypeA)
	c := mdns.Client{Timeout: scaleQueryTimeout}
	r, _, err := c.ExchangeWithConn(m, p.conn)
	if err != nil {
		return false, err
	}
	for _, rr := range r.Answer {
		if _, ok := rr.(*mdns.A); ok {
			return true, nil
		}
	}
	return false, nil
}

// waitA asks for fqdn's A record every scalePollInterval until an answer has one or deadline
// passes; it returns when that answer came and how many queries were sent.
func (p *dnsPoller) waitA(fqdn string, deadline time.Time) (time.Time, int, error) {
	var lastErr error
	for queries := 1; ; queries++ {
		ok, err := p.hasA(fqdn)
		if ok {
			return time.Now(), queries, nil
		}
		if err != nil {
			lastErr = err // a lost or late answer: the next query goes on
		}
		if time.Now().After(deadline) {
			return time.Time{}, queries, fmt.Errorf("no address after %d queries (last error: %v)", queries, lastErr)
		}
		time.Sleep(scalePollInterval)
	}
}

// inNamespace runs f on an OS thread of its own inside n's network namespace and returns f's
// error; sockets f creates stay in the namespace. The thread leaves the namespace before it serves
// other goroutines, or ends.
func inNamespace(n *Node, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("own network namespace: %w", err)
			return
		}
		defer orig.Close()
		target, err := os.Open("/run/netns/" + n.NS)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("network namespace %s: %w", n.NS, err)
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter network namespace %s: %w", n.NS, err)
			return
		}
		errc <- f()
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		} // else the thread stays locked and ends with this goroutine
	}()
	return <-errc
}

func slowest(res map[string]answered) time.Duration {
	var d time.Duration
	for _, a := range res {
		d = max(d, a.d)
	}
	return d
}

func seconds(res map[string]answered) map[string]float64 {
	m := make(map[string]float64, len(res))
	for role, a := range res {
		m[role] = a.d.Seconds()
	}
	return m
}

func describeRound(res map[string]answered) string {
	var parts []string
	for _, role := range slices.Sorted(maps.Keys(res)) {
		parts = append(parts, fmt.Sprintf("%s %v (%d queries)", role, res[role].d.Round(time.Millisecond), res[role].queries))
	}
	return strings.Join(parts, ", ")
}

// median returns the median of ds (the upper one of an even count).
func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// scaleServiceName returns the namespace and name of generated service i.
func scaleServiceName(i int) (ns, name string) {
	return fmt.Sprintf("team-%02d", i%scaleNamespaces), fmt.Sprintf("svc-%05d", i)
}

// writeScaleCatalog replaces path, through a temporary file renamed over it, with services
// generated services followed by the services named extra in namespace default (same shape,
// endpoints in another range). It returns the file's size.
func writeScaleCatalog(t testing.TB, path string, services int, extra []string) int64 {
	t.Helper()
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
	w := bufio.NewWriterSize(tmp, 1<<20)
	w.WriteString("# generated by the scale benchmark (e2e/bench_scale_test.go)\n")
	for i := range services {
		ns, name := scaleServiceName(i)
		// Pod IPs 10.128.0.1 onwards, clusterIPs in 10.96.0.0/16 (outside the mesh's range).
		writeScaleService(w, ns, name, fmt.Sprintf("10.96.%d.%d", i/250, i%250+1), 0x0a800000+uint32(i*scaleEndpointsPerService)+1)
	}
	for i, name := range extra {
		writeScaleService(w, "default", name, fmt.Sprintf("10.97.0.%d", i+1), 0x0a7f0000+uint32(i*scaleEndpointsPerService)+1)
	}
	err = w.Flush()
	var size int64
	if fi, serr := tmp.Stat(); serr == nil {
		size = fi.Size()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		t.Fatalf("write %s: %v", path, err)
	}
	return size
}

// writeScaleService writes one Service and its EndpointSlice of scaleEndpointsPerService endpoints
// at consecutive IPv4 addresses from firstEndpoint, as kubectl prints them (less the server-set
// metadata). Errors surface at the writer's Flush.
func writeScaleService(w *bufio.Writer, ns, name, clusterIP string, firstEndpoint uint32) {
	fmt.Fprintf(w, `---
apiVersion: v1
kind: Service
metadata:
  labels:
    app: %[2]s
  name: %[2]s
  namespace: %[1]s
spec:
  clusterIP: %[3]s
  clusterIPs:
  - %[3]s
  ipFamilies:
  - IPv4
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
  - name: grpc
    port: 9090
    protocol: TCP
    targetPort: 9090
  selector:
    app: %[2]s
  sessionAffinity: None
  type: ClusterIP
---
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
`, ns, name, clusterIP)
	for j := range uint32(scaleEndpointsPerService) {
		a := firstEndpoint + j
		fmt.Fprintf(w, `- addresses:
  - %d.%d.%d.%d
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: edge-%02d
  targetRef:
    kind: Pod
    name: %s-%d
    namespace: %s
`, a>>24, a>>16&0xff, a>>8&0xff, a&0xff, a%scaleFakeNodes, name, j, ns)
	}
	fmt.Fprintf(w, `kind: EndpointSlice
metadata:
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: %[2]s
  name: %[2]s-x7k2p
  namespace: %[1]s
ports:
- name: http
  port: 8080
  protocol: TCP
- name: grpc
  port: 9090
  protocol: TCP
`, ns, name)
}
