//go:build bench

package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The DNS section of the benchmark suite ("dns"): queries per second that dnsperf (Debian's) gets
// from edgewire's DNS server and from CoreDNS (the reference, built from the Go module proxy by
// scripts/go-tools.sh coredns, module tools/coredns) serving the same names. One lab, LAN 10.77.53.0/24:
//
//	client    10.77.53.10  the agent (DNS at 169.254.96.16, through mesh0 and its gVisor netstack);
//	                       the CoreDNS references on 127.0.0.1 (kernel sockets); dnsperf
//	upstream  10.77.53.53  CoreDNS serving the zone fwd.test. (file plugin): the upstream resolver
//	                       of the agent and of the CoreDNS forward reference
//
// The catalog has dnsServices services svc-NNN.default (ClusterIPs 9.251.1.x). The server under test
// is pinned to CPU 0 and dnsperf to CPU 1, both started with taskset: unpinned, the figures mostly
// measure how the two processes share two cores. dnsperf runs dnsDuration with dnsOutstanding
// queries in flight over one socket (more overflows the servers' receive buffers and its losses
// then dominate), cycling through a query file of the names; a first pass through the file warms
// every server (and the forwarding caches) before the timed run. The references run first, one at
// a time, before the agent starts; their Corefiles hold the plugin measured and nothing else (no
// log, no cache but the forward reference's). Measurements, in queries per
// second (dnsperf's "Queries per second"; its lost queries, latency and response codes in Raw):
//
//   - dns.qps.service.coredns-file: CoreDNS's file plugin, a zone file with the catalog's A records
//     (and the SOA and NS the agent also serves).
//   - dns.qps.service.coredns-hosts: CoreDNS's hosts plugin, a hosts file with the same names.
//   - dns.qps.forwarded.coredns-forward: CoreDNS's forward plugin with its cache, to the upstream.
//   - dns.qps.service.edgewire: the agent, A queries for the service names; goal ≥ dnsGoal× the
//     faster of the two CoreDNS plugins.
//   - dns.qps.forwarded.edgewire: the agent, A queries for fwd.test. names, forwarded to the
//     upstream and then answered from its cache (the zone's TTL outlasts the run), compared with
//     CoreDNS forward.
//
// Every server is checked with dig to answer a sample name correctly before it is timed, and a run
// whose responses are not all NOERROR fails the measurement: dnsperf does not check answers.
const (
	dnsServices    = 100
	dnsDuration    = 10 * time.Second
	dnsOutstanding = 100
	dnsGoal        = 1.2
	dnsUpstreamIP  = "10.77.53.53"
	dnsAgentIP     = "169.254.96.16"
	dnsZone        = "cluster.local."
	dnsFwdZone     = "fwd.test."
	// dnsServerCPU and dnsClientCPU are the CPUs the server under test and dnsperf are pinned to.
	dnsServerCPU = "0"
	dnsClientCPU = "1"
)

// dnsBench is the state of the section: the lab's nodes, files and the pinning prefixes.
type dnsBench struct {
	*bench
	client, upstream *Node
	dir              string
	coredns          string
	// serverPin and clientPin prefix the commands of the server under test and of dnsperf
	// (empty on a machine with a single CPU, where pinning apart is impossible).
	serverPin, clientPin []string
}

func (b *bench) dns(t *testing.T) {
	b.daemons = nil
	for _, tool := range []string{"dnsperf", "taskset", "dig"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.report.Fail("dns", fmt.Errorf("%s not found: run `scripts/install-deps.sh --bench`", tool))
			t.Fatalf("%s not found: run `scripts/install-deps.sh --bench`", tool)
		}
	}
	d := &dnsBench{bench: b, coredns: filepath.Join(benchTools(t), "coredns")}
	if runtime.NumCPU() >= 2 {
		d.serverPin = []string{"taskset", "-c", dnsServerCPU}
		d.clientPin = []string{"taskset", "-c", dnsClientCPU}
	} else {
		t.Logf("one CPU: server and dnsperf are not pinned")
	}
	lab := NewLab(t)
	d.dir = lab.Dir
	lan := lab.LAN(t, "lan", netip.MustParsePrefix("10.77.53.0/24"))
	d.client, d.upstream = lab.Node(t, "client"), lab.Node(t, "upstream")
	lan.Attach(t, d.client, netip.MustParseAddr("10.77.53.10"))
	lan.Attach(t, d.upstream, netip.MustParseAddr(dnsUpstreamIP))

	svcQueries := d.writeFile(t, "service-queries.txt", dnsQueryFile(dnsServiceName))
	fwdQueries := d.writeFile(t, "forwarded-queries.txt", dnsQueryFile(dnsForwardedName))
	zone := d.writeFile(t, "db.cluster.local", dnsClusterZone())
	hosts := d.writeFile(t, "hosts", dnsHostsFile())
	fwdZone := d.writeFile(t, "db.fwd.test", dnsForwardedZone())

	// The upstream of the forwarded names, unpinned: after the warm-up pass it is not asked again.
	d.startCoreDNS(t, d.upstream, "upstream", nil, fmt.Sprintf("%s:53 {\n\tbind %s\n\tfile %s\n}\n", dnsFwdZone, dnsUpstreamIP, fwdZone))
	d.checkAnswer(t, dnsUpstreamIP, "53", dnsForwardedName(7), dnsForwardedIP(7))

	// The references first, each alone on CPU 0 (the agent is not running yet).
	refs := []struct {
		name, zone, port, plugins, queries, qname, want string
	}{
		{"dns.qps.service.coredns-file", dnsZone, "5301", "file " + zone, svcQueries, dnsServiceName(42), dnsServiceIP(42)},
		{"dns.qps.service.coredns-hosts", dnsZone, "5302", "hosts " + hosts + " {\n\t\tttl 5\n\t\treload 0\n\t}", svcQueries, dnsServiceName(42), dnsServiceIP(42)},
		{"dns.qps.forwarded.coredns-forward", ".", "5303", "forward . " + dnsUpstreamIP + ":53\n\tcache 3600", fwdQueries, dnsForwardedName(42), dnsForwardedIP(42)},
	}
	for _, r := range refs {
		corefile := fmt.Sprintf("%s:%s {\n\tbind 127.0.0.1\n\t%s\n}\n", r.zone, r.port, r.plugins)
		p := d.startCoreDNS(t, d.client, strings.TrimPrefix(r.name, "dns.qps."), d.serverPin, corefile)
		d.checkAnswer(t, "127.0.0.1", r.port, r.qname, r.want)
		b.daemons = []daemon{{"coredns", p}}
		d.measure(t, r.name, "127.0.0.1", r.port, r.queries)
		if err := p.Stop(5 * time.Second); err != nil {
			t.Logf("stop %s: %v", p.Name, err)
		}
	}

	a := d.startAgent(t, lab)
	b.daemons = []daemon{{"agent", a.Proc}}
	d.checkAnswer(t, dnsAgentIP, "53", dnsServiceName(42), dnsServiceIP(42))
	d.checkAnswer(t, dnsAgentIP, "53", dnsForwardedName(42), dnsForwardedIP(42))
	service := "dns.qps.service.edgewire"
	d.measure(t, service, dnsAgentIP, "53", svcQueries, "dns.qps.service.coredns-file", "dns.qps.service.coredns-hosts")
	d.goal(service, "dns.qps.service.coredns-file", "dns.qps.service.coredns-hosts")
	d.measure(t, "dns.qps.forwarded.edgewire", dnsAgentIP, "53", fwdQueries, "dns.qps.forwarded.coredns-forward")
	if st, err := a.Ctl("status"); err == nil {
		t.Logf("agent status after the runs:\n%s", st)
	}
}

// goal sets the goal of measurement name: ≥ dnsGoal× the fastest of refs (those measured).
func (d *dnsBench) goal(name string, refs ...string) {
	m, ok := d.report.byName[name]
	if !ok {
		return
	}
	var best *Measurement
	for _, r := range refs {
		if o, ok := d.report.byName[r]; ok && (best == nil || o.Value > best.Value) {
			best = o
		}
	}
	if best == nil || best.Value == 0 {
		return
	}
	m.Goal = &Goal{Text: fmt.Sprintf("≥ %.1f× %s", dnsGoal, best.Name), Met: m.Value >= dnsGoal*best.Value}
}

// startAgent runs the agent in the client, pinned (through a wrapper script: StartAgent runs the
// binary it is given), with the catalog and the upstream, and waits until it serves every service.
func (d *dnsBench) startAgent(t *testing.T, lab *Lab) *Agent {
	t.Helper()
	services := filepath.Join(d.dir, "services.yaml")
	WriteFileAtomic(t, services, RenderServices(dnsCatalog()))
	resolvConf := d.writeFile(t, "upstream-resolv.conf", "nameserver "+dnsUpstreamIP+"\n")
	meshctl := d.meshctl
	if len(d.serverPin) > 0 {
		script := fmt.Sprintf("#!/bin/sh\nexec %s %s \"$@\"\n", strings.Join(d.serverPin, " "), d.meshctl)
		meshctl = filepath.Join(d.dir, "meshctl-pinned")
		if err := os.WriteFile(meshctl, []byte(script), 0o755); err != nil {
			t.Fatalf("write %s: %v", meshctl, err)
		}
	}
	a := StartAgent(t, d.client, AgentOptions{
		Meshctl:      meshctl,
		ServicesFile: services,
		ResolvConf:   resolvConf,
		LogLevel:     "info", // the product's default: debug logging would cost the data path
		Extra:        []string{"--wg-interface", lab.Name("client")},
	})
	a.Meshctl = d.meshctl // the verbs run unpinned
	took := a.WaitReady(t, 30*time.Second)
	Eventually(t, 10*time.Second, 50*time.Millisecond, "catalog loaded", func() error {
		if n := len(a.Services(t)); n != dnsServices {
			return fmt.Errorf("%d services, want %d", n, dnsServices)
		}
		return nil
	})
	t.Logf("agent ready after %v", took.Round(time.Millisecond))
	return a
}

// startCoreDNS runs CoreDNS in n with corefile, its command prefixed with pin, and waits until it
// serves.
func (d *dnsBench) startCoreDNS(t *testing.T, n *Node, name string, pin []string, corefile string) *Proc {
	t.Helper()
	conf := d.writeFile(t, "Corefile."+name, corefile)
	args := append(slices.Clone(pin), d.coredns, "-conf", conf)
	p := n.Start(t, "coredns-"+name, args...)
	// CoreDNS prints the zones it serves ("cluster.local.:5301") once it listens.
	p.WaitLog(t, "CoreDNS-", 20*time.Second)
	return p
}

// checkAnswer fails t unless server:port answers qname's A query with exactly want.
func (d *dnsBench) checkAnswer(t *testing.T, server, port, qname, want string) {
	t.Helper()
	Eventually(t, 10*time.Second, 100*time.Millisecond, qname+" from "+server+":"+port, func() error {
		out, err := d.client.Exec("dig", "@"+server, "-p", port, "+time=1", "+tries=1", "+short", qname, "A")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		if got := strings.TrimSpace(out); got != want {
			return fmt.Errorf("answer %q, want %q", got, want)
		}
		return nil
	})
}

// measure runs dnsperf from the client against server:port with the query file, once through it to
// warm up and then timed, and records the rate as name, compared with refs.
func (d *dnsBench) measure(t *testing.T, name, server, port, queries string, refs ...string) {
	t.Run(name, func(t *testing.T) {
		base := append(slices.Clone(d.clientPin), "dnsperf", "-s", server, "-p", port, "-d", queries,
			"-c", "1", "-T", "1", "-q", strconv.Itoa(dnsOutstanding), "-t", "2")
		if out, err := d.client.ExecTimeout(time.Minute, append(base, "-n", "1")...); err != nil {
			d.report.Fail(name, fmt.Errorf("warm-up: %w", err))
			t.Fatalf("dnsperf warm-up: %v\n%s", err, lastLines(out, 20))
		}
		cpu := d.cpuMeter()
		out, err := d.client.ExecTimeout(dnsDuration+time.Minute, append(base, "-l", strconv.Itoa(int(dnsDuration.Seconds())))...)
		var r DNSPerfResult
		if err == nil {
			r, err = parseDNSPerf(out)
		}
		if err == nil && r.NoError < r.Completed {
			err = fmt.Errorf("responses not all NOERROR: %s", r.ResponseCodes)
		}
		if err != nil {
			d.report.Fail(name, err)
			t.Fatalf("dnsperf against %s:%s: %v\n%s", server, port, err, lastLines(out, 20))
		}
		m := &Measurement{Name: name, Value: r.QPS, Unit: "queries/s", Raw: r, CPU: cpu()}
		d.report.Add(m, refs...)
		t.Logf("%.0f queries/s, %d lost of %d, latency avg %.0f µs (max %.0f µs); daemons: %s",
			r.QPS, r.Lost, r.Sent, r.AvgLatencyMicro, r.MaxLatencyMicro, formatCPU(m.CPU))
	})
}

// DNSPerfResult is what dnsperf's statistics say about one run.
type DNSPerfResult struct {
	Sent      int `json:"sent"`
	Completed int `json:"completed"`
	Lost      int `json:"lost"`
	// NoError counts the NOERROR responses; ResponseCodes is dnsperf's whole line.
	NoError         int     `json:"noError"`
	ResponseCodes   string  `json:"responseCodes"`
	Seconds         float64 `json:"seconds"`
	QPS             float64 `json:"qps"`
	AvgLatencyMicro float64 `json:"avgLatencyUs"`
	MinLatencyMicro float64 `json:"minLatencyUs"`
	MaxLatencyMicro float64 `json:"maxLatencyUs"`
	StdDevMicro     float64 `json:"latencyStdDevUs"`
	// RequestBytes and ResponseBytes are the average packet sizes.
	RequestBytes  int `json:"requestBytes"`
	ResponseBytes int `json:"responseBytes"`
}

var (
	dnsperfInt   = regexp.MustCompile(`(?m)^\s*(Queries sent|Queries completed|Queries lost):\s+(\d+)`)
	dnsperfFloat = regexp.MustCompile(`(?m)^\s*(Run time \(s\)|Queries per second|Latency StdDev \(s\)):\s+([0-9.]+)`)
	dnsperfLat   = regexp.MustCompile(`(?m)^\s*Average Latency \(s\):\s+([0-9.]+) \(min ([0-9.]+), max ([0-9.]+)\)`)
	dnsperfSize  = regexp.MustCompile(`(?m)^\s*Average packet size:\s+request (\d+), response (\d+)`)
	dnsperfCodes = regexp.MustCompile(`(?m)^\s*Response codes:\s+(.*)$`)
	dnsperfNoErr = regexp.MustCompile(`NOERROR (\d+)`)
)

// parseDNSPerf reads dnsperf's closing statistics.
func parseDNSPerf(out string) (DNSPerfResult, error) {
	var r DNSPerfResult
	for _, m := range dnsperfInt.FindAllStringSubmatch(out, -1) {
		v, _ := strconv.Atoi(m[2])
		switch m[1] {
		case "Queries sent":
			r.Sent = v
		case "Queries completed":
			r.Completed = v
		case "Queries lost":
			r.Lost = v
		}
	}
	for _, m := range dnsperfFloat.FindAllStringSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(m[2], 64)
		switch m[1] {
		case "Run time (s)":
			r.Seconds = v
		case "Queries per second":
			r.QPS = v
		case "Latency StdDev (s)":
			r.StdDevMicro = v * 1e6
		}
	}
	if m := dnsperfLat.FindStringSubmatch(out); m != nil {
		for i, p := range []*float64{&r.AvgLatencyMicro, &r.MinLatencyMicro, &r.MaxLatencyMicro} {
			v, _ := strconv.ParseFloat(m[i+1], 64)
			*p = v * 1e6
		}
	}
	if m := dnsperfSize.FindStringSubmatch(out); m != nil {
		r.RequestBytes, _ = strconv.Atoi(m[1])
		r.ResponseBytes, _ = strconv.Atoi(m[2])
	}
	if m := dnsperfCodes.FindStringSubmatch(out); m != nil {
		r.ResponseCodes = strings.TrimSpace(m[1])
		if n := dnsperfNoErr.FindStringSubmatch(m[1]); n != nil {
			r.NoError, _ = strconv.Atoi(n[1])
		}
	}
	if r.Sent == 0 || r.QPS == 0 {
		return r, fmt.Errorf("dnsperf output has no statistics: %s", lastLines(out, 5))
	}
	return r, nil
}

func dnsServiceName(i int) string   { return fmt.Sprintf("svc-%03d.default.svc.%s", i, dnsZone) }
func dnsServiceIP(i int) string     { return fmt.Sprintf("9.251.1.%d", i+1) }
func dnsForwardedName(i int) string { return fmt.Sprintf("name-%03d.%s", i, dnsFwdZone) }

// dnsForwardedIP is the answer of a forwarded name: an address of a documentation range, never
// contacted.
func dnsForwardedIP(i int) string { return fmt.Sprintf("198.51.100.%d", i+1) }

// dnsCatalog is the agent's catalog: dnsServices services with one port and one endpoint each (the
// endpoint is never contacted).
func dnsCatalog() []ServiceSpec {
	specs := make([]ServiceSpec, dnsServices)
	for i := range specs {
		specs[i] = ServiceSpec{Name: fmt.Sprintf("svc-%03d", i), ClusterIP: dnsServiceIP(i),
			Ports:     []PortSpec{{Name: "http", Port: 80, TargetPort: 8080}},
			Endpoints: []EndpointSpec{{IP: "10.77.53.200", Ready: true, Node: "client"}}}
	}
	return specs
}

// dnsQueryFile is a dnsperf input file: the A query of every name(i), i < dnsServices.
func dnsQueryFile(name func(int) string) string {
	var b strings.Builder
	for i := range dnsServices {
		fmt.Fprintf(&b, "%s A\n", name(i))
	}
	return b.String()
}

// dnsClusterZone is the zone file of the CoreDNS file reference: the agent's SOA and NS (TTL 5, as
// the agent's) and the A record of every service.
func dnsClusterZone() string {
	var b strings.Builder
	fmt.Fprintf(&b, "$ORIGIN %s\n$TTL 5\n", dnsZone)
	b.WriteString("@ IN SOA ns.dns hostmaster 1 7200 1800 86400 5\n@ IN NS ns.dns\nns.dns IN A 127.0.0.1\n")
	for i := range dnsServices {
		fmt.Fprintf(&b, "svc-%03d.default.svc IN A %s\n", i, dnsServiceIP(i))
	}
	return b.String()
}

// dnsHostsFile is the hosts file of the CoreDNS hosts reference.
func dnsHostsFile() string {
	var b strings.Builder
	for i := range dnsServices {
		fmt.Fprintf(&b, "%s %s\n", dnsServiceIP(i), strings.TrimSuffix(dnsServiceName(i), "."))
	}
	return b.String()
}

// dnsForwardedZone is the upstream's zone; its TTL outlasts the run, so that the forwarders answer
// from their caches once warmed.
func dnsForwardedZone() string {
	var b strings.Builder
	fmt.Fprintf(&b, "$ORIGIN %s\n$TTL 3600\n", dnsFwdZone)
	b.WriteString("@ IN SOA ns hostmaster 1 7200 1800 86400 3600\n@ IN NS ns\nns IN A " + dnsUpstreamIP + "\n")
	for i := range dnsServices {
		fmt.Fprintf(&b, "name-%03d IN A %s\n", i, dnsForwardedIP(i))
	}
	return b.String()
}

// writeFile writes content to name in the lab's directory and returns its path.
func (d *dnsBench) writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(d.dir, name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatalf("write %s: %v", p, err)
	}
	return p
}

// benchTools returns the directory holding the reference CoreDNS, building it on first use.
func benchTools(t testing.TB) string {
	t.Helper()
	return GoTools(t, "coredns", "coredns")
}
